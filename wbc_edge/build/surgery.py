"""Graph surgery (onnx-graphsurgeon): put preprocessing and softmax inside the graph.

The result takes the raw uint8 NHWC crop batch the edge pipeline produces; Cast, Transpose and the
mean/std normalisation run inside the engine, so no runtime can normalise differently from training.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import __version__

INPUT, OUTPUT, EMBEDDING = "images", "probs", "embedding"


def add_io_processing(model: onnx.ModelProto, mean, std, softmax: bool = True) -> onnx.ModelProto:
    """float NCHW->logits graph  =>  uint8 NHWC (`images`) -> probabilities (`probs`).

    With `softmax=False` (an embedding model) the output is passed through, renamed `embedding`.
    """
    graph = gs.import_onnx(model)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ValueError(f"expected one input and one output, got {len(graph.inputs)} and {len(graph.outputs)}")
    old_in, old_out = graph.inputs[0], graph.outputs[0]
    size = old_in.shape[2]
    images = gs.Variable(INPUT, dtype=np.uint8, shape=[old_in.shape[0], size, size, 3])
    as_float = graph.layer(op="Cast", inputs=[images], outputs=["images_f32"], attrs={"to": onnx.TensorProto.FLOAT})[0]
    nchw = graph.layer(op="Transpose", inputs=[as_float], outputs=["images_nchw"], attrs={"perm": [0, 3, 1, 2]})[0]
    # (x/255 - mean)/std == x * scale + shift, one Mul and one Add per pixel
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).reshape(1, 3, 1, 1)
    shift = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).reshape(1, 3, 1, 1).astype(np.float32)
    scaled = graph.layer(op="Mul", inputs=[nchw, gs.Constant("norm_scale", scale.astype(np.float32))],
                         outputs=["images_scaled"])[0]
    normed = graph.layer(op="Add", inputs=[scaled, gs.Constant("norm_shift", shift)], outputs=["images_norm"])[0]
    for node in list(old_in.outputs):
        node.inputs = [normed if t is old_in else t for t in node.inputs]
    if softmax:
        # an explicit Variable keeps the name exactly 'probs' (layer() would uniquify a string name)
        out = gs.Variable(OUTPUT, dtype=np.float32, shape=[old_in.shape[0], old_out.shape[1]])
        graph.layer(op="Softmax", inputs=[old_out], outputs=[out], attrs={"axis": 1})
    else:
        out = old_out
        out.name = EMBEDDING
    graph.inputs, graph.outputs = [images], [out]
    return gs.export_onnx(graph.cleanup().toposort())  # keeps the source graph's opset


def embedding_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deployable classifier graph cut before its classifier layer: uint8 NHWC (`images`) ->
    the penultimate features (`embedding`), with the same in-graph preprocessing.

    The classifier is the last Gemm (or MatMul, with its bias Add) before the Softmax; its data
    input is the embedding. No torch needed: any member of any bundle can serve as an embedder.
    """
    graph = gs.import_onnx(model)
    (images,), (probs,) = graph.inputs, graph.outputs
    if images.name != INPUT or probs.name != OUTPUT or probs.inputs[0].op != "Softmax":
        raise ValueError("not a wbc-edge deployable graph (expects input 'images' and a Softmax output 'probs')")
    node = probs.inputs[0].inputs[0].inputs[0]  # the producer of the logits
    if node.op == "Add" and any(t.inputs and t.inputs[0].op == "MatMul" for t in node.inputs):
        node = next(t.inputs[0] for t in node.inputs if t.inputs and t.inputs[0].op == "MatMul")
    if node.op not in ("Gemm", "MatMul"):
        raise ValueError(f"cannot find the classifier layer: the logits come from a {node.op} node ({node.name}), "
                         "not a Gemm/MatMul")
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        raise ValueError(f"classifier {node.name} has transA=1; its input is not a (batch, features) embedding")
    emb, weight = node.inputs[0], node.inputs[1]
    trans_b = node.op == "Gemm" and node.attrs.get("transB", 0)
    width = weight.shape[1] if trans_b else weight.shape[0]  # the classifier's input features
    emb.name, emb.dtype, emb.shape = EMBEDDING, np.float32, [images.shape[0], width]
    graph.outputs = [emb]
    return gs.export_onnx(graph.cleanup().toposort())


def strip_io_processing(model: onnx.ModelProto) -> onnx.ModelProto:
    """The inverse of `add_io_processing`: recover the float NCHW -> logits graph from a deployable one.

    Lets a bundle ship only its deployable graphs and still be re-built or quantised without torch.
    """
    graph = gs.import_onnx(model)
    (images,), (probs,) = graph.inputs, graph.outputs
    if images.name != INPUT or probs.name != OUTPUT or probs.inputs[0].op != "Softmax":
        raise ValueError("not a wbc-edge deployable graph (expects input 'images' and a Softmax output 'probs')")
    node = images.outputs[0]
    for op in ("Cast", "Transpose", "Mul", "Add"):  # the exact chain add_io_processing inserts
        if node.op != op:
            raise ValueError(f"unexpected {node.op} where {op} of the input preprocessing was expected")
        normed, node = node.outputs[0], node.outputs[0].outputs[0]
    size = images.shape[1]
    raw_in = gs.Variable("input", dtype=np.float32, shape=[images.shape[0], 3, size, size])
    for consumer in list(normed.outputs):
        consumer.inputs = [raw_in if t is normed else t for t in consumer.inputs]
    logits = probs.inputs[0].inputs[0]
    logits.name = "logits"
    graph.inputs, graph.outputs = [raw_in], [logits]
    return gs.export_onnx(graph.cleanup().toposort())


def raw_graph_path(bundle, member, tmp_dir) -> Path:
    """The member's raw graph, stripped from its deployable graph into `tmp_dir` (bundles ship only that)."""
    path = Path(tmp_dir) / f"{member.name}.raw.onnx"
    onnx.save(strip_io_processing(onnx.load(str(bundle.path(member.onnx)))), str(path))
    return path


def set_metadata(model: onnx.ModelProto, meta: dict) -> onnx.ModelProto:
    """Store classes, preprocessing, member weights and version in the graph's metadata_props."""
    meta = {"wbc_edge_version": __version__, **meta}
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    return model


def build_bundle_member_graph(bundle, member, raw_path, out_name: str, **metadata) -> Path:
    """`build_member_graph` with the bundle's preprocessing and the metadata every member graph carries
    (classes, preprocessing, member name), then `metadata`; written to `out_name` in the bundle."""
    pp = bundle.preprocess
    return build_member_graph(raw_path, bundle.path(out_name), pp.mean, pp.std,
                              {"classes": bundle.classes, "preprocess": pp.to_dict(), "member": member.name,
                               **metadata})


def build_member_graph(raw_path, out_path, mean, std, metadata: dict) -> Path:
    """Raw exported graph -> deployable graph (uint8 in, probabilities out, metadata), checked."""
    model = onnx.load(str(raw_path))
    model = set_metadata(add_io_processing(model, mean, std), metadata)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out_path))
    return Path(out_path)

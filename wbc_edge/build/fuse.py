"""Fuse every member's deployable graph into one graph: the bundle's TTA views, every member, the mean
over views and the weighted mean over members, all inside one engine call.

    images (uint8 B x S x S x 3) -> D4 views (Transpose / reversed Slice) -> Concat (V*B)
      -> each member (its own Cast, normalisation, network, softmax) -> weighted Sum
      -> Reshape (V, B, C) -> ReduceMean over V -> probs (B x C)

One uint8 batch in, averaged probabilities out: the runtime copies nothing per view and the engine
does the view copies with its own (vectorised, multi-threaded) kernels. The view list comes from the
bundle (`tta.views`, up to the 8 elements of D4) and is recorded in the graph's metadata and in the
manifest's `fused.views`; a runtime asked for other views runs the members instead. Member graphs
built for another precision (`ort-int8`, ...) are fused the same way (`fused.artifacts`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from ..edge import tta
from .surgery import INPUT, OUTPUT, set_metadata

_LAST = np.iinfo(np.int64).min  # a reversed Slice runs past index 0 to here


def view_steps(name: str) -> list[tuple]:
    """The NHWC ops of one TTA view, as `tta.view` does it (np.rot90 on axes (1, 2), then a flip of W):
    ("flip", axis) and ("swap",) for a transpose of H and W; adjacent equal flips cancel."""
    turns, flip = tta.VIEWS[name]
    steps = {0: [], 1: [("flip", 2), ("swap",)], 2: [("flip", 1), ("flip", 2)],
             3: [("swap",), ("flip", 2)]}[turns] + ([("flip", 2)] if flip else [])
    out: list[tuple] = []
    for s in steps:
        if out and s[0] == "flip" and out[-1] == s:
            out.pop()
        else:
            out.append(s)
    return out


def view_nodes(views: list[str], source: str = INPUT, prefix: str = "tta_"):
    """(nodes, initializers, output name): the views of `source` stacked view-major, as `tta.expand`."""
    views = tta.check_views(views)
    nodes, inits, outs = [], [], []
    for v in views:
        cur = source
        for j, step in enumerate(view_steps(v)):
            name = f"{prefix}{v}_{j}"
            if step[0] == "swap":
                nodes.append(helper.make_node("Transpose", [cur], [name], perm=[0, 2, 1, 3]))
            else:
                consts = {"starts": [-1], "ends": [_LAST], "axes": [step[1]], "steps": [-1]}
                names = [f"{name}_{k}" for k in consts]
                inits += [numpy_helper.from_array(np.asarray(c, np.int64), n) for n, c in zip(names, consts.values())]
                nodes.append(helper.make_node("Slice", [cur, *names], [name]))
            cur = name
        outs.append(cur)
    if len(outs) == 1:
        return nodes, inits, outs[0]
    nodes.append(helper.make_node("Concat", outs, [f"{prefix}views"], axis=0))
    return nodes, inits, f"{prefix}views"


def _view_mean(source: str, n_views: int, n_classes: int, opset: int):
    """Nodes that turn (V*B, C) view-major probabilities into their (B, C) mean over the V views."""
    shape = numpy_helper.from_array(np.asarray([n_views, -1, n_classes], np.int64), "tta_shape")
    nodes = [helper.make_node("Reshape", [source, "tta_shape"], ["tta_by_view"])]
    if opset >= 18:  # ReduceMean takes its axes as an input from opset 18 on
        axes = numpy_helper.from_array(np.asarray([0], np.int64), "tta_axes")
        nodes.append(helper.make_node("ReduceMean", ["tta_by_view", "tta_axes"], [OUTPUT], keepdims=0))
        return nodes, [shape, axes]
    nodes.append(helper.make_node("ReduceMean", ["tta_by_view"], [OUTPUT], axes=[0], keepdims=0))
    return nodes, [shape]


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def fuse_graphs(models: list[onnx.ModelProto], weights, views=("id",)) -> onnx.ModelProto:
    """One graph: `views` of the uint8 input, each member on all of them, weighted mean of the members,
    mean over the views."""
    views = list(views)
    w = (np.asarray(weights, np.float64) / np.sum(weights)).astype(np.float32)
    nodes, inits, member_in = view_nodes(views)
    outs = []
    for i, m in enumerate(models):
        p = compose.add_prefix(m, f"m{i}_")  # unique names; then every member reads the shared views
        for node in p.graph.node:
            node.input[:] = [member_in if name == f"m{i}_{INPUT}" else name for name in node.input]
        nodes += list(p.graph.node)
        inits += list(p.graph.initializer) + [numpy_helper.from_array(w[i:i + 1], f"m{i}_ensemble_weight")]
        nodes.append(helper.make_node("Mul", [f"m{i}_{OUTPUT}", f"m{i}_ensemble_weight"], [f"m{i}_weighted"]))
        outs.append(f"m{i}_weighted")
    first = models[0].graph
    n_classes = first.output[0].type.tensor_type.shape.dim[1].dim_value
    if len(views) == 1:
        nodes.append(helper.make_node("Sum", outs, [OUTPUT]))
    else:
        if not n_classes:
            raise ValueError("the member graphs do not state their number of classes; cannot average views")
        nodes.append(helper.make_node("Sum", outs, ["ensemble_by_view"]))
        more_nodes, more_inits = _view_mean("ensemble_by_view", len(views), n_classes, _opset(models[0]))
        nodes, inits = nodes + more_nodes, inits + more_inits
    images = helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["batch", *_dims(first.input[0])[1:]])
    probs = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", n_classes or "classes"])
    graph = helper.make_graph(nodes, "wbc_edge_ensemble", [images], [probs], inits)
    fused = helper.make_model(graph, opset_imports=list(models[0].opset_import))
    fused.ir_version = models[0].ir_version
    onnx.checker.check_model(fused)
    return fused


def _dims(value_info) -> list:
    return [d.dim_value or d.dim_param or "?" for d in value_info.type.tensor_type.shape.dim]


def fusable_artifacts(bundle) -> list[str]:
    """Keys of the ONNX graphs every member has besides its FP32 one (e.g. `ort-int8`): fused too."""
    keys = set.intersection(*(set(m.artifacts) for m in bundle.members)) if bundle.members else set()
    return sorted(k for k in keys if all(m.artifacts[k].endswith(".onnx") for m in bundle.members))


def fuse_bundle(bundle, name: str = "ensemble.onnx") -> Path:
    """Write the fused graph (and one per fusable artifact) beside the members and register them in
    the bundle (`fused`: onnx, members, weights, views, artifacts)."""
    weights = [m.weight for m in bundle.members]
    views = bundle.views
    meta = {"classes": bundle.classes, "preprocess": bundle.preprocess.to_dict(),
            "members": [m.name for m in bundle.members], "ensemble_weights": weights, "views": views}

    def write(files: list[str], out: str) -> None:
        models = [onnx.load(str(bundle.path(f))) for f in files]
        onnx.save(set_metadata(fuse_graphs(models, weights, views), meta), str(bundle.path(out)))

    write([m.onnx for m in bundle.members], name)
    artifacts = {}
    for key in fusable_artifacts(bundle):
        artifacts[key] = f"{Path(name).stem}.{key}.onnx"
        write([m.artifacts[key] for m in bundle.members], artifacts[key])
    bundle.extra["fused"] = {"onnx": name, "members": [m.name for m in bundle.members], "weights": weights,
                             "views": views, "artifacts": artifacts}
    return bundle.path(name)

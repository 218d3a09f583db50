"""Fuse every member's deployable graph into one graph: the bundle's TTA views, every member, the mean
over views and the weighted mean over members, all inside one engine call.

    images (uint8 B x S x S x 3) -> each member: its own Cast and normalisation (on B cells)
      -> D4 views (Transpose / reversed Slice, float NCHW) -> Concat (V*B) -> network, softmax
      -> weighted Sum over members -> Reshape (V, B, C) -> ReduceMean over V -> probs (B x C)

One uint8 batch in, averaged probabilities out: the runtime copies nothing per view, and the member's
preprocessing runs once per cell instead of once per view. (A member graph that does not start with
surgery's Cast/Transpose/Mul/Add gets the views on the uint8 input instead.) The view list comes from the
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


# the three ops every D4 view is made of, per layout: a transpose of H and W, a flip of W, a flip of H
LAYOUTS = {"nhwc": {"T": [0, 2, 1, 3], "W": 2, "H": 1}, "nchw": {"T": [0, 1, 3, 2], "W": 3, "H": 2}}


def view_form(name: str) -> tuple[str, ...]:
    """The view as ops applied in the order T, W, H (each at most once), e.g. rot90 -> ("T", "H"):
    found by trying the 8 combinations against `tta.view` on an asymmetric NHWC array."""
    x = np.arange(16).reshape(1, 4, 4, 1)
    target = tta.view(x, name)
    for form in ((), ("W",), ("H",), ("W", "H"), ("T",), ("T", "W"), ("T", "H"), ("T", "W", "H")):
        y = x
        for op in form:
            y = y.transpose(0, 2, 1, 3) if op == "T" else np.flip(y, LAYOUTS["nhwc"][op])
        if np.array_equal(y, target):
            return form
    raise AssertionError(f"view {name} is no element of D4")


def view_nodes(views: list[str], source: str = INPUT, prefix: str = "tta_", layout: str = "nhwc"):
    """(nodes, initializers, output name): the views of `source` stacked view-major, as `tta.expand`.

    Views share their prefixes (rot90 = flip H of the transpose, rot270_flip = the transpose itself), so
    8 views cost one transpose, two flips of W and four cheap flips of H (whole rows) before the Concat."""
    views = tta.check_views(views)
    ops = LAYOUTS[layout]
    made, nodes, inits = {(): source}, [], []
    for v in views:
        form = view_form(v)
        for j in range(1, len(form) + 1):
            key = form[:j]
            if key in made:
                continue
            name, op, cur = f"{prefix}{''.join(key)}", key[-1], made[key[:-1]]
            if op == "T":
                nodes.append(helper.make_node("Transpose", [cur], [name], perm=ops["T"]))
            else:
                consts = {"starts": [-1], "ends": [_LAST], "axes": [ops[op]], "steps": [-1]}
                names = [f"{name}_{k}" for k in consts]
                inits += [numpy_helper.from_array(np.asarray(c, np.int64), n) for n, c in zip(names, consts.values())]
                nodes.append(helper.make_node("Slice", [cur, *names], [name]))
            made[key] = name
    outs = [made[view_form(v)] for v in views]
    if len(outs) == 1:
        return nodes, inits, outs[0]
    nodes.append(helper.make_node("Concat", outs, [f"{prefix}views"], axis=0))
    return nodes, inits, f"{prefix}views"


def normalised_tensor(graph: onnx.GraphProto) -> str | None:
    """The float NCHW tensor after a member's own Cast -> Transpose -> Mul -> Add (surgery.add_io_processing),
    or None for a graph that does not start so."""
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    cur = graph.input[0].name
    for op in ("Cast", "Transpose", "Mul", "Add"):
        nxt = consumers.get(cur, [])
        if len(nxt) != 1 or nxt[0].op_type != op:
            return None
        cur = nxt[0].output[0]
    return cur


def _member_views(graph: onnx.GraphProto, views: list[str], prefix: str) -> bool:
    """Put the views inside one member, after its normalisation: the Cast and normalisation then run on
    the B cells, not on V x B (20 % of a MobileNetV3's time at 128 px, measured), and ORT's float
    transpose and row flips are faster than its 3-byte uint8 ones. False when the graph has no such start."""
    norm = normalised_tensor(graph)
    if norm is None:
        return False
    nodes, inits, out = view_nodes(views, norm, prefix, "nchw")
    for node in graph.node:
        node.input[:] = [out if name == norm else name for name in node.input]
    at = next(i for i, n in enumerate(graph.node) if norm in n.output) + 1
    ordered = list(graph.node[:at]) + nodes + list(graph.node[at:])  # topological order kept
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(inits)
    return True


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
    prefixed = [compose.add_prefix(m, f"m{i}_") for i, m in enumerate(models)]  # unique names
    inside = len(views) > 1 and all(normalised_tensor(p.graph) for p in prefixed)
    nodes, inits, member_in = ([], [], INPUT) if inside or len(views) == 1 else view_nodes(views)
    outs = []
    for i, p in enumerate(prefixed):
        if inside:
            _member_views(p.graph, views, f"m{i}_tta_")
        for node in p.graph.node:  # every member reads the shared input (or the views stacked from it)
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

"""Fuse every member's deployable graph into one graph that outputs the weighted mean probability,
so the whole ensemble is one engine call per batch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import compose, helper, numpy_helper

from .surgery import INPUT, OUTPUT, set_metadata


def fuse_graphs(models: list[onnx.ModelProto], weights) -> onnx.ModelProto:
    w = (np.asarray(weights, np.float64) / np.sum(weights)).astype(np.float32)
    nodes, inits, outs = [], [], []
    for i, m in enumerate(models):
        p = compose.add_prefix(m, f"m{i}_")  # unique names; then every member reads the shared input
        for node in p.graph.node:
            node.input[:] = [INPUT if name == f"m{i}_{INPUT}" else name for name in node.input]
        nodes += list(p.graph.node)
        inits += list(p.graph.initializer) + [numpy_helper.from_array(w[i:i + 1], f"m{i}_ensemble_weight")]
        nodes.append(helper.make_node("Mul", [f"m{i}_{OUTPUT}", f"m{i}_ensemble_weight"], [f"m{i}_weighted"]))
        outs.append(f"m{i}_weighted")
    nodes.append(helper.make_node("Sum", outs, [OUTPUT]))
    first = models[0].graph
    graph = helper.make_graph(nodes, "wbc_edge_ensemble", [first.input[0]], [first.output[0]], inits)
    fused = helper.make_model(graph, opset_imports=list(models[0].opset_import))
    fused.ir_version = models[0].ir_version
    onnx.checker.check_model(fused)
    return fused


def fuse_bundle(bundle, name: str = "ensemble.onnx") -> Path:
    """Write the fused graph beside the members and register it in the bundle (`fused`)."""
    models = [onnx.load(str(bundle.path(m.onnx))) for m in bundle.members]
    weights = [m.weight for m in bundle.members]
    fused = set_metadata(fuse_graphs(models, weights), {"classes": bundle.classes,
                                                        "preprocess": bundle.preprocess.to_dict(),
                                                        "members": [m.name for m in bundle.members],
                                                        "ensemble_weights": weights})
    onnx.save(fused, str(bundle.path(name)))
    bundle.extra["fused"] = {"onnx": name, "members": [m.name for m in bundle.members], "weights": weights}
    return bundle.path(name)

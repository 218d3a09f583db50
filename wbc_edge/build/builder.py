"""`wbc-edge build`: turn a bundle's members into the artifacts of a target (no torch needed)."""
from __future__ import annotations

import logging

from ..bundle import Bundle
from .surgery import build_member_graph
from .targets import TARGETS

log = logging.getLogger("wbc_edge.build")


def build_onnx(bundle: Bundle) -> Bundle:
    """Re-run graph surgery from each member's raw export (uint8 in, softmax out, metadata)."""
    pp = bundle.preprocess
    for m in bundle.members:
        raw = m.artifacts.get("raw-onnx")
        if not raw:
            raise ValueError(f"{bundle.root}: member {m.name!r} has no raw ONNX export to build from")
        m.onnx = f"{m.name}.onnx"
        build_member_graph(bundle.path(raw), bundle.path(m.onnx), pp.mean, pp.std,
                           {"classes": bundle.classes, "preprocess": pp.to_dict(), "member": m.name,
                            "arch": m.arch, "ensemble_weight": m.weight})
    return bundle


BUILDERS = {"onnx": build_onnx}


def build(bundle_dir, target: str, **options) -> Bundle:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    if target not in BUILDERS:
        raise NotImplementedError(f"target {target!r} is not implemented yet")
    bundle = Bundle.load(bundle_dir)
    bundle = BUILDERS[target](bundle, **options)
    bundle.save()
    log.info("built %s for %s", target, bundle.root)
    return bundle

"""One ensemble bundle from several trained bundles (e.g. a BatchNorm and a GroupNorm member trained
in separate runs): `wbc-edge combine A B --out C`.

Members that fail differently average each other's errors away; the trainer can train several members
in one run, but a member trained last week should not have to be trained again to join. The sources
must agree on what a member sees and says: classes (in order), preprocessing, physical scale, colour
anchors and stain step. The combined bundle's temperature and drift statistics describe the new
ensemble, so they are fitted again (`val`, `drift_cells`); built artifacts (INT8 graphs, engines, the
fused graph) and refinement are not carried over: rebuild/refit them for the ensemble.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from ..bundle import Bundle, Member
from ..outdir import LOCK_NAME, owns_output

log = logging.getLogger(__name__)

NOT_CARRIED = ("fused", "calibration", "parity", "confidence", "drift", "refine", "adapt")
SCALE_TOLERANCE = 0.05  # red-cell diameters of the sources' training cells may differ by 5 %
ANCHOR_TOLERANCE = 6.0  # grey levels between the sources' colour anchors


def check_compatible(bundles: list[Bundle]) -> list[str]:
    """Refuse sources a member-average cannot mix -> notes on small differences that were accepted."""
    first, notes = bundles[0], []
    for b in bundles[1:]:
        if b.classes != first.classes:
            raise ValueError(f"{b.root}: classes {b.classes} differ from {first.root}'s {first.classes}")
        if b.preprocess.to_dict() != first.preprocess.to_dict():
            raise ValueError(f"{b.root}: preprocessing {b.preprocess.to_dict()} differs from {first.root}'s "
                             f"{first.preprocess.to_dict()}")
        if bool(b.extra.get("anchor")) != bool(first.extra.get("anchor")):
            raise ValueError(f"{b.root} and {first.root}: one anchors colours and the other does not")
        if b.extra.get("stain", {}).get("normalise") != first.extra.get("stain", {}).get("normalise"):
            raise ValueError(f"{b.root} and {first.root}: one normalises stain and the other does not")
        notes += _close(first, b, "scale", "rbc_px", SCALE_TOLERANCE * first.extra.get("scale", {}).get("rbc_px", 0))
        for key in ("background", "dark"):
            notes += _close(first, b, "anchor", key, ANCHOR_TOLERANCE)
    return notes


def _close(first: Bundle, other: Bundle, section: str, key: str, tolerance: float) -> list[str]:
    a, b = first.extra.get(section, {}).get(key), other.extra.get(section, {}).get(key)
    if a is None and b is None:
        return []
    if a is None or b is None or np.max(np.abs(np.subtract(a, b))) > tolerance:
        raise ValueError(f"{other.root}: {section}.{key} {b} differs from {first.root}'s {a} by more than "
                         f"{tolerance:g}: the members were trained on differently prepared cells")
    return [f"{section}.{key}: {first.root} {a} used ({other.root}: {b})"] if a != b else []


@owns_output("out")
def combine(sources, out, weights=None, val=None, drift_cells=None) -> Bundle:
    """Write the ensemble of every member of `sources` (bundle dirs) to `out` -> the new bundle.
    `weights`: one per source (its members' ensemble weights are scaled by it); `val`: labelled held-out
    cells to fit the ensemble's temperature on; `drift_cells`: the training cells for the drift monitor."""
    bundles = [Bundle.load(s) for s in sources]
    if len(bundles) < 2:
        raise ValueError("combine needs at least two bundles")
    weights = [1.0] * len(bundles) if weights is None else list(weights)
    if len(weights) != len(bundles) or min(weights) < 0 or not sum(weights) > 0:
        raise ValueError(f"weights {weights}: one non-negative weight per bundle, not all zero")
    out = Path(out)
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; choose a new --out directory")
    notes = check_compatible(bundles)
    out.mkdir(parents=True, exist_ok=True)
    members = []
    for b, w in zip(bundles, weights):
        for m in b.members:
            members.append(_copy_member(b, m, out, f"m{len(members)}", w))
    first = bundles[0]
    extra = {k: v for k, v in first.extra.items() if k not in NOT_CARRIED}
    extra["training"] = {"combined": {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "notes": notes,
        "sources": [{"bundle": str(b.root), "created": json.loads(b.manifest_path.read_text()).get("created"),
                     "weight": w,
                     "members": [f"{m.name} ({m.arch})" for m in b.members],
                     "training": b.extra.get("training", {})} for b, w in zip(bundles, weights)]}}
    bundle = Bundle(out, list(first.classes), first.preprocess, members, extra)
    bundle.save()
    for note in notes:
        log.warning("combine: %s", note)
    return refit(bundle, val, drift_cells)


def _copy_member(src: Bundle, m: Member, out: Path, name: str, weight: float) -> Member:
    """The member's weights and graph under its new name (the graph's own metadata names it too)."""
    import onnx

    from ..build.surgery import set_metadata

    files = {}
    if m.weights:
        files["weights"] = f"{name}{Path(m.weights).suffix}"
        shutil.copy2(src.path(m.weights), out / files["weights"])
    if m.onnx:
        files["onnx"] = f"{name}.onnx"
        graph = onnx.load(str(src.path(m.onnx)))
        meta = {p.key: p.value for p in graph.metadata_props}
        onnx.save(set_metadata(graph, {**meta, "member": name}), str(out / files["onnx"]))
    return Member(name=name, arch=m.arch, weight=m.weight * weight, fold=m.fold, arch_kwargs=dict(m.arch_kwargs),
                  **files)


def refit(bundle: Bundle, val=None, drift_cells=None) -> Bundle:
    """The ensemble's own temperature and drift statistics (the sources' describe other models)."""
    if val:
        from ..edge.confidence import fit_bundle_temperature

        t = fit_bundle_temperature(bundle, val)
        log.info("ensemble temperature %.3f: ECE %.4f -> %.4f on %s", t["temperature"], t["ece_before"],
                 t["ece_after"], val)
    else:
        log.warning("combine: no --val cells; the ensemble's confidence is not calibrated (temperature 1)")
    if drift_cells:
        from ..edge.drift import fit_drift

        fit_drift(bundle, drift_cells)
    else:
        log.warning("combine: no --drift-cells; the drift monitor has no training statistics for this bundle")
    return bundle

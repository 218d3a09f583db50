"""Refinement phase 3, the biological filter for confusion pairs (common A, rare B).

When the ensemble says A and B is close behind (p_B >= close x p_A), the cell switches to B if its
morphology (nucleus area, N:C ratio, lobes, spikiness, ...) is nearer B's model than A's by
Mahalanobis distance. Generalises the WBCBench entry's PLY/LY and PC/LY rules to any pair.
"""
from __future__ import annotations

import numpy as np

# (common, rare). Pairs whose classes the bundle lacks (PLY, PC, VLY are not in PBC) are skipped.
DEFAULT_PAIRS = (("LY", "PLY"), ("LY", "PC"), ("LY", "VLY"), ("SNE", "BNE"), ("MY", "PMY"), ("MMY", "MY"),
                 ("MO", "LY"))
CLOSE = 0.25


def active_pairs(pairs, classes, model) -> list[tuple[str, str]]:
    modelled = set(model.classes)
    return [(a, b) for a, b in pairs if a in classes and b in classes and a in modelled and b in modelled]


def bio_filter(probs: np.ndarray, pred: np.ndarray, feats: np.ndarray, model, classes: list[str],
               pairs=DEFAULT_PAIRS, close: float = CLOSE) -> tuple[np.ndarray, list[list[dict]]]:
    """(new class indices, per-cell changes) after checking every configured pair."""
    new = pred.copy()
    changes: list[list[dict]] = [[] for _ in range(len(pred))]
    for a, b in active_pairs(pairs, classes, model):
        ia, ib = classes.index(a), classes.index(b)
        idx = np.flatnonzero((new == ia) & (probs[:, ib] >= close * probs[:, ia]))
        if not len(idx):
            continue
        nearer_b = model.distance(feats[idx], b) < model.distance(feats[idx], a)
        for i in idx[nearer_b]:
            new[i] = ib
            changes[i].append({"phase": "morphology", "from": a, "to": b})
    return new, changes


def pair_confusion(y: np.ndarray, pred: np.ndarray, classes: list[str], pairs) -> dict:
    """For each pair: how many true A were called B and true B called A."""
    out = {}
    for a, b in pairs:
        if a in classes and b in classes:
            ia, ib = classes.index(a), classes.index(b)
            out[f"{a}/{b}"] = {f"{a}->{b}": int(((y == ia) & (pred == ib)).sum()),
                               f"{b}->{a}": int(((y == ib) & (pred == ia)).sum())}
    return out

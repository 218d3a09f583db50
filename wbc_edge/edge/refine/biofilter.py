"""Refinement phase 3, the biological filter for confusion pairs (common A, rare B).

When the ensemble says A and B is close behind (p_B >= close x p_A), the cell switches to B if its
morphology (nucleus area, N:C ratio, lobes, spikiness, ...) is nearer B's model than A's by
Mahalanobis distance, or if it is an outlier for A on the pair's configured feature (z above the
limit in A's own spread: a spiky "lymphocyte" is a prolymphocyte candidate even where no
prolymphocyte was ever seen in training). Generalises the WBCBench entry's PLY/LY and PC/LY rules to
any pair.
"""
from __future__ import annotations

import numpy as np

# (common, rare). Pairs whose classes the bundle lacks (PLY, PC, VLY are not in PBC) are skipped.
DEFAULT_PAIRS = (("LY", "PLY"), ("LY", "PC"), ("LY", "VLY"), ("SNE", "BNE"), ("MY", "PMY"), ("MMY", "MY"),
                 ("MO", "LY"))
CLOSE = 0.25
# "A/B" -> (feature, z): an A cell whose feature lies more than z of A's standard deviations above A's
# mean is taken for B (when B is close behind). The WBCBench entry's rules: spiky nuclear outline for
# prolymphocytes, an eccentric nucleus for plasma cells, a larger N:C ratio for variant lymphocytes.
DEFAULT_OUTLIERS = {"LY/PLY": ("spikiness", 2.5), "LY/PC": ("centroid_offset", 2.5), "LY/VLY": ("nc_ratio", 2.5)}


def active_pairs(pairs, classes, model, outliers=None) -> list[tuple[str, str]]:
    """Pairs whose two classes the bundle has, where A is modelled and B is modelled or has an outlier rule."""
    modelled, outliers = set(model.classes), outliers or {}
    return [(a, b) for a, b in pairs if a in classes and b in classes and a in modelled
            and (b in modelled or f"{a}/{b}" in outliers)]


def outlier_z(model, feats: np.ndarray, cls: str, feature: str) -> np.ndarray:
    """How many of `cls`'s standard deviations each cell's `feature` lies above `cls`'s mean."""
    f = model.feature_names.index(feature)
    m = model.classes[cls]
    z = model.standardise(feats)[:, f]
    return (z - m.mean[f]) / np.sqrt(max(float(m.cov[f, f]), 1e-12))


def bio_filter(probs: np.ndarray, pred: np.ndarray, feats, model, classes: list[str],
               pairs=DEFAULT_PAIRS, close: float = CLOSE, outliers=None) -> tuple[np.ndarray, list[list[dict]]]:
    """(new class indices, per-cell changes) after checking every configured pair. `feats`: the cells'
    features (B x F), or a function of cell indices returning their rows (computed only when needed)."""
    outliers = DEFAULT_OUTLIERS if outliers is None else outliers
    feats_of = feats if callable(feats) else (lambda idx: feats[idx])
    new = pred.copy()
    changes: list[list[dict]] = [[] for _ in range(len(pred))]
    for a, b in active_pairs(pairs, classes, model, outliers):
        ia, ib = classes.index(a), classes.index(b)
        idx = np.flatnonzero((new == ia) & (probs[:, ib] >= close * probs[:, ia]))
        if not len(idx):
            continue
        switch, rule, f = np.zeros(len(idx), bool), np.full(len(idx), "", object), feats_of(idx)
        if b in model.classes:
            switch = model.distance(f, b) < model.distance(f, a)
            rule[switch] = "nearer"
        if f"{a}/{b}" in outliers:
            feature, limit = outliers[f"{a}/{b}"]
            odd = ~switch & (outlier_z(model, f, a, feature) > limit)
            switch |= odd
            rule[odd] = f"outlier:{feature}"
        for i, r in zip(idx[switch], rule[switch]):
            new[i] = ib
            changes[i].append({"phase": "morphology", "from": a, "to": b, "rule": r})
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

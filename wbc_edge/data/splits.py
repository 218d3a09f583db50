"""Stratified, group-aware splits with a fixed seed (scikit-learn does the splitting)."""
from __future__ import annotations

import numpy as np

from .._optional import require


def kfold_indices(labels, n_splits: int, seed: int, groups=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, val) index pairs; with `groups`, no group is split across train and val."""
    ms = require("sklearn.model_selection", "train")
    y = np.asarray(labels)
    if groups is not None and any(g is not None for g in groups):
        splitter = ms.StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return [(tr, va) for tr, va in splitter.split(np.zeros(len(y)), y, np.asarray(groups))]
    splitter = ms.StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(tr, va) for tr, va in splitter.split(np.zeros(len(y)), y)]


def train_val_split(labels, val_fraction: float, seed: int, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """One stratified (group-aware) hold-out split of about `val_fraction`."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_splits = max(2, round(1 / val_fraction))
    return kfold_indices(labels, n_splits, seed, groups)[0]

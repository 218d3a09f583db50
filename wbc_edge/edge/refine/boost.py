"""Refinement phase 1, sensitivity boosting: per-class logit offsets fitted for macro-F1.

The ensemble's probabilities are calibrated to the training priors, so rare classes lose close calls.
Adding b_c to log p_c and taking the argmax moves those calls; b is fitted on labelled validation
cells by coordinate ascent on macro-F1 (a small grid per class, a few passes), or set from the class
priors (post-hoc logit adjustment, b = -tau log prior). Hand-written: no library fits per-class
decision offsets for a non-decomposable metric like macro-F1.
"""
from __future__ import annotations

import numpy as np

from ... import metrics

GRID = np.linspace(-2.0, 2.0, 21)


def _log(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probs, 1e-12, 1.0))


def adjusted(probs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Predicted class indices after adding `offsets` to the log-probabilities."""
    return np.argmax(_log(probs) + offsets[None, :], axis=1)


def fit_offsets(probs: np.ndarray, y: np.ndarray, passes: int = 3, grid=GRID) -> tuple[np.ndarray, dict]:
    """Offsets maximising macro-F1 on (probs, y); ties keep the smaller change (less overfitting)."""
    k = probs.shape[1]
    logp = _log(probs)  # once: the search below scores hundreds of trial offsets
    score = lambda off: metrics.macro_f1(y, np.argmax(logp + off[None, :], axis=1), range(k))  # noqa: E731
    offsets = np.zeros(k)
    best = score(offsets)
    start = best
    for _ in range(passes):
        improved = False
        for c in range(k):
            for v in sorted(grid, key=abs):
                trial = offsets.copy()
                trial[c] = v
                s = score(trial)
                if s > best + 1e-9:
                    best, offsets, improved = s, trial, True
        if not improved:
            break
    return offsets, {"macro_f1_before": start, "macro_f1_after": best}


def prior_offsets(priors: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """Post-hoc logit adjustment: b_c = -tau log prior_c (rare classes get the largest boost)."""
    return -tau * np.log(np.clip(np.asarray(priors, np.float64), 1e-12, 1.0))

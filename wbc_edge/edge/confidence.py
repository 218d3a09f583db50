"""Confidence calibration: one temperature for the ensemble's probabilities, fitted on validation cells.

Decoupled training and class-balanced stage 2 leave the ensemble's top-1 probability far from its
accuracy (ECE 0.14 on the sample cells), and the stream's review flags (`low_confidence`,
`rare_possible`) read that probability. Temperature scaling (Guo et al. 2017) divides the log-
probabilities by T and renormalises: the predicted class never changes, only how sure it claims to be.
T minimises the validation negative log-likelihood, a one-dimensional problem: a golden-section search
on log T, written here rather than pulling SciPy into the edge runtime.
"""
from __future__ import annotations

import json

import numpy as np

from .. import metrics
from ..xp import get_xp

T_RANGE = (0.05, 20.0)


def apply_temperature(probs, temperature: float):
    """softmax(log p / T), row-wise; the argmax is unchanged. NumPy or CuPy, in the array's own module."""
    xp = get_xp(probs)
    z = xp.log(xp.clip(probs, 1e-12, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = xp.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(xp.float32)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))


def fit_temperature(probs: np.ndarray, y: np.ndarray, iters: int = 60) -> tuple[float, dict]:
    """(T minimising NLL on (probs, y), before/after figures)."""
    lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    f = lambda t: nll(apply_temperature(probs, float(np.exp(t))), y)  # noqa: E731
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(iters):  # NLL is unimodal in log T: keep the bracket around the minimum
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    t = float(np.exp((lo + hi) / 2))
    after = apply_temperature(probs, t)
    return t, {"nll_before": nll(probs, y), "nll_after": nll(after, y),
               "ece_before": metrics.expected_calibration_error(probs, y),
               "ece_after": metrics.expected_calibration_error(after, y)}


def validation_cells(bundle, val_data, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cells at the bundle's input size, class indices, the ensemble's uncalibrated probabilities): read
    and predicted once, then shared by every fit of `wbc-edge refine`."""
    from ..data.datasets import load_bundle_cells
    from .classifier import EnsembleClassifier

    x, y = load_bundle_cells(bundle, val_data, progress)
    with EnsembleClassifier(bundle, calibrated=False) as clf:
        return x, y, clf.predict(x)


def calibrated_validation(bundle, val_data, val=None, progress: bool = False):
    """(cells, class indices, probabilities as the bundle's classifier gives them now, i.e. with its
    current temperature); from `val` (a `validation_cells` result) when given, else read and predicted."""
    x, y, raw = val if val is not None else validation_cells(bundle, val_data, progress)
    t = float((bundle.extra.get("confidence") or {}).get("temperature", 1.0))
    return x, y, (raw if t == 1.0 else apply_temperature(raw, t))


def fit_bundle_temperature(bundle, val_data, progress: bool = False, val=None) -> dict:
    """Fit T on labelled validation cells with the bundle's own (uncalibrated) ensemble; keep it only if
    it lowers the validation NLL. Stored in the bundle's `confidence` section."""
    _, y, probs = val if val is not None else validation_cells(bundle, val_data, progress)
    t, fit = fit_temperature(probs, y)
    enabled = fit["nll_after"] < fit["nll_before"]
    bundle.extra["confidence"] = {"temperature": round(t, 4) if enabled else 1.0, "fitted_temperature": t,
                                  "fitted_on": str(val_data), "n_val": int(len(y)), **fit}
    bundle.save()
    return json.loads(json.dumps(bundle.extra["confidence"]))

"""The refinement stage after the ensemble: switchable phases, every change recorded per cell.

Phases (each configured in the bundle's `refine` section, each with `enabled`):
  boost  per-class logit offsets fitted for macro-F1 on validation cells (phase 1)
Phases 2 (semantic verification) and 3 (morphology filter for confusion pairs) plug in here as
further callables of the same shape: (probs, pred, crops) -> new pred.
"""
from __future__ import annotations

import json

import numpy as np

from .boost import adjusted, fit_offsets


class Refiner:
    def __init__(self, config: dict | None, classes: list[str]):
        self.config, self.classes = config or {}, list(classes)
        boost = self.config.get("boost", {})
        self.offsets = np.asarray(boost["offsets"]) if boost.get("enabled") and "offsets" in boost else None

    @property
    def active(self) -> bool:
        return self.offsets is not None

    def __call__(self, probs: np.ndarray) -> tuple[np.ndarray, list[list[dict]]]:
        """(refined class indices, per-cell list of changes {phase, from, to})."""
        pred = probs.argmax(1)
        changes: list[list[dict]] = [[] for _ in range(len(probs))]
        if self.offsets is not None:
            new = adjusted(probs, self.offsets)
            for i in np.flatnonzero(new != pred):
                changes[i].append({"phase": "boost", "from": self.classes[pred[i]], "to": self.classes[new[i]]})
            pred = new
        return pred, changes


def fit_refinement(bundle, val_data, progress: bool = False) -> dict:
    """Fit phase 1 on labelled validation cells with the bundle's own runner; enable it only if it
    raises validation macro-F1. Stores the result in the bundle manifest."""
    from ...data.datasets import open_dataset
    from ..classifier import EnsembleClassifier

    ds = open_dataset(val_data).filter_classes(bundle.classes)
    pp = bundle.preprocess
    x, kept, _ = ds.load(pp.input_size, pp.interpolation, progress=progress)
    y = np.asarray([bundle.classes.index(ds.samples[i].label) for i in kept])
    with EnsembleClassifier(bundle) as clf:
        probs = clf.predict(x)
    # Fit on one half of the validation cells, check on the other: offsets tuned for macro-F1 overfit
    # easily, and a phase that does not help on cells it was not fitted on stays off.
    half = np.zeros(len(y), bool)
    for c in np.unique(y):
        half[np.flatnonzero(y == c)[::2]] = True
    offsets, fit = fit_offsets(probs[half], y[half])
    from ... import metrics

    k = probs.shape[1]
    check = {"check_macro_f1_before": metrics.macro_f1(y[~half], probs[~half].argmax(1), range(k)),
             "check_macro_f1_after": metrics.macro_f1(y[~half], adjusted(probs[~half], offsets), range(k))}
    boost = {"enabled": check["check_macro_f1_after"] > check["check_macro_f1_before"],
             "offsets": offsets.round(4).tolist(), "fitted_on": str(val_data), "n_val": int(len(y)), **fit, **check}
    bundle.extra.setdefault("refine", {})["boost"] = boost
    bundle.save()
    return json.loads(json.dumps(boost))

"""The refinement stage after the ensemble: switchable phases, every change recorded per cell.

Phases (each configured in the bundle's `refine` section, each with `enabled`):
  boost       per-class logit offsets fitted for macro-F1 on validation cells (phase 1)
  morphology  confusion pairs decided by per-class morphology models (phase 3; needs the crops)
Phase 2 (semantic verification against embedding prototypes) is not implemented yet.
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
        bio = self.config.get("morphology", {})
        self.bio = bio if bio.get("enabled") else None
        self._model = None

    @property
    def active(self) -> bool:
        return self.offsets is not None or self.bio is not None

    def __call__(self, probs: np.ndarray, crops=None) -> tuple[np.ndarray, list[list[dict]]]:
        """(refined class indices, per-cell list of changes {phase, from, to})."""
        pred = probs.argmax(1)
        changes: list[list[dict]] = [[] for _ in range(len(probs))]
        if self.offsets is not None:
            new = adjusted(probs, self.offsets)
            for i in np.flatnonzero(new != pred):
                changes[i].append({"phase": "boost", "from": self.classes[pred[i]], "to": self.classes[new[i]]})
            pred = new
        if self.bio is not None and crops is not None and len(crops):
            from .biofilter import bio_filter
            from .features import morphology_features
            from .models import MorphologyModel

            self._model = self._model or MorphologyModel.from_dict(self.bio["model"])
            pred, bio_changes = bio_filter(probs, pred, morphology_features(crops), self._model, self.classes,
                                           [tuple(p) for p in self.bio["pairs"]], self.bio["close"])
            for c, extra in zip(changes, bio_changes):
                c.extend(extra)
        return pred, changes


def fit_refinement(bundle, val_data, progress: bool = False) -> dict:
    """Fit phase 1 on labelled validation cells with the bundle's own runner; enable it only if it
    raises validation macro-F1. Stores the result in the bundle manifest."""
    from ..classifier import EnsembleClassifier

    x, y = labelled(bundle, val_data, progress)
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


def labelled(bundle, data, progress: bool = False):
    """The bundle's classes' cells of `data`, at the bundle's input size -> (images, class indices)."""
    from ...data.datasets import load_labelled

    pp = bundle.preprocess
    return load_labelled(data, bundle.classes, pp.input_size, pp.interpolation, progress)[:2]


def fit_morphology(bundle, morph_data, val_data, pairs=None, close: float | None = None, progress: bool = False) -> dict:
    """Fit per-class morphology models on `morph_data` (training cells), decide on `val_data` whether
    the phase-3 filter raises macro-F1 on top of the phases already enabled; store it in the bundle."""
    from ... import metrics
    from ..classifier import EnsembleClassifier
    from .biofilter import CLOSE, DEFAULT_PAIRS, active_pairs, bio_filter, pair_confusion
    from .features import morphology_features
    from .models import MorphologyModel

    pairs = [tuple(p) for p in (pairs or DEFAULT_PAIRS)]
    xm, ym = labelled(bundle, morph_data, progress)
    model = MorphologyModel.fit(morphology_features(xm), [bundle.classes[i] for i in ym], bundle.classes)
    xv, yv = labelled(bundle, val_data, progress)
    with EnsembleClassifier(bundle) as clf:
        probs = clf.predict(xv)
    config = {k: v for k, v in bundle.extra.get("refine", {}).items() if k != "morphology"}
    base = Refiner(config, bundle.classes)(probs)[0]
    feats, k = morphology_features(xv), range(len(bundle.classes))
    # how close the rare class must be: given, or the best of a small grid on the validation cells
    grid = [close] if close is not None else [CLOSE, 0.5, 0.8]
    runs = {c: bio_filter(probs, base, feats, model, bundle.classes, pairs, c)[0] for c in grid}
    close = max(grid, key=lambda c: metrics.macro_f1(yv, runs[c], k))
    after = runs[close]
    used = active_pairs(pairs, bundle.classes, model)
    result = {"pairs": [list(p) for p in used], "close": close, "fitted_on": str(morph_data), "n_fit": int(len(ym)),
              "checked_on": str(val_data), "n_val": int(len(yv)),
              "val_macro_f1_before": metrics.macro_f1(yv, base, k), "val_macro_f1_after": metrics.macro_f1(yv, after, k),
              "pairs_before": pair_confusion(yv, base, bundle.classes, used),
              "pairs_after": pair_confusion(yv, after, bundle.classes, used)}
    result["enabled"] = result["val_macro_f1_after"] > result["val_macro_f1_before"]
    bundle.extra.setdefault("refine", {})["morphology"] = {**result, "model": model.to_dict()}
    bundle.save()
    return result

"""Accuracy of a reduced-precision build against FP32 on labelled validation cells."""
from __future__ import annotations

import numpy as np

from .. import metrics
from ..bundle import Bundle
from ..data.datasets import load_bundle_cells
from ..edge.classifier import EnsembleClassifier


class PrecisionDropError(ValueError):
    """A quantised model lost more macro-F1 than the user allows."""


def _predict(bundle: Bundle, images: np.ndarray, artifact: str | None) -> np.ndarray:
    with EnsembleClassifier(bundle, "cpu", views=["id"], artifact=artifact) as clf:
        return clf.predict(images)


def compare_to_fp32(bundle: Bundle, val_data, artifact: str = "ort-int8", precision: str = "int8") -> dict:
    """Top-1 agreement, macro-F1 of both, the drop, and per-class recall drop (FP32 - reduced)."""
    images, y_idx = load_bundle_cells(bundle, val_data)
    y = [bundle.classes[i] for i in y_idx]
    ref, red = _predict(bundle, images, None), _predict(bundle, images, artifact)
    names = np.asarray(bundle.classes)
    rep_ref = metrics.classification_report(y, list(names[ref.argmax(1)]), bundle.classes)
    rep_red = metrics.classification_report(y, list(names[red.argmax(1)]), bundle.classes)
    return {
        "precision": precision, "artifact": artifact, "n_val": int(len(y)),
        "top1_agreement": float((ref.argmax(1) == red.argmax(1)).mean()),
        "max_abs_prob_diff": float(np.abs(ref - red).max()),
        "macro_f1_fp32": rep_ref["macro_f1"], f"macro_f1_{precision}": rep_red["macro_f1"],
        "macro_f1_drop": rep_ref["macro_f1"] - rep_red["macro_f1"],
        "recall_drop": {c: rep_ref["per_class"][c]["recall"] - rep_red["per_class"][c]["recall"]
                        for c in bundle.classes},
    }


def enforce(result: dict, max_drop: float, where: str) -> None:
    if result["macro_f1_drop"] > max_drop:
        raise PrecisionDropError(
            f"{where}: {result['precision']} loses {100 * result['macro_f1_drop']:.2f} macro-F1 points against "
            f"FP32 (allowed: {100 * max_drop:.2f}); not registered. Try another --calib-method or more "
            f"calibration images, or raise --max-f1-drop.")

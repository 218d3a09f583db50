"""More checks of wbc_edge.metrics: integer labels, other zero_division values, ECE by hand, real PNGs."""
import json

import cv2
import numpy as np
import pytest
from sklearn import metrics as skm

from wbc_edge import metrics


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("zero_division", [0.0, 1.0, float("nan")])
def test_int_labels_against_sklearn(seed, zero_division):
    rng = np.random.default_rng(100 + seed)
    classes = [3, 7, 1, 0, 9]  # not sorted: the caller's order must be kept
    n = int(rng.integers(3, 80))
    y = rng.choice([3, 7, 1], n)  # 0 and 9 absent from the truth
    p = rng.choice([7, 1, 0], n)  # 3 and 9 absent from the predictions
    rep = metrics.classification_report(y, p, classes, zero_division=zero_division)
    kw = dict(labels=classes, zero_division=zero_division)
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, p, **kw)
    for i, c in enumerate(classes):
        row = rep["per_class"][str(c)]
        got = [row["precision"], row["recall"], row["f1"], row["support"]]
        assert np.allclose(got, [prec[i], rec[i], f1[i], sup[i]], equal_nan=True)
    assert np.isclose(rep["macro_f1"], skm.f1_score(y, p, average="macro", **kw), equal_nan=True)
    ref_precision = skm.precision_score(y, p, average="macro", **kw)
    assert np.isclose(rep["macro_precision"], ref_precision, equal_nan=True)
    assert np.array_equal(metrics.confusion_matrix(y, p, classes), skm.confusion_matrix(y, p, labels=classes))


def test_nan_zero_division_gives_sklearn_balanced_accuracy_with_absent_classes():
    rng = np.random.default_rng(5)
    y = rng.choice(["LY", "MO", "SNE"], 200)
    p = rng.choice(["LY", "MO", "SNE", "BA"], 200)
    classes = ["SNE", "LY", "MO", "BA", "EO"]
    ours = metrics.balanced_accuracy(y, p, classes, zero_division=float("nan"))
    assert np.isclose(ours, skm.balanced_accuracy_score(y, p))
    # the default (0) counts the two absent classes as recall 0: 3 of 5 classes carry the same sum
    assert np.isclose(metrics.balanced_accuracy(y, p, classes), ours * 3 / 5)


def test_label_outside_classes_is_an_error():
    with pytest.raises(ValueError, match="not in classes"):
        metrics.classification_report(["LY", "XX"], ["LY", "LY"], ["LY", "MO"])


def test_report_is_json_and_text_has_every_class():
    y = np.array([0, 1, 2, 2, 1])
    rep = metrics.classification_report(y, np.array([0, 2, 2, 2, 1]), np.arange(4))
    json.dumps(rep)  # NumPy scalars must not leak into the report
    text = metrics.format_report(rep)
    assert all(f"\n{c} " in text for c in "0123") and "macro avg" in text and "balanced accuracy" in text


def _ece_by_hand(probs, y, n_bins):
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        inside = (conf > lo) & (conf <= hi) if k else (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return total


@pytest.mark.parametrize("seed", range(3))
def test_ece_against_a_loop(seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(4, 0.5), 300)
    y = rng.integers(0, 4, 300)
    for n_bins in (5, 15):
        ours = metrics.expected_calibration_error(probs, y, n_bins)
        assert np.isclose(ours, _ece_by_hand(probs, y, n_bins))


def test_ece_known_values():
    probs = np.tile([0.8, 0.2], (10, 1))
    y = np.array([0] * 8 + [1] * 2)  # 80 % right at 80 % confidence: calibrated
    assert metrics.expected_calibration_error(probs, y) == pytest.approx(0.0, abs=1e-12)
    assert metrics.expected_calibration_error(np.tile([1.0, 0.0], (4, 1)), np.array([0, 1, 0, 1])) == 0.5


def test_plots_are_decodable_images(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 13, 300)
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, 13, 300))
    cm = metrics.confusion_matrix(y, p, range(13))
    probs = rng.dirichlet(np.ones(13), 300)
    for path in (metrics.plot_confusion(cm, list(range(13)), tmp_path / "cm.png"),
                 metrics.plot_confusion(cm, list(range(13)), tmp_path / "cm_counts.png", normalize=False),
                 metrics.plot_reliability(probs, y, tmp_path / "rel.png", n_bins=10)):
        img = cv2.imread(str(path))
        assert img is not None and img.shape[0] > 200 and img.shape[1] > 200
        assert img.std() > 10  # something was drawn, not a blank canvas

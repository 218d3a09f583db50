"""Our NumPy metrics against scikit-learn (the oracle) on random labels, absent classes included."""
import numpy as np
import pytest
from sklearn import metrics as skm

from wbc_edge import metrics

CLASSES = ["SNE", "BNE", "LY", "MO", "EO", "BA", "MMY", "MY", "PMY"]


def _specificity(y, p, classes):
    cm = skm.multilabel_confusion_matrix(y, p, labels=classes)  # per class [[tn, fp], [fn, tp]]
    return np.mean([tn / (tn + fp) if tn + fp else 0.0 for (tn, fp), _ in cm])


@pytest.mark.parametrize("seed", range(6))
def test_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    y = list(rng.choice(CLASSES[: 6 + seed % 3], n))  # some classes absent from the truth
    p = list(rng.choice(CLASSES[seed % 3:], n))  # and some absent from the predictions
    rep = metrics.classification_report(y, p, CLASSES)
    kw = dict(labels=CLASSES, zero_division=0)
    assert np.isclose(rep["macro_f1"], skm.f1_score(y, p, average="macro", **kw))
    assert np.isclose(rep["macro_precision"], skm.precision_score(y, p, average="macro", **kw))
    assert np.isclose(rep["balanced_accuracy"], skm.recall_score(y, p, average="macro", **kw))
    assert np.isclose(rep["macro_specificity"], _specificity(y, p, CLASSES))
    assert np.array_equal(rep["confusion_matrix"], skm.confusion_matrix(y, p, labels=CLASSES))
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, p, **kw)
    for i, c in enumerate(CLASSES):
        row = rep["per_class"][c]
        assert np.allclose([row["precision"], row["recall"], row["f1"], row["support"]], [prec[i], rec[i], f1[i], sup[i]])
    assert np.isclose(metrics.macro_f1(y, p, CLASSES), rep["macro_f1"])


def test_balanced_accuracy_matches_sklearn_when_every_class_is_present():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 4, 500)
    p = np.where(rng.random(500) < 0.7, y, rng.integers(0, 4, 500))
    assert np.isclose(metrics.classification_report(y, p, range(4))["balanced_accuracy"],
                      skm.balanced_accuracy_score(y, p))


def test_ece_and_pictures(tmp_path):
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), 400)
    y = probs.argmax(1)  # always right: ECE = mean(1 - confidence)
    assert np.isclose(metrics.expected_calibration_error(probs, y), np.mean(1 - probs.max(1)))
    rep = metrics.classification_report(y, y, range(5))
    png = metrics.plot_confusion(np.asarray(rep["confusion_matrix"]), list("ABCDE"), tmp_path / "cm.png")
    rel = metrics.plot_reliability(probs, y, tmp_path / "rel.png")
    for f in (png, rel):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "macro-F1" in metrics.format_report(rep)

"""Confidence calibration: temperature fitted for NLL, applied by the classifier, never changing the class."""
import json
import shutil

import numpy as np

from wbc_edge import metrics
from wbc_edge.bundle import Bundle
from wbc_edge.data.datasets import load_bundle_cells, write_manifest
from wbc_edge.edge.classifier import EnsembleClassifier
from wbc_edge.edge.confidence import apply_temperature, fit_bundle_temperature, fit_temperature, nll


def _overconfident(n=2000, k=5, t_true=2.5, seed=0):
    """Labels drawn from softmax(z), reported as softmax(t_true * z): too sure by a factor t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, k))
    p_true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=p) for p in p_true])
    shown = np.exp(t_true * z)
    return shown / shown.sum(1, keepdims=True), y


def test_fit_recovers_a_known_temperature_and_keeps_the_class():
    probs, y = _overconfident()
    t, fit = fit_temperature(probs, y)
    assert abs(t - 2.5) < 0.3
    assert fit["nll_after"] < fit["nll_before"] and fit["ece_after"] < fit["ece_before"]
    grid = [nll(apply_temperature(probs, s), y) for s in (t * 0.8, t, t * 1.25)]
    assert grid[1] <= min(grid[0], grid[2])  # a minimum, not just a decrease
    assert (apply_temperature(probs, t).argmax(1) == probs.argmax(1)).all()
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, atol=1e-6)


def test_bundle_temperature_lowers_held_out_ece_and_the_classifier_applies_it(tmp_path, sample_bundle, sample_dir):
    work = tmp_path / "b"
    shutil.copytree(sample_bundle, work)
    b = Bundle.load(work)
    b.extra.pop("confidence", None)
    x, y = load_bundle_cells(b, sample_dir / "cells")
    rows = sorted(r for r in (sample_dir / "cells").glob("*/*.jpg") if r.parent.name in b.classes)
    assert [r.parent.name for r in rows] == [b.classes[i] for i in y]  # the order `labelled` read them in
    write_manifest(tmp_path / "fit.csv", ((str(r), r.parent.name) for r in rows[::2]))  # fit on every other cell
    res = fit_bundle_temperature(b, tmp_path / "fit.csv")
    saved = json.loads((work / "manifest.json").read_text())["confidence"]
    assert saved["temperature"] == res["temperature"] and res["n_val"] == 135
    test = np.ones(len(y), bool)
    test[::2] = False
    loaded = Bundle.load(work)
    with EnsembleClassifier(loaded, calibrated=False) as raw, EnsembleClassifier(loaded) as cal:
        p_raw, p_cal = raw.predict(x), cal.predict(x)
    assert (p_raw.argmax(1) == p_cal.argmax(1)).all() and not np.allclose(p_raw, p_cal)
    np.testing.assert_allclose(p_cal, apply_temperature(p_raw, res["temperature"]), atol=1e-5)
    assert metrics.expected_calibration_error(p_cal[test], y[test]) < metrics.expected_calibration_error(
        p_raw[test], y[test])

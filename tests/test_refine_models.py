"""Morphology models: Ledoit-Wolf against scikit-learn, Mahalanobis against SciPy, a JSON round trip."""
import json

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.covariance import LedoitWolf

from wbc_edge.edge.refine import features as F
from wbc_edge.edge.refine.models import MorphologyModel, ledoit_wolf, mahalanobis


@pytest.mark.parametrize("n,p", [(50, 5), (8, 14), (300, 14), (3, 2), (10, 1)])
@pytest.mark.parametrize("seed", range(3))
def test_ledoit_wolf_against_sklearn(n, p, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)) * rng.uniform(0.5, 3.0, p) + rng.normal(size=p)  # unequal scales, offset
    x[:, 0] += 0.8 * x[:, -1]  # and a correlation
    ref = LedoitWolf().fit(x)
    cov, shrinkage = ledoit_wolf(x)
    assert shrinkage == pytest.approx(ref.shrinkage_, abs=1e-12)
    assert np.allclose(cov, ref.covariance_, rtol=1e-10, atol=1e-12)


def test_mahalanobis_against_scipy():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 6))
    precision = np.linalg.inv(a @ a.T + np.eye(6))
    mean, x = rng.normal(size=6), rng.normal(size=(20, 6))
    ref = [scipy_mahalanobis(row, mean, precision) for row in x]
    assert np.allclose(mahalanobis(x, mean, precision), ref, rtol=1e-12)
    assert mahalanobis(mean, mean, precision)[0] == 0.0  # never sqrt of a tiny negative


def _classes(rng, names=("SNE", "LY", "BA"), n=(60, 40, 3), p=len(F.FEATURE_NAMES)):
    x = np.concatenate([rng.normal(loc=3.0 * k, scale=1.0 + k, size=(m, p)) for k, m in enumerate(n)])
    x[:, 0] *= 1000  # an area-like column on a much larger scale
    return x, np.repeat(names, n)


def test_model_matches_sklearn_on_standardised_features_and_round_trips():
    rng = np.random.default_rng(4)
    x, y = _classes(rng)
    model = MorphologyModel.fit(x, y, classes=["SNE", "LY", "BA", "EO"], min_samples=5)
    assert set(model.classes) == {"SNE", "LY"}  # BA has 3 cells (< min_samples), EO none
    z = (x - x.mean(0)) / x.std(0)
    ref = LedoitWolf().fit(z[y == "LY"])
    assert np.allclose(model.classes["LY"].cov, ref.covariance_, rtol=1e-10, atol=1e-12)
    probe = x[::7]
    d = model.distances(probe, ["SNE", "LY", "EO"])
    assert np.isnan(d[:, 2]).all()
    z_probe = (probe - x.mean(0)) / x.std(0)
    ref_d = [scipy_mahalanobis(r, ref.location_, np.linalg.inv(ref.covariance_)) for r in z_probe]
    assert np.allclose(d[:, 1], ref_d, rtol=1e-8)
    again = MorphologyModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert np.array_equal(again.distances(probe, ["SNE", "LY", "EO"]), d, equal_nan=True)
    assert again.feature_names == F.FEATURE_NAMES


def test_each_class_is_nearest_to_its_own_model():
    rng = np.random.default_rng(5)
    x, y = _classes(rng, n=(80, 80, 80))
    model = MorphologyModel.fit(x, y)
    nearest = np.array(list(model.classes))[np.argmin(model.distances(x), axis=1)]
    assert (nearest == y).mean() > 0.95


def test_real_lymphocytes_and_neutrophils_are_told_apart(sample_dir):
    from wbc_edge.data.images import read_image

    crops, labels = [], []
    for code in ("LY", "SNE"):
        for path in sorted((sample_dir / "cells" / code).glob("*.jpg")):
            crops.append(read_image(path))
            labels.append(code)
    feats = F.morphology_features(np.stack(crops))
    model = MorphologyModel.fit(feats, labels)
    d = model.distances(feats, ["LY", "SNE"])
    nearest = np.where(d[:, 0] < d[:, 1], "LY", "SNE")
    assert (nearest == np.array(labels)).mean() > 0.9

"""Per-class morphology models: mean + Ledoit-Wolf shrunk covariance, Mahalanobis distance for a batch.

NumPy only (scikit-learn's LedoitWolf and SciPy's mahalanobis are the test oracles). A rare class
has few training cells and ~14 features, so its sample covariance is noisy or singular; Ledoit-Wolf
shrinks it toward a scaled identity by the amount that minimises the expected error, which keeps the
inverse usable. Features are standardised first with statistics pooled over all classes, because
shrinking toward a multiple of the identity only makes sense when the features share a scale
(areas in px^2 next to ratios in 0..1 would not). The whole model is plain lists and numbers
(`to_dict`), for the bundle manifest.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .features import FEATURE_NAMES


def ledoit_wolf(x) -> tuple[np.ndarray, float]:
    """(shrunk covariance, shrinkage) of samples `x` (n x p), centred on their mean.

    Ledoit & Wolf (2004): with S the sample covariance (divided by n) and m = tr(S) / p,
        d2 = ||S - m I||_F^2 / p                        (how far S is from the target)
        b2 = min(d2, sum_k ||x_k x_k' - S||_F^2 / (n^2 p))  (how noisy S is)
        shrinkage = b2 / d2,  covariance = (1 - shrinkage) S + shrinkage m I
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"expected an n x p sample matrix, got shape {x.shape}")
    n, p = x.shape
    xc = x - x.mean(axis=0)
    s = xc.T @ xc / n
    m = np.trace(s) / p
    if p == 1:  # one feature: the target equals S; nothing to shrink
        return s, 0.0
    d2 = (np.sum(s * s) - 2 * m * np.trace(s) + p * m * m) / p
    # sum_k ||x_k x_k' - S||^2 = sum_k ||x_k||^4 - n ||S||^2, without forming n outer products
    b2 = (np.sum(np.sum(xc * xc, axis=1) ** 2) / n - np.sum(s * s)) / (n * p)
    shrinkage = 0.0 if d2 <= 0 else float(min(b2, d2) / d2)
    return (1 - shrinkage) * s + shrinkage * m * np.eye(p), shrinkage


def mahalanobis(x, mean, precision) -> np.ndarray:
    """Mahalanobis distance of each row of `x` (n x p) to `mean` under `precision` (inverse covariance)."""
    diff = np.atleast_2d(np.asarray(x, dtype=np.float64)) - np.asarray(mean, dtype=np.float64)
    d2 = np.einsum("ij,jk,ik->i", diff, np.asarray(precision, dtype=np.float64), diff)
    return np.sqrt(np.maximum(d2, 0.0))  # rounding can leave -1e-16 for a point at the mean


@dataclass
class ClassModel:
    """One class: mean and shrunk covariance in standardised feature space."""
    mean: np.ndarray
    cov: np.ndarray
    n: int
    shrinkage: float
    precision: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.cov = np.asarray(self.cov, dtype=np.float64)
        # pinv, not inv: with zero shrinkage (many samples) a constant feature leaves cov singular
        self.precision = np.linalg.pinv(self.cov, hermitian=True)


@dataclass
class MorphologyModel:
    """Per-class morphology models over named features, with pooled standardisation."""
    feature_names: tuple[str, ...]
    center: np.ndarray
    scale: np.ndarray
    classes: dict[str, ClassModel]

    @classmethod
    def fit(cls, x, y, classes: Sequence[str] | None = None, feature_names: Sequence[str] = FEATURE_NAMES,
            min_samples: int = 2) -> "MorphologyModel":
        """Fit one model per class with at least `min_samples` cells (others are left out)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray([str(v) for v in y])
        if x.ndim != 2 or x.shape[0] != y.size or x.shape[1] != len(feature_names):
            raise ValueError(f"x must be n x {len(feature_names)} with n = len(y); got {x.shape}, {y.size}")
        center, scale = x.mean(axis=0), x.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)  # a constant feature carries no information; keep it finite
        z = (x - center) / scale
        models = {}
        for c in (classes if classes is not None else sorted(set(y))):
            zc = z[y == str(c)]
            if zc.shape[0] >= min_samples:
                cov, shrink = ledoit_wolf(zc)
                models[str(c)] = ClassModel(zc.mean(axis=0), cov, int(zc.shape[0]), shrink)
        return cls(tuple(feature_names), center, scale, models)

    def standardise(self, x) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.center) / self.scale

    def distance(self, x, cls: str) -> np.ndarray:
        """Mahalanobis distance of each row of `x` (raw features) to class `cls`."""
        m = self.classes[str(cls)]
        return mahalanobis(self.standardise(x), m.mean, m.precision)

    def distances(self, x, classes: Sequence[str] | None = None) -> np.ndarray:
        """n x K distances to `classes` (default: the modelled ones); nan for a class without a model."""
        names = list(self.classes) if classes is None else [str(c) for c in classes]
        z = self.standardise(np.atleast_2d(x))
        out = np.full((z.shape[0], len(names)), np.nan)
        for k, name in enumerate(names):
            if name in self.classes:
                out[:, k] = mahalanobis(z, self.classes[name].mean, self.classes[name].precision)
        return out

    def to_dict(self) -> dict:
        """Plain lists and numbers, JSON-serialisable, for the bundle manifest."""
        return {
            "feature_names": list(self.feature_names),
            "center": self.center.tolist(),
            "scale": self.scale.tolist(),
            "classes": {name: {"mean": m.mean.tolist(), "cov": m.cov.tolist(), "n": m.n,
                               "shrinkage": m.shrinkage} for name, m in self.classes.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "MorphologyModel":
        models = {name: ClassModel(np.asarray(v["mean"]), np.asarray(v["cov"]), int(v["n"]),
                                   float(v["shrinkage"])) for name, v in d["classes"].items()}
        return cls(tuple(d["feature_names"]), np.asarray(d["center"], dtype=np.float64),
                   np.asarray(d["scale"], dtype=np.float64), models)

"""Index samplers: instance-balanced (every sample once per epoch) and class-balanced."""
from __future__ import annotations

import numpy as np


def instance_balanced(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(len(labels))


def class_balanced(labels: np.ndarray, rng: np.random.Generator, epoch_size: int | None = None) -> np.ndarray:
    """Uniform over classes, then uniform within the class (with replacement): rare classes are seen
    as often as common ones."""
    classes = np.unique(labels)
    n = epoch_size or len(labels)
    picks = rng.choice(classes, size=n)
    out = np.empty(n, np.int64)
    for c in classes:
        slots = np.flatnonzero(picks == c)
        out[slots] = rng.choice(np.flatnonzero(labels == c), size=len(slots))
    return out


SAMPLERS = {"instance": instance_balanced, "class": class_balanced}

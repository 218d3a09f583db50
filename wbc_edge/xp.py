"""The array-module switch: array code is written once against `xp` (NumPy on CPU, CuPy on GPU)."""
from __future__ import annotations

from types import ModuleType

import numpy as np


def get_xp(*arrays) -> ModuleType:
    """The array module owning `arrays` (CuPy if any is a CuPy array, else NumPy)."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy  # only reached when a CuPy array was passed in

            return cupy
    return np


def to_numpy(a) -> np.ndarray:
    """Host copy of an array from either module."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)

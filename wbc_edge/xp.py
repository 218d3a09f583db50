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


def device_xp(device: str) -> tuple[ModuleType, str | None]:
    """(the array module a run's device stages use, why not CuPy or None). NumPy on 'cpu'. On 'cuda',
    CuPy once it has allocated on a GPU; else NumPy, with the reason (no CuPy installed, no GPU, a
    driver that refuses), so a CUDA run without a usable GPU keeps its host path and says why."""
    if device != "cuda":
        return np, None
    try:
        import cupy

        cupy.zeros(1, cupy.uint8)  # imports fine without a GPU; the first allocation is the real test
    except ImportError:
        return np, "CuPy is not installed (extra `gpu`)"
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError, CompileException...: no usable device
        return np, f"CuPy cannot allocate on a GPU ({type(exc).__name__}: {str(exc).strip()[:120]})"
    return cupy, None

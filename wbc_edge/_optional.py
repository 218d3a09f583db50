"""Optional heavy imports that fail only when the path that needs them is used."""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """A feature needs a package from one of wbc-edge's extras."""


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or fail naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # the message names the fix, not just the missing module
        raise MissingExtraError(
            f"'{module}' is needed for this feature; install it with: pip install 'wbc-edge[{extra}]'"
        ) from exc


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - CuPy raises non-ImportErrors when no CUDA driver is present
        return False
    return True

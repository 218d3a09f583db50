"""Refinement: morphology features of each cell, per-class morphology models (GitHub issue #7), and
the other refinement steps that live beside them.

Names are resolved lazily (PEP 562), so importing one submodule (e.g. the logit offsets) does not
import Numba and the feature kernels.
"""
from importlib import import_module

_EXPORTS = {
    "FEATURE_NAMES": "features", "features_from_masks": "features", "morphology_features": "features",
    "segment": "features", "stain_maps": "features",
    "MorphologyModel": "models", "ledoit_wolf": "models", "mahalanobis": "models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Calibration data: a stratified set of real cells with the bundle's preprocessing."""
from __future__ import annotations

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from ..bundle import Bundle
from ..data.datasets import open_dataset
from ..edge.preprocess import Preprocessor, normalise


def calibration_images(bundle: Bundle, data, n: int = 256, seed: int = 0, progress: bool = False) -> np.ndarray:
    """Up to `n` images from `data`, stratified by label when labelled, prepared by the bundle's
    preprocessor (scale, window, resize, stain step: what the graph sees at run time)."""
    ds = open_dataset(data)
    if not len(ds):
        raise ValueError(f"{data}: no images to calibrate on")
    rng = np.random.default_rng(seed)
    labels = np.asarray([s.label or "" for s in ds.samples])
    classes = np.unique(labels)
    per_class = max(1, n // len(classes))
    picks = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes])
    images, _, errors, _ = Preprocessor.for_bundle(bundle).load(ds.subset(np.sort(picks)), progress=progress)
    if len(images) == 0:
        raise ValueError(f"{data}: none of the calibration images could be read ({errors[:3]})")
    return images


class FloatBatchReader(CalibrationDataReader):
    """Feeds normalised float NCHW batches to a raw (pre-surgery) graph's input."""

    def __init__(self, images: np.ndarray, bundle: Bundle, input_name: str = "input", batch: int = 32,
                 equal_batches: bool = False):
        pp = bundle.preprocess
        if equal_batches and len(images) > batch:
            # ORT's histogram calibrators (entropy, percentile) stack every batch's outputs into one array,
            # which fails on a short last batch: drop the remainder (fewer than `batch` cells)
            images = images[: len(images) // batch * batch]
        self.batches = [normalise(images[i:i + batch], pp.mean, pp.std) for i in range(0, len(images), batch)]
        self.input_name = input_name
        self.rewind()

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter({self.input_name: b} for b in self.batches)

"""Preprocessing shared by training and inference: resize to the bundle's size, normalise, layout.

The exported ONNX graphs take raw uint8 NHWC batches and normalise inside the graph; the PyTorch
side uses `normalise` below with the same bundle values, so both see identical inputs.
"""
from __future__ import annotations

import cv2
import numpy as np

from ..xp import get_xp

INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC,
                  "nearest": cv2.INTER_NEAREST}


def resize_batch(images, size: int, interpolation: str = "area") -> np.ndarray:
    """List/array of HxWx3 uint8 images -> uint8 BxSxSx3. A uint8 batch already SxS is returned as it is
    (callers never write into the result), so crops resized upstream cost nothing here."""
    flag = INTERPOLATIONS[interpolation]
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == (size, size, 3):
        return images
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, img in enumerate(images):  # OpenCV resizes one image per call; it is the fastest option on CPU
        out[i] = img if img.shape[:2] == (size, size) else cv2.resize(img, (size, size), interpolation=flag)
    return out


def normalise(batch, mean, std):
    """uint8 BxHxWx3 -> float32 Bx3xHxW, (x/255 - mean) / std; NumPy or CuPy in, same out."""
    xp = get_xp(batch)
    x = batch.astype(xp.float32) / 255.0
    x = (x - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)
    return xp.ascontiguousarray(x.transpose(0, 3, 1, 2))

"""Site-robust augmentation: what another lab's stain, optics and magnification do to a cell.

A model trained on one lab learns that lab's dye colours, its sharp optics and its pixel size; on
another microscope all three move at once (a Raspberry Pi camera: pale stain, soft focus, haze,
vignetting, twice the magnification). Stain augmentation in a dye (optical-density) space beats stain
normalisation across labs (Tellez et al. 2019), so each part here perturbs a physical cause, wide
enough to cover labs from pale to dark, applied to most training images:

  scale   magnification jitter around the bundle's physical scale (+-15 %), padded with background
  stain   each dye's amount (x e^+-0.7) and hue (turned up to 20 deg), re-mixed in optical density
          (`data.degrade.stain_shift`), then the lamp's white balance (per-channel gain)
  optics  soft focus (Gaussian blur), haze (contrast pulled towards the background), uneven light
          (`data.degrade.illumination`), sensor noise, JPEG

Every part runs on uint8 NHWC batches as a trainer hook `(batch, rng) -> batch`.
"""
from __future__ import annotations

import cv2
import numpy as np

from ..data import degrade
from ..edge.preprocess import background_colour

PARTS = ("scale", "stain", "optics")  # scale first: its padding then gets the same stain and optics
DYE_AMOUNT = 0.7  # log-scale of each dye's amount: e^0.7 = 2x darker or paler
DYE_TURN = 20.0  # degrees a dye's colour may turn
WHITE_BALANCE = 0.15  # log gain per channel
BLUR_SIGMA = 2.0  # px at the model's input size
HAZE = 0.6  # contrast kept: 1 - U(0, HAZE)
NOISE_SIGMA = 6.0  # grey levels
SCALE_JITTER = 0.15  # log zoom


def stain(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = degrade.stain_shift(im[None], (rng.uniform(0, DYE_TURN), DYE_AMOUNT), rng)[0]
    gain = np.exp(rng.uniform(-WHITE_BALANCE, WHITE_BALANCE, 3)).astype(np.float32)
    return np.clip(out * gain, 0, 255).astype(np.uint8)


def optics(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = im.astype(np.float32)
    sigma = rng.uniform(0, BLUR_SIGMA)
    if sigma > 0.3:
        x = cv2.GaussianBlur(x, (0, 0), sigma)
    keep = 1.0 - rng.uniform(0, HAZE)
    x = keep * x + (1 - keep) * np.asarray(background_colour(im), np.float32)
    x = degrade.illumination(np.clip(x, 0, 255).astype(np.uint8)[None], rng.uniform(0, 0.4), rng)[0].astype(np.float32)
    x += rng.normal(0, rng.uniform(0, NOISE_SIGMA), x.shape).astype(np.float32)
    out = np.clip(x, 0, 255).astype(np.uint8)
    return degrade.jpeg(out[None], int(rng.integers(40, 96)), rng)[0] if rng.random() < 0.3 else out


def scale(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zoom about the centre by e^U(-j, j); what leaves the frame is filled with the background."""
    z = float(np.exp(rng.uniform(-SCALE_JITTER, SCALE_JITTER)))
    h, w = im.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 0.0, z)
    bg = tuple(float(v) for v in background_colour(im))
    return cv2.warpAffine(im, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=bg)


FUNCTIONS = {"stain": stain, "optics": optics, "scale": scale}


def site_hook(p: float = 0.8, parts=PARTS):
    """A trainer uint8 hook: each image, with probability p, gets every part in `parts` (in order)."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown site augmentation parts {unknown}; choose from {', '.join(PARTS)}")
    fns = [FUNCTIONS[k] for k in PARTS if k in parts]

    def hook(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = batch.copy()
        for i in np.flatnonzero(rng.random(len(batch)) < p):
            for fn in fns:
                out[i] = fn(out[i], rng)
        return out
    return hook

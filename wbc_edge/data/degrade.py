"""Scanner and stain degradations at four severities (WBCBench-style), deterministic per seed.

Used three ways: as training augmentation (`random_degradation`), as a robustness benchmark
(`degrade_dataset` writes degraded copies + a manifest), and from `wbc-edge degrade`.
Every function takes and returns uint8 BxHxWx3 RGB batches and draws randomness only from `rng`.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .images import ImageReadError, read_image


def _clip(x) -> np.ndarray:
    return np.clip(x, 0, 255).astype(np.uint8)


def gaussian_noise(batch, sigma, rng):
    return _clip(batch + rng.normal(0.0, sigma, batch.shape))


def salt_pepper(batch, amount, rng):
    out = batch.copy()
    hit = rng.random(batch.shape[:3]) < amount
    out[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0, 255)[:, None]
    return out


def gaussian_blur(batch, sigma, rng):
    return np.stack([cv2.GaussianBlur(im, (0, 0), sigma) for im in batch])


def defocus_blur(batch, radius, rng):
    """Out-of-focus optics: convolution with a uniform disc."""
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)).astype(np.float32)
    k /= k.sum()
    return np.stack([cv2.filter2D(im, -1, k, borderType=cv2.BORDER_REFLECT) for im in batch])


def motion_blur(batch, length, rng):
    """Stage movement during exposure: a line kernel at a random angle per image."""
    out = []
    for im in batch:
        k = np.zeros((length, length), np.float32)
        k[length // 2, :] = 1.0
        rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), float(rng.uniform(0, 180)), 1.0)
        k = cv2.warpAffine(k, rot, (length, length))
        out.append(cv2.filter2D(im, -1, k / max(k.sum(), 1e-6), borderType=cv2.BORDER_REFLECT))
    return np.stack(out)


def illumination(batch, strength, rng):
    """Uneven illumination: a multiplicative linear gradient (1 +- strength/2) at a random angle."""
    b, h, w, _ = batch.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty_like(batch)
    for i in range(b):
        a = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(a) * (xx / w - 0.5) + np.sin(a) * (yy / h - 0.5)) * strength * 1.41
        out[i] = _clip(batch[i] * (1.0 + ramp)[..., None])
    return out


def gamma(batch, g, rng):
    """Exposure / camera response: gamma g or 1/g (random direction per image), via a lookup table."""
    out = np.empty_like(batch)
    for i in range(len(batch)):
        e = g if rng.random() < 0.5 else 1.0 / g
        lut = _clip(255.0 * (np.arange(256) / 255.0) ** e)
        out[i] = lut[batch[i]]
    return out


def jpeg(batch, quality, rng):
    out = []
    for im in batch:
        ok, buf = cv2.imencode(".jpg", im[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        out.append(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    return np.stack(out)


def stain_shift(batch, sigma, rng):
    """Another lab's stain: each image's stain vectors perturbed and dye amounts rescaled (by ~sigma).

    Applied as a change of optical density, OD' = OD + C (M' s - M)^T, so unstained background and
    the morphology stay exactly as they were; only the dyes' colours and strengths move.
    """
    from ..edge.stain import concentrations, estimate_stains, optical_density

    m, c, ok = estimate_stains(batch)
    out = batch.copy()
    for i in np.flatnonzero(ok):
        new = np.abs(m[i] + rng.normal(0, sigma, (3, 2)))
        new /= np.linalg.norm(new, axis=0, keepdims=True)
        new *= rng.uniform(1 - sigma, 1 + sigma, 2)[None, :]  # dye amount
        conc = concentrations(optical_density(batch[i:i + 1]), m[i][None])[0]  # (N, 2)
        delta = conc @ (new - m[i]).T.astype(np.float32)
        out[i] = _clip(batch[i].reshape(-1, 3) * np.exp(-delta)).reshape(batch[i].shape)
    return out


@dataclass(frozen=True)
class Kind:
    fn: Callable
    levels: tuple  # the parameter at severities 1..4
    description: str


KINDS: dict[str, Kind] = {
    "gaussian_noise": Kind(gaussian_noise, (4.0, 8.0, 16.0, 28.0), "sensor noise, sigma in grey levels"),
    "salt_pepper": Kind(salt_pepper, (0.005, 0.01, 0.03, 0.06), "impulse noise, fraction of pixels"),
    "gaussian_blur": Kind(gaussian_blur, (0.6, 1.0, 1.6, 2.4), "blur, sigma in pixels"),
    "defocus_blur": Kind(defocus_blur, (1, 2, 3, 5), "out of focus, disc radius in pixels"),
    "motion_blur": Kind(motion_blur, (3, 5, 9, 13), "motion, line length in pixels"),
    "illumination": Kind(illumination, (0.15, 0.3, 0.45, 0.6), "uneven light, gradient strength"),
    "gamma": Kind(gamma, (1.25, 1.5, 1.8, 2.2), "exposure, gamma or 1/gamma"),
    "jpeg": Kind(jpeg, (60, 40, 25, 12), "compression, JPEG quality"),
    "stain_shift": Kind(stain_shift, (0.05, 0.1, 0.15, 0.25), "another lab's stain, perturbation scale"),
}


def apply(batch: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    if kind not in KINDS:
        raise ValueError(f"unknown degradation {kind!r}; choose from {', '.join(KINDS)}")
    if severity not in (1, 2, 3, 4):
        raise ValueError(f"severity must be 1..4, got {severity}")
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected a uint8 BxHxWx3 batch, got {batch.dtype} {batch.shape}")
    return KINDS[kind].fn(batch, KINDS[kind].levels[severity - 1], rng)


def random_degradation(batch: np.ndarray, rng: np.random.Generator, p: float = 0.3, max_severity: int = 3,
                       kinds=None) -> np.ndarray:
    """Training augmentation: each image, with probability p, gets one random kind at a random severity."""
    kinds = list(kinds or KINDS)
    out = batch.copy()
    for i in np.flatnonzero(rng.random(len(batch)) < p):
        out[i] = apply(batch[i:i + 1], kinds[rng.integers(len(kinds))], int(rng.integers(1, max_severity + 1)),
                       rng)[0]
    return out


def degradation_hook(p: float = 0.3, max_severity: int = 3):
    """A trainer uint8 hook (batch, rng) -> batch."""
    return lambda batch, rng: random_degradation(batch, rng, p, max_severity)


def degrade_dataset(src, dst, kind: str, severity: int, seed: int = 0, progress: bool = True) -> Path:
    """Degraded PNG copies of a dataset + `manifest.csv` (path,label,kind,severity,seed,source,error).

    Image i uses the generator seeded by (seed, i): deterministic and independent of batch order.
    """
    from tqdm.auto import tqdm

    from .datasets import open_dataset

    ds = open_dataset(src)
    dst = Path(dst)
    rows = []
    for i, s in enumerate(tqdm(ds.samples, desc=f"{kind} s{severity}", unit="img", disable=not progress)):
        rel = Path(s.label or "") / (Path(s.path).stem + ".png")
        row = {"path": str(rel), "label": s.label or "", "kind": kind, "severity": severity, "seed": seed,
               "source": s.path, "error": ""}
        try:
            img = read_image(s.path)
            out = apply(img[None], kind, severity, np.random.default_rng([seed, i]))[0]
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(dst / rel), out[..., ::-1])
        except ImageReadError as exc:
            row.update(path="", error=exc.reason)
        rows.append(row)
    dst.mkdir(parents=True, exist_ok=True)
    with open(dst / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["path", "label"])
        w.writeheader()
        w.writerows(rows)
    return dst / "manifest.csv"

"""Scanner and stain degradations at four severities, deterministic per seed.

Used three ways: as training augmentation (`random_degradation`), as a robustness benchmark
(`degrade_dataset` writes degraded copies + a manifest), and from `wbc-edge degrade` (whose --kind
choices are the keys of `KINDS`). Every function takes and returns uint8 BxHxWx3 RGB batches and draws
its randomness only from the `rng` it is given, image by image in batch order.
"""
from __future__ import annotations

import csv
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from ..outdir import owns_output
from .images import ImageReadError, read_image

SEVERITIES = (1, 2, 3, 4)


def _clip(x) -> np.ndarray:
    return np.clip(x, 0, 255).astype(np.uint8)


def gaussian_noise(batch, sigma, rng):
    """Sensor (read + shot) noise, approximated as additive Gaussian with `sigma` grey levels."""
    return _clip(batch + sigma * rng.standard_normal(batch.shape, dtype=np.float32))


def salt_pepper(batch, amount, rng):
    """Impulse noise (dead / hot pixels, bit errors): a fraction `amount` of pixels set to 0 or 255."""
    out = batch.copy()
    hit = rng.random(batch.shape[:3]) < amount
    out[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0, 255).astype(np.uint8)[:, None]
    return out


def gaussian_blur(batch, sigma, rng):
    """Soft optics or a resampling step: Gaussian blur of `sigma` pixels."""
    return np.stack([cv2.GaussianBlur(im, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) for im in batch])


def defocus_blur(batch, radius, rng):
    """Out-of-focus optics: convolution with a uniform disc of `radius` pixels."""
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)).astype(np.float32)
    k /= k.sum()
    return np.stack([cv2.filter2D(im, -1, k, borderType=cv2.BORDER_REFLECT) for im in batch])


def _line_kernel(length: int, angle_deg: float) -> np.ndarray:
    k = np.zeros((length, length), np.float32)
    k[length // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), angle_deg, 1.0)
    k = cv2.warpAffine(k, rot, (length, length))
    return k / max(float(k.sum()), 1e-6)


def motion_blur(batch, length, rng):
    """Stage movement during exposure: a line kernel of `length` pixels at a random angle per image."""
    angles = rng.uniform(0, 180, len(batch))
    return np.stack([cv2.filter2D(im, -1, _line_kernel(length, float(a)), borderType=cv2.BORDER_REFLECT)
                     for im, a in zip(batch, angles)])


def illumination(batch, strength, rng):
    """Uneven (Koehler-misaligned) light: a multiplicative linear ramp, 1 +- strength/2 across the
    image diagonal, at a random angle per image."""
    b, h, w, _ = batch.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angles = rng.uniform(0, 2 * np.pi, b)
    out = np.empty_like(batch)
    for i, a in enumerate(angles):
        ramp = (np.cos(a) * (xx / w - 0.5) + np.sin(a) * (yy / h - 0.5)) * (strength * np.sqrt(2))
        out[i] = _clip(batch[i] * (1.0 + ramp)[..., None])
    return out


def gamma(batch, level, rng):
    """Exposure / camera response: gamma g or 1/g and a brightness gain 1 +- b (random directions per
    image), as one 256-entry lookup table per image."""
    g, b = level
    out = np.empty_like(batch)
    flips = rng.random((len(batch), 2)) < 0.5
    for i, (flip_g, flip_b) in enumerate(flips):
        e = g if flip_g else 1.0 / g
        gain = 1.0 + (b if flip_b else -b)
        out[i] = _clip(255.0 * gain * (np.arange(256) / 255.0) ** e)[batch[i]]
    return out


def jpeg(batch, quality, rng):
    """Compression by a scanner or a PACS: JPEG at `quality` (encoded as BGR, as cameras do)."""
    out = []
    for im in batch:
        bgr = np.ascontiguousarray(im[..., ::-1])
        _, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        out.append(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    return np.stack(out)


def _rotate_towards_random(v: np.ndarray, angle_deg: float, rng) -> np.ndarray:
    """Unit vector at `angle_deg` from unit `v`, in a random direction, kept non-negative (dyes absorb)."""
    u = rng.standard_normal(3)
    u -= (u @ v) * v
    u /= np.linalg.norm(u)
    t = np.radians(angle_deg)
    w = np.maximum(np.cos(t) * v + np.sin(t) * u, 0.0)
    return w / np.linalg.norm(w)


def stain_shift(batch, level, rng):
    """Another lab's stain: each dye's colour turned by `angle` degrees and its amount scaled by
    exp(+-s), random per image.

    Pixels are unmixed with a fixed generic MGG dye pair (stain.MGG_STAINS, not the per-image Macenko
    estimate, so a benchmark does not test the normaliser against its own model) and re-mixed with the
    perturbed pair: OD' = OD + (M' diag(s) - M) C. The part of the OD the two dyes do not explain is
    kept, so morphology and noise are untouched; for one lab-wide shift, pass the same seed per image.
    """
    from ..edge.stain import MGG_STAINS, optical_density

    angle, s = level
    m = MGG_STAINS
    conc = np.linalg.pinv(m).astype(np.float32) @ optical_density(batch)  # (B, 2, N)
    out = np.empty_like(batch)
    for i in range(len(batch)):
        new = np.stack([_rotate_towards_random(m[:, k], angle, rng) for k in range(2)], axis=1)
        new = new * np.exp(rng.uniform(-s, s, 2))[None, :]
        delta = (new - m).astype(np.float32) @ conc[i]  # (3, N) change of OD
        out[i] = _clip(batch[i].reshape(-1, 3) * np.exp(-delta.T)).reshape(batch.shape[1:])
    return out


@dataclass(frozen=True)
class Kind:
    fn: Callable  # (uint8 batch, level, rng) -> uint8 batch
    levels: tuple  # the parameter at severities 1..4
    description: str
    param: str = ""  # what a level is, for tables and --help


KINDS: dict[str, Kind] = {
    "gaussian_noise": Kind(gaussian_noise, (4.0, 8.0, 16.0, 28.0), "sensor noise", "sigma (grey levels)"),
    "salt_pepper": Kind(salt_pepper, (0.005, 0.01, 0.03, 0.06), "impulse noise", "fraction of pixels"),
    "gaussian_blur": Kind(gaussian_blur, (0.6, 1.0, 1.6, 2.4), "blur", "sigma (px)"),
    "defocus_blur": Kind(defocus_blur, (1, 2, 3, 5), "out of focus", "disc radius (px)"),
    "motion_blur": Kind(motion_blur, (3, 5, 9, 13), "stage motion", "line length (px)"),
    "illumination": Kind(illumination, (0.15, 0.3, 0.45, 0.6), "uneven light", "gradient strength"),
    "gamma": Kind(gamma, ((1.15, 0.05), (1.3, 0.1), (1.5, 0.15), (1.8, 0.2)),
                  "exposure: gamma and brightness", "(gamma, brightness gain)"),
    "jpeg": Kind(jpeg, (60, 40, 25, 12), "compression", "JPEG quality"),
    "stain_shift": Kind(stain_shift, ((3.0, 0.05), (6.0, 0.1), (10.0, 0.2), (15.0, 0.3)),
                        "another lab's stain", "(dye hue turn deg, log amount scale)"),
}


def _check(batch, kind: str, severity: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown degradation {kind!r}; choose from {', '.join(KINDS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 1..4, got {severity}")
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected a uint8 BxHxWx3 batch, got {batch.dtype} {batch.shape}")


def apply(batch: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """One kind at one severity on a whole batch (randomness per image from `rng`)."""
    _check(batch, kind, severity)
    return KINDS[kind].fn(batch, KINDS[kind].levels[severity - 1], rng)


def random_degradation(batch: np.ndarray, rng: np.random.Generator, p: float = 0.3, max_severity: int = 3,
                       kinds=None) -> np.ndarray:
    """Training augmentation: each image, with probability p, gets one kind (uniform over `kinds`,
    default all) at a severity uniform in 1..max_severity. Deterministic for a given rng state."""
    kinds = list(kinds or KINDS)
    out = batch.copy()
    chosen = np.flatnonzero(rng.random(len(batch)) < p)
    picks = [(kinds[rng.integers(len(kinds))], int(rng.integers(1, max_severity + 1))) for _ in chosen]
    for i, (kind, sev) in zip(chosen, picks):
        out[i] = apply(batch[i:i + 1], kind, sev, rng)[0]
    return out


def degradation_hook(p: float = 0.3, max_severity: int = 3, kinds=None):
    """A trainer uint8 hook (batch, rng) -> batch: `random_degradation` with these settings."""
    return lambda batch, rng: random_degradation(batch, rng, p, max_severity, kinds)


MANIFEST_COLUMNS = ["path", "label", "kind", "severity", "seed", "source", "error"]


@owns_output("dst")  # locked against a second run; checked writable before any work
def _check_dst(src, dst) -> None:
    """DST must lie outside SRC: writing into it would overwrite the originals' manifest and feed the
    degraded copies back in as inputs of the next run."""
    s = Path(src).resolve()
    s = s.parent if s.is_file() else s
    d = Path(dst).resolve()
    if d == s or s in d.parents:
        raise ValueError(f"{dst}: the output folder is {'the source folder' if d == s else 'inside the source'} "
                         f"{src}; choose a folder outside it")


def degrade_dataset(src, dst, kind: str, severity: int, seed: int = 0, progress: bool = True) -> Path:
    """Degraded PNG copies of an ImageFolder / manifest dataset -> path of `dst/manifest.csv`.

    Columns: path (relative to dst; empty when the input failed), label, kind, severity, seed,
    source, error (empty, or why the input could not be used: every input gets a row, none is dropped).
    PNG so that no second compression is added. Each image's generator is seeded by (seed, CRC32 of its
    relative path): the output for a file does not depend on which other files are present.
    """
    from tqdm.auto import tqdm

    from .datasets import open_dataset

    _check(np.zeros((1, 8, 8, 3), np.uint8), kind, severity)  # fail on bad arguments before any work
    _check_dst(src, dst)
    ds, dst = open_dataset(src), Path(dst)
    rows, used = [], set()
    for s in tqdm(ds.samples, desc=f"{kind} s{severity}", unit="img", disable=not progress):
        rel = Path(s.label or "") / (Path(s.path).stem + ".png")
        if rel in used:  # a.jpg and a.png in one class: keep both, named apart
            rel = rel.with_name(f"{Path(s.path).stem}_{Path(s.path).suffix.lstrip('.')}.png")
        used.add(rel)
        row = dict(path=rel.as_posix(), label=s.label or "", kind=kind, severity=severity, seed=seed,
                   source=s.path, error="")
        try:
            img = read_image(s.path)
        except ImageReadError as exc:
            row.update(path="", error=exc.reason)
        else:
            rng = np.random.default_rng([seed, zlib.crc32(rel.as_posix().encode())])
            out = apply(img[None], kind, severity, rng)[0]
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(dst / rel), np.ascontiguousarray(out[..., ::-1]))
        rows.append(row)
    dst.mkdir(parents=True, exist_ok=True)
    with open(dst / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return dst / "manifest.csv"

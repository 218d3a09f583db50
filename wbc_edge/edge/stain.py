"""Macenko stain normalisation for whole batches, written once for NumPy and CuPy (`xp`).

Romanowsky stains (May-Grünwald-Giemsa, Wright) have two dominant dyes, like H&E: the nuclear dye
(azure / methylene blue; purple nuclei) and eosin (pink cytoplasm, red cells, eosinophil granules).
Column 0 of every stain matrix is the nuclear dye (the vector absorbing more red light), column 1
eosin, the same ordering convention as Macenko's H&E (and torchstain).

Hand-written rather than looped over torchstain because the runtime needs one vectorised call per
batch (batched covariance, batched 3x3 eigh, masked per-image percentiles), on NumPy or CuPy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..xp import get_xp, to_numpy

IO = 240.0  # transmitted light intensity (as Macenko / torchstain)
BETA = 0.15  # OD threshold: pixels with any channel below it are background / near-white
ALPHA = 1.0  # angle percentile for the two extreme stain directions
MIN_STAIN_FRACTION = 0.01  # fewer stained pixels than this: too little stain, pass the image through
MIN_OD_VARIANCE = 1e-4  # no colour contrast (a flat grey field): nothing to separate into dyes


@dataclass
class StainReference:
    """Target appearance: stain matrix (3x2, columns nuclear dye, eosin) and 99th-pct concentrations."""
    stain_matrix: np.ndarray
    max_conc: np.ndarray

    def to_dict(self) -> dict:
        return {"method": "macenko", "stain_matrix": np.asarray(self.stain_matrix, np.float64).round(6).tolist(),
                "max_conc": np.asarray(self.max_conc, np.float64).round(6).tolist(), "io": IO, "beta": BETA, "alpha": ALPHA}

    @classmethod
    def from_dict(cls, d: dict) -> "StainReference":
        return cls(np.asarray(d["stain_matrix"], np.float64), np.asarray(d["max_conc"], np.float64))


def _check_batch(batch, name: str = "batch"):
    if batch.dtype != np.uint8:
        raise ValueError(f"{name}: stain normalisation needs 8-bit RGB, got dtype {batch.dtype} "
                         "(convert 16-bit images with wbc_edge.data.images.to_rgb_uint8)")
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"{name}: expected a BxHxWx3 RGB batch, got shape {tuple(batch.shape)}")


_OD_LUT = (-np.log((np.arange(256) + 1.0) / IO)).astype(np.float32)  # 8-bit input: OD is a lookup


def optical_density(batch):
    """uint8 BxHxWx3 -> float32 OD (B, N, 3)."""
    xp = get_xp(batch)
    return xp.take(xp.asarray(_OD_LUT), batch.reshape(batch.shape[0], -1, 3))


def _masked_percentiles(values, mask, qs):
    """Per-row percentiles (linear interpolation, as NumPy) over the masked entries: (B, len(qs))."""
    xp = get_xp(values)
    big = xp.asarray(np.finfo(np.float32).max, values.dtype)
    s = xp.sort(xp.where(mask, values, big), axis=1)  # valid values first, in order
    n = xp.maximum(mask.sum(axis=1), 1).astype(xp.float32)
    out = []
    for q in qs:
        pos = (n - 1) * (q / 100.0)
        lo = xp.floor(pos).astype(xp.int64)
        hi = xp.minimum(lo + 1, (n - 1).astype(xp.int64))
        frac = (pos - lo).astype(values.dtype)
        v_lo = xp.take_along_axis(s, lo[:, None], axis=1)[:, 0]
        v_hi = xp.take_along_axis(s, hi[:, None], axis=1)[:, 0]
        out.append(v_lo + frac * (v_hi - v_lo))
    return xp.stack(out, axis=1)


def _principal_plane(od, mask):
    """Batched covariance of the stained pixels and its two leading eigenvectors: (B,3,2), eigenvalues."""
    xp = get_xp(od)
    odm = od * mask.astype(xp.float32)[..., None]
    n = xp.maximum(mask.sum(axis=1), 2).astype(xp.float64)
    mean = odm.sum(axis=1, dtype=xp.float64) / n[:, None]
    # cov = (sum x x^T - n m m^T) / (n-1): one batched BLAS product, no centred copy of the batch
    s2 = xp.matmul(odm.transpose(0, 2, 1), odm).astype(xp.float64)
    cov = (s2 - n[:, None, None] * mean[:, :, None] * mean[:, None, :]) / (n - 1.0)[:, None, None]
    evals, evecs = xp.linalg.eigh(cov)
    plane = evecs[:, :, 1:3]
    # Orient both axes towards positive optical density (stains only absorb): an eigenvector's sign
    # is arbitrary, and a flipped plane would split the angle distribution across +-pi.
    sign = xp.where(plane.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
    return plane * sign, evals[:, 2]


def estimate_stains(batch, alpha: float = ALPHA, beta: float = BETA):
    """Per-image stain matrices (B,3,2), 99th-percentile concentrations (B,2) and an ok mask (B,)."""
    _check_batch(batch)
    return _estimate(optical_density(batch), alpha, beta)[:3]


def _estimate(od, alpha: float = ALPHA, beta: float = BETA):
    xp = get_xp(od)
    mask = ~xp.any(od < beta, axis=2)
    plane, top_eval = _principal_plane(od, mask)
    proj = xp.matmul(od, plane.astype(xp.float32))
    phi = xp.arctan2(proj[..., 1], proj[..., 0])
    lo_hi = _masked_percentiles(phi, mask, (alpha, 100.0 - alpha))
    dirs = xp.stack([xp.cos(lo_hi), xp.sin(lo_hi)], axis=1)  # (B, 2, 2): columns = vMin, vMax
    v = xp.einsum("bik,bkj->bij", plane, dirs)  # (B, 3, 2)
    nuclear_first = v[:, 0, 0] > v[:, 0, 1]  # the vector absorbing more red light is the nuclear dye
    stains = xp.where(nuclear_first[:, None, None], v, v[:, :, ::-1])
    stains = stains / xp.maximum(xp.linalg.norm(stains, axis=1, keepdims=True), 1e-12)
    conc = concentrations(od, stains)
    max_conc = xp.percentile(conc, 99, axis=1)
    ok = (mask.mean(axis=1) >= MIN_STAIN_FRACTION) & (top_eval > MIN_OD_VARIANCE) & xp.all(max_conc > 1e-6, axis=1) \
        & xp.all(xp.isfinite(stains), axis=(1, 2))
    return stains, max_conc, ok, conc


def concentrations(od, stains):
    """Least-squares dye concentrations of every pixel: (B, N, 2)."""
    xp = get_xp(od)
    pinv = xp.linalg.pinv(stains).astype(xp.float32)  # (B, 2, 3), tiny: float64 for stability
    return xp.matmul(od, pinv.transpose(0, 2, 1))


def normalise_batch(batch, reference: StainReference, stains=None):
    """Re-render every image with the reference stains -> (uint8 batch, ok mask).

    `stains` = (stain matrices, max concentrations) to use instead of estimating them per image
    (a stream's cached, per-slide estimate). Images flagged not-ok are returned unchanged.
    """
    _check_batch(batch)
    xp = get_xp(batch)
    od = optical_density(batch)
    if stains is None:
        stain_m, max_c, ok, conc = _estimate(od)
    else:
        b = batch.shape[0]
        stain_m = xp.broadcast_to(xp.asarray(stains[0], xp.float64), (b, 3, 2))
        max_c = xp.broadcast_to(xp.asarray(stains[1], xp.float64), (b, 2))
        ok, conc = xp.ones(b, bool), concentrations(od, stain_m)
    # I_c = Io exp(-sum_k ref[c,k] * C_k * refmax_k / max_k): per channel, two fused multiply-adds
    k = xp.asarray(reference.stain_matrix)[None] * (xp.asarray(reference.max_conc)[None] / xp.maximum(max_c, 1e-6))[:, None, :]
    k = k.astype(xp.float32)  # (B, 3 channels, 2 dyes)
    c0, c1 = conc[..., 0], conc[..., 1]
    planes = [xp.exp(-(c0 * k[:, c, 0:1] + c1 * k[:, c, 1:2])) * IO for c in range(3)]
    out = xp.stack([xp.clip(p, 0, 255).astype(xp.uint8) for p in planes], axis=-1).reshape(batch.shape)
    return xp.where(ok[:, None, None, None], out, batch), ok


def nuclear_concentration(batch, stains=None):
    """Per-pixel concentration of the nuclear dye (B,H,W): the localiser's and morphology's nucleus signal."""
    xp = get_xp(batch)
    stain_m = estimate_stains(batch)[0] if stains is None else xp.asarray(stains)
    if stain_m.ndim == 2:
        stain_m = xp.broadcast_to(stain_m, (batch.shape[0], 3, 2))
    return concentrations(optical_density(batch), stain_m)[..., 0].reshape(batch.shape[:3]).astype(xp.float32)


def fit_reference(images, chunk: int = 256) -> StainReference:
    """The reference from a set of images: median stain vectors and median 99th-pct concentrations
    over the images that carry enough stain (robust to a few odd images)."""
    mats, concs = [], []
    for i in range(0, len(images), chunk):
        m, c, ok = estimate_stains(images[i:i + chunk])
        mats.append(to_numpy(m)[to_numpy(ok)])
        concs.append(to_numpy(c)[to_numpy(ok)])
    mats, concs = np.concatenate(mats), np.concatenate(concs)
    if not len(mats):
        raise ValueError("no image with enough stain to fit a stain reference")
    med = np.median(mats, axis=0)
    return StainReference(med / np.linalg.norm(med, axis=0, keepdims=True), np.median(concs, axis=0))


class StainCache:
    """A stream's stain estimate, re-estimated every `refresh` batches rather than every frame.

    The estimate is the median over the images of the batch that carry enough stain; until one is
    available, images are normalised with their own per-image estimate.
    """

    def __init__(self, reference: StainReference, refresh: int = 50):
        self.reference, self.refresh, self.calls, self.stains = reference, refresh, 0, None

    def normalise(self, batch):
        if self.stains is None or self.calls % self.refresh == 0:
            m, c, ok = estimate_stains(batch)
            ok_h = to_numpy(ok)
            if ok_h.any():
                self.stains = (np.median(to_numpy(m)[ok_h], axis=0), np.median(to_numpy(c)[ok_h], axis=0))
        self.calls += 1
        if self.stains is None:
            return normalise_batch(batch, self.reference)
        return normalise_batch(batch, self.reference, self.stains)

"""Macenko stain normalisation for whole batches, written once for NumPy and CuPy (`xp`).

Romanowsky stains (May-Grünwald-Giemsa, Wright) have two dominant dyes, like H&E: the nuclear dye
(azure B / methylene blue: purple-blue nuclei, basophil granules) and eosin (pink-orange red cells,
eosinophil granules). Column 0 of every stain matrix is the nuclear dye, column 1 eosin. Ordering
rule: the vector with the larger red optical density is the nuclear dye (thiazine dyes absorb around
600-650 nm; eosin around 520 nm and passes red). It is Macenko's / torchstain's H&E rule; on MGG it
holds with a wide margin (PBC reference: red OD 0.5 for the nuclear vector, about 0.1 for eosin).

One choice differs from Macenko's H&E default, because of how MGG smears look (measured on PBC in
benchmarks/results/stain_quality.md): which pixels count as stained. Macenko drops a pixel when ANY
channel's OD is below beta; eosin passes red light (red cells have red OD ~0.05), so on MGG that rule
throws away nearly every eosin pixel, the per-crop second vector becomes noise (17 deg median from the
reference, 11% of crops with the dyes swapped), and normalising crops leaves a lab's stain shift as
large as or larger than it was (per-cell mean colour dE 9-19 after vs 3-13 before). Here a pixel
is dropped when the length of its positive OD vector is below beta: near-white background goes, red
cells stay (per-crop vectors within 5 deg / 17 deg of the reference at p90, no swaps, and the shift
shrinks to dE 0.8-3). On PBC the second vector then also takes in the cream background tint (it is
mostly blue-absorbing), which is why it is "eosin-like" rather than pure eosin. `TORCHSTAIN_PARAMS`
restores Macenko's rule exactly; tests/test_stain.py holds us to torchstain's numbers there.

Hand-written rather than looped over torchstain because the runtime needs one vectorised call per
batch (batched covariance, batched 3x3 eigh, masked per-image percentiles), on NumPy or CuPy.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np

from ..xp import get_xp, to_numpy

NUCLEAR, EOSIN = 0, 1  # column order of every stain matrix
DYES = ("nuclear", "eosin")
MIN_STAIN_FRACTION = 0.01  # fewer stained pixels than this: too little stain, pass the image through
MIN_OD_VARIANCE = 1e-4  # no colour contrast (a flat field): nothing to separate into dyes
MIN_SEPARATION_DEG = 3.0  # two "dyes" closer than this are one dye (a grey or single-stain image)
TISSUE_RULES = ("od_norm", "all_channels")
# Cache blocking: a batch is processed a few images at a time so that each float32 temporary (~1 MB)
# stays in cache (1.5-2x faster on 256 cells of 176 px than in one piece), and the pieces run on
# THREADS threads (None: every core; 1.6x more on 2 cores). Results do not depend on either: images
# are independent. On a GPU one piece is better: pass chunk_pixels=None.
CHUNK_PIXELS = 1 << 18
THREADS: int | None = None


@dataclass(frozen=True)
class MacenkoParams:
    """Estimation settings; stored with the reference so a bundle is normalised as it was fitted."""
    io: float = 240.0  # incident light (Macenko's default; per-image estimates measured worse on PBC)
    beta: float = 0.15  # OD threshold below which a pixel is background / near-white
    alpha: float = 1.0  # angle percentile of the two extreme stain directions (robust min / max)
    tissue: str = "od_norm"  # "od_norm": |max(OD,0)| >= beta;  "all_channels": every OD >= beta
    max_percentile: float = 99.0  # "max" concentration, robust to a few dark pixels

    def __post_init__(self):
        if self.tissue not in TISSUE_RULES:
            raise ValueError(f"tissue rule must be one of {TISSUE_RULES}, got {self.tissue!r}")


TORCHSTAIN_PARAMS = MacenkoParams(tissue="all_channels")  # Macenko 2009 / torchstain


@dataclass(frozen=True)
class StainReference:
    """Target appearance: stain matrix (3x2 unit columns: nuclear dye, eosin; OD per unit concentration)
    and the max (99th-percentile) concentration of each dye, with the settings they were fitted with."""
    stain_matrix: np.ndarray
    max_conc: np.ndarray
    params: MacenkoParams = field(default_factory=MacenkoParams)

    def to_dict(self) -> dict:
        """JSON-able, for the bundle manifest."""
        r = lambda a: np.asarray(a, np.float64).tolist()  # noqa: E731 - full precision: exact round trip
        return {"method": "macenko", "dyes": list(DYES), "stain_matrix": r(self.stain_matrix),
                "max_conc": r(self.max_conc), **asdict(self.params)}

    @classmethod
    def from_dict(cls, d: dict) -> "StainReference":
        if d.get("method", "macenko") != "macenko":
            raise ValueError(f"not a Macenko stain reference (method={d.get('method')!r})")
        # A dict without "tissue" predates the MGG rule: it was fitted with Macenko's all-channels rule.
        p = MacenkoParams(io=float(d.get("io", 240.0)), beta=float(d.get("beta", 0.15)),
                          alpha=float(d.get("alpha", 1.0)), tissue=d.get("tissue", "all_channels"),
                          max_percentile=float(d.get("max_percentile", 99.0)))
        m, c = np.asarray(d["stain_matrix"], np.float64), np.asarray(d["max_conc"], np.float64)
        if m.shape != (3, 2) or c.shape != (2,) or not (np.isfinite(m).all() and (c > 0).all()):
            raise ValueError(f"malformed stain reference: matrix {m.shape}, max_conc {c.tolist()}")
        return cls(m, c, p)


def _check_batch(batch, name: str = "batch"):
    if batch.dtype != np.uint8:
        raise ValueError(f"{name}: stain normalisation needs 8-bit RGB, got dtype {batch.dtype} "
                         "(convert 16-bit images with wbc_edge.data.images.to_rgb_uint8)")
    if batch.ndim != 4 or batch.shape[-1] != 3:
        gray = batch.ndim == 3 or batch.shape[-1] == 1
        raise ValueError(f"{name}: expected a BxHxWx3 RGB batch, got shape {tuple(batch.shape)}"
                         + (" (single-channel images carry no stain colour)" if gray else ""))


@lru_cache(maxsize=8)
def _od_lut(io: float) -> np.ndarray:
    return (-np.log((np.arange(256) + 1.0) / io)).astype(np.float32)  # 8-bit input: OD is a lookup


def optical_density(batch, io: float = 240.0):
    """uint8 BxHxWx3 -> float32 optical density -log((I + 1) / io), channel-planar: (B, 3, N).

    Planar because every later step then runs over long contiguous rows (NumPy's loops over an
    innermost axis of length 3 are several times slower) and the 3xN products are plain BLAS calls.
    """
    xp = get_xp(batch)
    planar = batch.reshape(batch.shape[0], -1, 3).transpose(0, 2, 1)
    return xp.take(xp.asarray(_od_lut(float(io))), planar)


def tissue_mask(od, params: MacenkoParams):
    """(B, N) True where a pixel carries stain (not background, not near-white)."""
    xp = get_xp(od)
    if params.tissue == "all_channels":
        return (od[:, 0] >= params.beta) & (od[:, 1] >= params.beta) & (od[:, 2] >= params.beta)
    pos = xp.maximum(od, 0)  # brighter than io: no absorption in that channel
    return xp.einsum("bcn,bcn->bn", pos, pos) >= params.beta ** 2


def _masked_percentiles(values, mask, qs):
    """Per-row percentiles (NumPy's linear method) over the masked entries only: (B, len(qs))."""
    xp = get_xp(values)
    big = xp.asarray(np.finfo(np.float32).max, values.dtype)
    s = xp.sort(xp.where(mask, values, big), axis=1)  # each row's valid values first, in order
    last = xp.maximum(mask.sum(axis=1), 1).astype(xp.float64) - 1
    out = []
    for q in qs:
        pos = last * (q / 100.0)
        lo = xp.floor(pos).astype(xp.int64)
        hi = xp.minimum(lo + 1, last.astype(xp.int64))
        frac = (pos - lo).astype(values.dtype)
        v_lo = xp.take_along_axis(s, lo[:, None], axis=1)[:, 0]
        v_hi = xp.take_along_axis(s, hi[:, None], axis=1)[:, 0]
        out.append(v_lo + frac * (v_hi - v_lo))
    return xp.stack(out, axis=1)


def _percentile_last_axis(values, q: float):
    """NumPy's (linear) percentile along the last axis from ONE partition: the next order statistic is
    the minimum of the part above it. A two-kth partition costs 3-4x more."""
    xp = get_xp(values)
    n = values.shape[-1]
    pos = (n - 1) * q / 100.0
    k, t = int(pos), pos - int(pos)
    part = xp.partition(values, k, axis=-1)
    lo = part[..., k]
    hi = part[..., k + 1:].min(axis=-1) if k + 1 < n else lo
    d = hi - lo
    return lo + d * t if t < 0.5 else hi - d * (1 - t)  # NumPy's lerp, for the same rounding


def _principal_plane(od, mask):
    """Batched covariance of the stained pixels -> its two leading eigenvectors (B,3,2), top eigenvalue."""
    xp = get_xp(od)
    w = mask.astype(xp.float32)
    n = xp.maximum(mask.sum(axis=1), 2).astype(xp.float64)
    # Sums and cross-products as batched BLAS products, accumulated in float32; so centre first on an
    # approximate mean m0 (cov is shift-invariant): without it the cancellation in E[xx^T] - mm^T
    # costs 10x more disagreement with float64 torchstain.
    m0 = xp.matmul(od, w[:, :, None]) / n.astype(xp.float32)[:, None, None]  # (B, 3, 1)
    xc = xp.subtract(od, m0)
    xc *= w[:, None, :]
    d = xp.matmul(xc, w[:, :, None])[:, :, 0].astype(xp.float64) / n[:, None]  # the small rest of the mean
    # the 9 cross-products as 1xN @ Nx1 dot products: 5x faster and 2x more precise than a 3xN @ Nx3
    s2 = xp.matmul(xc[:, :, None, None, :], xc[:, None, :, :, None])[..., 0, 0].astype(xp.float64)
    cov = (s2 - n[:, None, None] * d[:, :, None] * d[:, None, :]) / (n - 1.0)[:, None, None]
    evals, evecs = xp.linalg.eigh(cov)
    plane = evecs[:, :, 1:3]
    # Orient both axes towards positive optical density (dyes only absorb): an eigenvector's sign is
    # arbitrary, and a flipped principal axis would split the angle distribution across +-pi.
    sign = xp.where(plane.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
    return plane * sign, evals[:, 2]


def _stain_vectors(od, mask, alpha: float):
    """The two extreme stain directions in the principal plane, nuclear first: (B,3,2), top eigenvalue."""
    xp = get_xp(od)
    plane, top_eval = _principal_plane(od, mask)
    proj = xp.matmul(plane.transpose(0, 2, 1).astype(xp.float32), od)  # (B, 2, N)
    phi = xp.arctan2(proj[:, 1], proj[:, 0])
    lo_hi = _masked_percentiles(phi, mask, (alpha, 100.0 - alpha))
    dirs = xp.stack([xp.cos(lo_hi), xp.sin(lo_hi)], axis=1)  # (B, 2, 2): columns = vMin, vMax
    v = xp.einsum("bik,bkj->bij", plane, dirs)  # (B, 3, 2)
    nuclear_first = v[:, 0, 0] > v[:, 0, 1]  # the dye absorbing more red light is the nuclear dye
    v = xp.where(nuclear_first[:, None, None], v, v[:, :, ::-1])
    return v / xp.maximum(xp.linalg.norm(v, axis=1, keepdims=True), 1e-12), top_eval


# A generic, well-separated MGG dye pair: unit OD vectors rounded from one Macenko estimate pooled
# over the stained pixels of 384 PBC cells (nuclear: purple-blue; eosin: pink-red). Used to synthesise
# stain shifts (data/degrade.py), and as a finite stand-in wherever an estimate failed (that image's
# output is then discarded).
MGG_STAINS = np.array([[0.51, 0.10], [0.82, 0.74], [0.26, 0.67]])
MGG_STAINS = MGG_STAINS / np.linalg.norm(MGG_STAINS, axis=0)
_PLACEHOLDER = MGG_STAINS


def _separated(m):
    """(B,) finite stain pairs at least MIN_SEPARATION_DEG apart (else they cannot be unmixed)."""
    xp = get_xp(m)
    norms = xp.sqrt((m * m).sum(axis=1))  # (B, 2)
    cos = xp.abs((m[:, :, 0] * m[:, :, 1]).sum(axis=1)) / xp.maximum(norms[:, 0] * norms[:, 1], 1e-12)
    return xp.all(xp.isfinite(m), axis=(1, 2)) & (norms.min(axis=1) > 1e-6) \
        & (cos < np.cos(np.radians(MIN_SEPARATION_DEG)))


def _estimate(od, params: MacenkoParams):
    """Per-image stains (B,3,2), max concentrations (B,2), ok (B,), concentrations (B,2,N)."""
    xp = get_xp(od)
    mask = tissue_mask(od, params)
    stains, top_eval = _stain_vectors(od, mask, params.alpha)
    ok = (mask.mean(axis=1) >= MIN_STAIN_FRACTION) & (top_eval > MIN_OD_VARIANCE) & _separated(stains)
    stains = xp.where(ok[:, None, None], stains, xp.asarray(_PLACEHOLDER))
    conc = concentrations(od, stains)
    max_conc = _percentile_last_axis(conc, params.max_percentile).astype(xp.float64)
    ok &= xp.all(max_conc > 1e-6, axis=1)
    return stains, xp.where(ok[:, None], max_conc, 1.0), ok, conc


def _chunked(fn, batch, chunk_pixels: int | None, *per_image):
    """fn(images, *per_image slices) -> tuple of per-image arrays, run a few images at a time; the
    pieces run on all CPU cores (NumPy releases the GIL in its loops, sorts and BLAS calls)."""
    xp = get_xp(batch)
    step = len(batch) if not chunk_pixels else max(1, chunk_pixels // (batch.shape[1] * batch.shape[2]))
    starts = range(0, len(batch), step)
    run = lambda i: fn(batch[i:i + step], *(a[i:i + step] for a in per_image))  # noqa: E731
    if len(starts) <= 1:  # one piece (or an empty batch): no threads
        return run(0)
    if min(len(starts), THREADS or os.cpu_count() or 1) == 1:
        return tuple(xp.concatenate(p) for p in zip(*map(run, starts)))
    parts = list(_pool().map(run, starts))
    return tuple(xp.concatenate(p) for p in zip(*parts))


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """One worker pool for the process: `_chunked` runs on every classifier batch when a bundle
    normalises stains, and starting threads per call would cost more than the small pieces."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(THREADS or os.cpu_count() or 1, thread_name_prefix="wbc-stain")
        return _POOL


def estimate_stains(batch, params: MacenkoParams | None = None, chunk_pixels: int | None = CHUNK_PIXELS):
    """Per-image stain matrices (B,3,2; nuclear, eosin), max concentrations (B,2), ok mask (B,).

    ok is False for an image with too little stain (blank, white, black, grey, one dye only); its
    matrix and concentrations are finite placeholders, never NaN.
    """
    _check_batch(batch)
    params = params or MacenkoParams()
    return _chunked(lambda b: _estimate(optical_density(b, params.io), params)[:3], batch, chunk_pixels)


def _pinv_3x2(m):
    """Pseudo-inverses (B,2,3) of full-column-rank (B,3,2) matrices: (M^T M)^-1 M^T with the 2x2
    inverse written out (no SVD per image, and no reliance on batched pinv in every array module)."""
    xp = get_xp(m)
    a, b, d = (m[:, :, 0] ** 2).sum(1), (m[:, :, 0] * m[:, :, 1]).sum(1), (m[:, :, 1] ** 2).sum(1)
    inv = xp.stack([xp.stack([d, -b], 1), xp.stack([-b, a], 1)], 1) / (a * d - b * b)[:, None, None]
    return xp.matmul(inv, m.transpose(0, 2, 1))


def concentrations(od, stains):
    """Least-squares dye concentrations (B, 2, N) of planar OD (B, 3, N) for stain matrices (B, 3, 2)."""
    xp = get_xp(od)
    pinv = _pinv_3x2(xp.asarray(stains, xp.float64)).astype(xp.float32)  # tiny: solved in float64
    return xp.matmul(pinv, od)


def _given_stains(stains, b: int, xp):
    """(matrices, max concentrations[, ok]) given for the batch -> (B,3,2), (B,2), ok (B,)."""
    m = xp.broadcast_to(xp.asarray(stains[0], xp.float64), (b, 3, 2))
    c = xp.broadcast_to(xp.asarray(stains[1], xp.float64), (b, 2))
    ok = xp.ones(b, bool) if len(stains) < 3 else xp.broadcast_to(xp.asarray(stains[2], bool), (b,))
    ok = ok & _separated(m) & xp.all(c > 1e-6, axis=1)
    return xp.where(ok[:, None, None], m, xp.asarray(_PLACEHOLDER)), xp.where(ok[:, None], c, 1.0), ok


def normalise_batch(batch, reference: StainReference, stains=None, chunk_pixels: int | None = CHUNK_PIXELS):
    """Re-render every image with the reference's stains -> (uint8 batch, ok mask).

    `stains` = (matrices 3x2 or Bx3x2, max concentrations 2 or Bx2[, ok]) replaces the per-image
    estimate (a stream's cached per-slide estimate, see StainCache). Images flagged not-ok come back
    unchanged. Like torchstain, values are truncated (not rounded) to uint8, so the two agree exactly.
    The two-dye model re-renders background too: a normalised PBC cell's mean colour moves by ~11 dE
    (CIELAB), so a model must be trained and run with the same choice (the bundle records it).
    """
    _check_batch(batch)
    if stains is None:
        return _chunked(lambda b: _normalise(b, reference), batch, chunk_pixels)
    given = _given_stains(stains, batch.shape[0], get_xp(batch))
    return _chunked(lambda b, *g: _normalise(b, reference, g), batch, chunk_pixels, *given)


def _normalise(batch, reference: StainReference, given=None):
    xp, p = get_xp(batch), reference.params
    od = optical_density(batch, p.io)
    if given is None:
        _, max_c, ok, conc = _estimate(od, p)
    else:
        stain_m, max_c, ok = given
        ok = ok & (tissue_mask(od, p).mean(axis=1) >= MIN_STAIN_FRACTION)  # a blank frame stays flagged
        conc = concentrations(od, stain_m)
    # I = io exp(-ref diag(refmax / max) C): the reference mixing, scaled per image, as one product
    scale = xp.asarray(reference.max_conc, xp.float64)[None] / max_c  # (B, 2)
    k = (xp.asarray(reference.stain_matrix, xp.float64)[None] * scale[:, None, :]).astype(xp.float32)
    img = xp.matmul(-k, conc)  # (B, 3, N): -OD, then in place -> intensity
    img += np.float32(np.log(p.io))
    xp.exp(img, out=img)
    xp.minimum(img, 255, out=img)  # exp() > 0: only the top needs clipping
    img = img.astype(xp.uint8)  # truncates, as torchstain does
    # interleave the planes: stacking them is 4x faster than a contiguous copy of the transpose
    out = xp.stack([img[:, 0], img[:, 1], img[:, 2]], axis=-1).reshape(batch.shape)
    out[~ok] = batch[~ok]  # flagged images come back unchanged
    return out, ok


def nuclear_concentration(batch, stains=None, params: MacenkoParams | None = None):
    """Per-pixel nuclear-dye concentration (B,H,W) float32: the localiser's and morphology's nucleus signal.

    `stains`: a StainReference (its matrix and settings: no per-frame stain estimate, the fast path),
    a 3x2 or Bx3x2 matrix, or None (each image's own estimate). Units: OD per unit stain vector; the
    reference's max_conc[0] is the level of a dark nucleus.
    """
    _check_batch(batch)
    xp = get_xp(batch)
    if isinstance(stains, StainReference):
        params, stains = stains.params, stains.stain_matrix
    params = params or MacenkoParams()
    od = optical_density(batch, params.io)
    m = _estimate(od, params)[0] if stains is None else xp.asarray(stains, xp.float64)
    m = xp.broadcast_to(m, (batch.shape[0], 3, 2))
    return concentrations(od, m)[:, NUCLEAR].reshape(batch.shape[:3])


def _batches(images, chunk: int):
    """Equal-shape uint8 batches from a BxHxWx3 array or a list of HxWx3 images of any sizes."""
    if hasattr(images, "shape"):
        for i in range(0, len(images), chunk):
            yield images[i:i + chunk]
        return
    run: list = []
    for im in images:
        if run and (im.shape != run[0].shape or len(run) == chunk):
            yield np.stack(run)
            run = []
        run.append(im)
    if run:
        yield np.stack(run)


def fit_reference(images, params: MacenkoParams | None = None, chunk: int = 256) -> StainReference:
    """The reference of a set of images (array or list, any sizes): the medians, over the images with
    enough stain, of their stain vectors (columns re-normed) and 99th-percentile concentrations.
    Medians make it robust to odd images; for one image it is Macenko's (torchstain's) own fit."""
    params = params or MacenkoParams()
    mats, concs = [], []
    for batch in _batches(images, chunk):
        m, c, ok = (to_numpy(a) for a in estimate_stains(batch, params))
        mats.append(m[ok])
        concs.append(c[ok])
    mats = np.concatenate(mats)
    if not len(mats):
        raise ValueError("no image with enough stain to fit a stain reference")
    med = np.median(mats, axis=0)
    med = med / np.linalg.norm(med, axis=0, keepdims=True)
    return StainReference(med, np.median(np.concatenate(concs), axis=0), params)


class StainCache:
    """A stream's (slide's) stain estimate, reused across frames instead of re-estimated per frame.

    The estimate is the median over the images of a batch that carry enough stain (a slide has one
    staining, and a batch of cells pins it down better than one crop). It is refreshed every `refresh`
    batches (None: never); a batch with no usable image keeps the previous estimate, and until a first
    one exists images use their own estimate. One cache per stream; `reset()` for a new slide.
    """

    def __init__(self, reference: StainReference, refresh: int | None = 50):
        self.reference, self.refresh = reference, refresh
        self.calls, self.updates, self.stains = 0, 0, None

    def _due(self) -> bool:
        return self.stains is None or (self.refresh is not None and self.calls % self.refresh == 0)

    def update(self, batch) -> None:
        m, c, ok = (to_numpy(a) for a in estimate_stains(batch, self.reference.params))
        if ok.any():
            med = np.median(m[ok], axis=0)
            self.stains = (med / np.linalg.norm(med, axis=0, keepdims=True), np.median(c[ok], axis=0))
            self.updates += 1

    def normalise(self, batch):
        """-> (normalised uint8 batch, ok mask), as normalise_batch."""
        if self._due():
            self.update(batch)
        self.calls += 1
        if self.stains is None:
            return normalise_batch(batch, self.reference)
        return normalise_batch(batch, self.reference, self.stains)

    def reset(self) -> None:
        """A new slide: forget the estimate."""
        self.calls, self.stains = 0, None


def bundle_stain(bundle) -> dict | None:
    """The bundle's Macenko reference (as stored) when its model runs on normalised cells, else None."""
    stain = bundle.extra.get("stain") or {}
    return stain["reference"] if stain.get("normalise") else None

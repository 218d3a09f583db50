"""Salt-and-pepper (impulse) noise: a per-image detector and an adaptive-median restorer, plus the
PSNR / SSIM measures the benchmark and tests judge them by.

Detector: the fraction of pixels that sit at 0 or 255 in some channel while differing from their 3x3
median by more than IMPULSE_DIFF grey levels. Saturated background is not counted (its neighbours
saturate too), nor are dark nuclei or clipped sensor noise (never that far below their neighbours).
Restorer: an adaptive median filter, run only on images where the detector fires and only on their
0/255 values. OpenCV has no adaptive median filter, so it is a Numba kernel (parallel over the rows
of the whole batch); a plain median would blur the chromatin texture the classifier reads. The
kernels live in `_impulse_kernels` and are imported only for images with many 0/255 values (noisy,
or with a saturated background), so clean streams never load Numba (about 100 MB of RSS).
"""
from __future__ import annotations

import cv2
import numpy as np

# Grey levels between an impulse and its 3x3 median. 100, not less: heavy Gaussian noise (sigma 28)
# clips dark nuclei to 0 about 60-80 levels below their median and fired a 60-level detector on every
# image; pepper on the background and salt on cells sit 150-250 levels from their median.
IMPULSE_DIFF = 100
# Fitted with `fit_threshold` by `python -m benchmarks.bench_stain_quality` (its fit set: 256 real PBC
# cells from ../shared/data/pbc-176, seed 0) on clean cells vs the same cells with salt_pepper severity
# 1 (0.5% of pixels): clean max 0.0, noisy min 0.0019, threshold sqrt(1e-4 * 0.0019) = 4.4e-4 (about 14
# impulse-like pixels in a 176 px cell). See benchmarks/results/stain_quality.md;
# tests/test_quality.py re-fits it on data/sample and checks this value still sits inside the gap.
DEFAULT_THRESHOLD = 4.4e-4
_CLEAN_FLOOR = 1e-4  # a clean image may hold a few genuinely saturated, isolated pixels


def impulse_fraction(batch: np.ndarray) -> np.ndarray:
    """Detector statistic per image (B,): the fraction of pixels that look like impulses.

    The same statistic as `np.any(extreme & (|im - cv2.medianBlur(im, 3)| > IMPULSE_DIFF), axis=2).mean()`
    (tests check it), with the median taken only at the 0/255 values: in NumPy where they are few (a
    clean frame with some saturated specks: no Numba loaded), else in a Numba scan (a 640x480 frame
    costs a pass, not a full median filter: 5.7 ms with OpenCV).
    """
    out = np.empty(len(batch))
    for i, im in enumerate(batch):
        extreme = (im == 0) | (im == 255)
        few = np.count_nonzero(extreme) <= SPARSE_MAX * im.shape[0] * im.shape[1]
        out[i] = _sparse_fraction(im, *np.nonzero(extreme)) if few else _dense_fraction(im)
    return out


SPARSE_MAX = 0.01  # up to this many 0/255 values per pixel, NumPy gathers their neighbourhoods


def _sparse_fraction(im, ys, xs, cs) -> float:
    h, w = im.shape[:2]
    if not len(ys):
        return 0.0
    # 3x3 neighbourhoods of the 0/255 values, borders replicated as cv2.medianBlur does
    nb = np.stack([im[np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1), cs]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=1)
    med = np.partition(nb, 4, axis=1)[:, 4]
    far = np.abs(im[ys, xs, cs].astype(np.int16) - med) > IMPULSE_DIFF
    return len(np.unique(ys[far] * w + xs[far])) / (h * w)


def _dense_fraction(im) -> float:
    from ._impulse_kernels import _impulse_rows

    counts = np.empty(im.shape[0], np.int64)
    _impulse_rows(np.ascontiguousarray(im), IMPULSE_DIFF, counts)
    return counts.sum() / (im.shape[0] * im.shape[1])


def extreme_bound(batch: np.ndarray) -> np.ndarray:
    """(B,) 0/255 values per pixel: an upper bound of `impulse_fraction` (a pixel it counts holds at
    least one). An image without any 0 or 255 (most camera frames) is cleared by OpenCV's min/max (one
    vectorised pass, 0.3 ms for a 1440x900 frame); others take two count_nonzero calls."""
    return np.asarray([_extremes(im) / (im.shape[0] * im.shape[1]) for im in batch], np.float64)


def _extremes(im: np.ndarray) -> int:
    lo, hi, _, _ = cv2.minMaxLoc(im.reshape(im.shape[0], -1))  # channels side by side: one 2-D plane
    if lo > 0 and hi < 255:
        return 0
    return int(np.count_nonzero(im == 0) + np.count_nonzero(im == 255))


def detect(batch: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """(B,) bool: which images carry salt-and-pepper noise. Images with too few 0/255 values to pass
    the threshold are cleared by a pre-check without computing any median."""
    fired = np.zeros(len(batch), bool)
    maybe = extreme_bound(batch) > threshold
    if maybe.any():
        fired[maybe] = impulse_fraction(batch[maybe]) > threshold
    return fired


def fit_threshold(clean: np.ndarray, noisy: np.ndarray) -> tuple[float, dict]:
    """Threshold between the statistics of clean and noisy images: the geometric mean of the largest
    clean value (floored at _CLEAN_FLOOR) and the smallest noisy one, or of the medians when the two
    overlap. Returns it with the separation figures."""
    c, n = impulse_fraction(clean), impulse_fraction(noisy)
    lo, hi = max(float(c.max()), _CLEAN_FLOOR), float(n.min())
    separable = hi > lo
    if not separable:
        lo, hi = max(float(np.median(c)), _CLEAN_FLOOR), float(np.median(n))
    return float(np.sqrt(lo * hi)), {"clean_max": float(c.max()), "noisy_min": float(n.min()),
                                     "separable": bool(separable)}


def adaptive_median(batch: np.ndarray, max_radius: int = 3) -> np.ndarray:
    """Adaptive median filter (windows 3x3 up to (2r+1)^2) applied to the 0/255 values of a uint8 batch."""
    if batch.dtype != np.uint8 or batch.ndim != 4:
        raise ValueError(f"expected a uint8 BxHxWxC batch, got {batch.dtype} {batch.shape}")
    from ._impulse_kernels import _amf_batch

    out = np.empty_like(batch)
    _amf_batch(np.ascontiguousarray(batch), out, max_radius)
    return out


def restore(batch: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """(batch with the flagged images restored, which images were flagged). Clean images are returned
    bit-identical."""
    fired = detect(batch, threshold)
    out = batch.copy()
    if fired.any():
        out[fired] = adaptive_median(batch[fired])
    return out, fired


class ImpulseGuard:
    """The ingest step for salt-and-pepper noise, as the bundle configures it (`quality` section):
    run on each source image (a cell crop or a whole frame) at its native resolution, before any
    resize would smear the impulses into plausible colours. Clean images pass bit-identical."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        self.threshold = float(threshold)

    @classmethod
    def for_bundle(cls, bundle) -> "ImpulseGuard | None":
        q = bundle.extra.get("quality") or {}
        return cls(q.get("impulse_threshold", DEFAULT_THRESHOLD)) if q.get("restore_impulse") else None

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
        """(the image, restored if it carried impulse noise; whether it did)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
        if not detect(image[None], self.threshold)[0]:
            return image, False  # clean: the same array, no copy (this runs on every frame)
        return adaptive_median(image[None])[0], True


def bundle_quality(threshold: float = DEFAULT_THRESHOLD) -> dict:
    """The `quality` section a new bundle gets: impulse restoration on, with this threshold."""
    return {"restore_impulse": True, "impulse_threshold": threshold}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of uint8 images, in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 HxWxC images (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
    K1 0.01, K2 0.03, population covariances, averaged over pixels and channels; borders reflected)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a, b = a.astype(np.float64), b.astype(np.float64)
    blur = lambda x: cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)  # noqa: E731
    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma ** 2, blur(b * b) - mb ** 2, blur(a * b) - ma * mb
    return float((((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))).mean())


# ---- the restoration gate: blur and uneven light, on canonical cells ----------------------------------
# Two cheap scores per cell (both computed on the canonical cell, before the colour step, where the
# learned restorer runs):
#   sharpness   the least, over four directions (0/45/90/135 deg), of the ratio of fine to middle detail:
#               var(g - line_blur(g, 0.8 px)) / var(g - line_blur(g, 2 px)). A ratio, so a cell's content
#               (a big pale lymphocyte, a granular eosinophil) cancels; the least direction, so motion blur
#               (which softens one direction only) is seen as well as isotropic and defocus blur.
#   unevenness  the slope of a plane fitted to the log brightness of the brightest 20% of pixels (the
#               smear's background): a Koehler-misaligned lamp is a ramp, a cell is not. A strong ramp
#               clips the bright side to 255 and flattens this fit, hence:
#   tilt        the slope of the plane through the log brightness of all pixels (a centred cell is about
#               symmetric: it adds little; clean cells off centre reach ~0.6, a severity-4 ramp ~0.75).
# Fitted on clean training cells (`fit_gate`): a cell is restored when its sharpness is under the clean
# cells' least value (times a margin) or its unevenness or tilt above their largest (over the margin);
# every clean training cell passes, untouched.
GATE_ANGLES = (0.0, 45.0, 90.0, 135.0)
GATE_MARGIN = 0.97  # thresholds this far beyond the clean extremes: clean cells pass with room to spare
_BRIGHT_QUANTILE = 80  # background pixels: above this percentile of brightness
SCORES = ("sharpness", "unevenness", "tilt")


def _line_kernel(sigma: float, angle_deg: float, n: int = 9) -> np.ndarray:
    """A 1-D Gaussian of `sigma` px laid along `angle_deg`, bilinearly splatted into an n x n kernel.
    OpenCV has no oriented Gaussian; four fixed 9x9 kernels built once."""
    k, c = np.zeros((n, n), np.float32), n // 2
    t = np.arange(n) - c
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    a = np.radians(angle_deg)
    for ti, v in zip(t, g / g.sum()):
        x, y = c + ti * np.cos(a), c + ti * np.sin(a)
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        fx, fy = x - x0, y - y0
        for xx, yy, w in ((x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                          (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)):
            if 0 <= xx < n and 0 <= yy < n:
                k[yy, xx] += v * w
    return k / k.sum()


_GATE_KERNELS = [(_line_kernel(0.8, a), _line_kernel(2.0, a)) for a in GATE_ANGLES]


def sharpness(grey: np.ndarray) -> float:
    """The least directional fine/middle detail ratio of a float32 grey image (see above)."""
    ratios = []
    for fine, mid in _GATE_KERNELS:
        hi = grey - cv2.filter2D(grey, -1, fine, borderType=cv2.BORDER_REFLECT)
        lo = grey - cv2.filter2D(grey, -1, mid, borderType=cv2.BORDER_REFLECT)
        ratios.append(float(hi.var()) / max(float(lo.var()), 1e-6))
    return min(ratios)


def unevenness(grey: np.ndarray) -> float:
    """Slope (log brightness per image side) of a plane through the background of a float32 grey image."""
    h, w = grey.shape
    sel = grey >= np.percentile(grey, _BRIGHT_QUANTILE)
    ys, xs = np.nonzero(sel)
    a = np.stack([xs / w - 0.5, ys / h - 0.5, np.ones(len(xs))], axis=1)
    coef = np.linalg.lstsq(a, np.log1p(grey[sel].astype(np.float64)), rcond=None)[0]
    return float(np.hypot(coef[0], coef[1]))


def tilt(grey: np.ndarray) -> float:
    """Slope (log brightness per image side) of the plane through all pixels: on a full grid the x and y
    terms are orthogonal, so each slope is one weighted sum (no least-squares solve)."""
    h, w = grey.shape
    lum = np.log1p(grey)
    x, y = np.arange(w) / w - 0.5, np.arange(h) / h - 0.5
    x -= x.mean()
    y -= y.mean()
    sx = float(lum.mean(0) @ x) / float(x @ x)
    sy = float(lum.mean(1) @ y) / float(y @ y)
    return float(np.hypot(sx, sy))


def quality_scores(batch: np.ndarray) -> np.ndarray:
    """(B, 3) float: sharpness, unevenness and tilt of each uint8 RGB image of a batch."""
    out = np.empty((len(batch), 3))
    for i, im in enumerate(batch):
        grey = cv2.cvtColor(im, cv2.COLOR_RGB2GRAY).astype(np.float32)
        out[i] = sharpness(grey), unevenness(grey), tilt(grey)
    return out


def fit_gate(clean: np.ndarray, margin: float = GATE_MARGIN) -> dict:
    """The gate's thresholds from clean canonical cells: under the least sharpness and over the largest
    unevenness and tilt of any of them, by `margin` (the bundle's `restore.gate` section)."""
    s = quality_scores(clean)
    return {"min_sharpness": float(s[:, 0].min() * margin), "max_unevenness": float(s[:, 1].max() / margin),
            "max_tilt": float(s[:, 2].max() / margin), "n": int(len(clean)),
            **{f"clean_{k}_p50": float(v) for k, v in zip(SCORES, np.median(s, axis=0))}}


class QualityGate:
    """Which canonical cells the learned restorer should see: soft (blur, defocus, motion) or unevenly
    lit ones. Clean cells are not gated, so they pass the restoration step bit-identical."""

    def __init__(self, min_sharpness: float, max_unevenness: float, max_tilt: float = float("inf"), **_fit_figures):
        self.min_sharpness, self.max_unevenness, self.max_tilt = float(min_sharpness), float(max_unevenness), \
            float(max_tilt)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """((B,) bool: restore?, (B, 3) scores: sharpness, unevenness, tilt)."""
        s = quality_scores(batch)
        return (s[:, 0] < self.min_sharpness) | (s[:, 1] > self.max_unevenness) | (s[:, 2] > self.max_tilt), s

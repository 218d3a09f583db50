"""Per-crop pixel stages (serial Numba functions over crop `b` of a batch array).

features.py runs each over a batch in parallel (one stage at a time, or all fused per crop); the
per-pixel arithmetic comes from _scalar.py, shared with the CUDA twins in cuda_kernels.py.
"""
import math

import numpy as np
from numba import njit

from . import _scalar

NBINS = _scalar.NBINS
N_STATS = _scalar.N_STATS
# Region-statistics columns (sums over the crop's pixels).
(STAT_N_AREA, STAT_N_SY, STAT_N_SX, STAT_N_SYY, STAT_N_SXX, STAT_N_SXY, STAT_C_AREA, STAT_C_SY, STAT_C_SX,
 STAT_N_OD, STAT_CYT_AREA, STAT_CYT_OD, STAT_N_LAP, STAT_N_LAP_N, STAT_CYT_LAP,
 STAT_CYT_LAP_N) = range(N_STATS)

_stain_pixel = njit(cache=True)(_scalar.stain_pixel)
_hist_bin = njit(cache=True)(_scalar.hist_bin)
_otsu_bin = njit(cache=True)(_scalar.otsu_bin)
_region_code = njit(cache=True)(_scalar.region_code)
_interior_abs_laplacian = njit(cache=True)(_scalar.interior_abs_laplacian)
_is_boundary = njit(cache=True)(_scalar.is_boundary)
_radial_sample = njit(cache=True)(_scalar.radial_sample)


@njit(cache=True)
def stain_one(crops, lut, b, nuclear, od):
    """Nuclear score and mean OD of crop b (written to nuclear[b], od[b])."""
    s = crops.shape[1]
    for y in range(s):
        for x in range(s):
            n, o = _stain_pixel(crops[b, y, x, 0], crops[b, y, x, 1], crops[b, y, x, 2], lut)
            nuclear[b, y, x] = n
            od[b, y, x] = o


@njit(cache=True)
def _box3_at(m, y, x):
    """Mean of the 3x3 window at (y, x) of 2-D `m`, the window cut at the edge."""
    s = m.shape[0]
    acc, n = np.float32(0.0), 0
    for yy in range(max(0, y - 1), min(s, y + 2)):
        for xx in range(max(0, x - 1), min(s, x + 2)):
            acc += m[yy, xx]
            n += 1
    return acc / np.float32(n)


@njit(cache=True)
def box3_one(maps, b, out):
    """3x3 mean of maps[b] into out[b]: a pixel of pale chromatin or one dark granule must not decide
    alone whether it is nucleus."""
    s = maps.shape[1]
    m, o = maps[b], out[b]
    ninth = np.float32(1.0 / 9.0)
    for y in range(s):
        if y == 0 or y == s - 1:
            for x in range(s):
                o[y, x] = _box3_at(m, y, x)
            continue
        o[y, 0] = _box3_at(m, y, 0)
        o[y, s - 1] = _box3_at(m, y, s - 1)
        for x in range(1, s - 1):  # the interior: no bounds to check, so the loop vectorises
            o[y, x] = (m[y - 1, x - 1] + m[y - 1, x] + m[y - 1, x + 1] + m[y, x - 1] + m[y, x]
                       + m[y, x + 1] + m[y + 1, x - 1] + m[y + 1, x] + m[y + 1, x + 1]) * ninth


@njit(cache=True)
def otsu_one(maps, exclude, use_mask, step, b):
    """Otsu threshold of crop b's values on every `step`-th row and column (pixels where
    exclude != 0 left out); inf if there is only one class. A 2-px grid of a 176-px crop still holds
    7,700 samples: plenty for a 256-bin histogram, at a quarter of the cost."""
    s = maps.shape[1]
    lo, hi, n = np.inf, -np.inf, 0
    for y in range(0, s, step):
        for x in range(0, s, step):
            if use_mask and exclude[b, y, x] != 0:
                continue
            v = maps[b, y, x]
            lo, hi, n = min(lo, v), max(hi, v), n + 1
    if n == 0 or not hi > lo:
        return np.float32(np.inf)
    scale = NBINS / (hi - lo)
    hist = np.zeros(NBINS, np.int64)
    for y in range(0, s, step):
        for x in range(0, s, step):
            if not (use_mask and exclude[b, y, x] != 0):
                hist[_hist_bin(maps[b, y, x], lo, scale, NBINS)] += 1
    k = _otsu_bin(hist, NBINS)
    return np.float32(np.inf) if k < 0 else np.float32(lo + (k + 1) / scale)


@njit(cache=True)
def _bbox_union(a, c):
    """Bounds of the pixels non-zero in 2-D `a` or `c` (y1 < 0 if none)."""
    s = a.shape[0]
    y0, y1, x0, x1 = s, -1, s, -1
    for y in range(s):
        for x in range(s):
            if a[y, x] or c[y, x]:
                y0, y1, x0, x1 = min(y0, y), max(y1, y), min(x0, x), max(x1, x)
    return y0, y1, x0, x1


@njit(cache=True)
def region_stats_one(nucleus, cell, od, b, acc):
    """Add crop b's region sums (columns STAT_*) to `acc`. Only the cell's box can contribute (the
    CUDA twin visits every pixel and gets the same sums)."""
    ya, yb, xa, xb = _bbox_union(nucleus[b], cell[b])
    for y in range(ya, yb + 1):
        for x in range(xa, xb + 1):
            code = _region_code(nucleus, cell, b, y, x)
            if code == 0:
                continue
            v = float(od[b, y, x])
            lap = _interior_abs_laplacian(nucleus, cell, od, b, y, x, code)
            acc[STAT_C_AREA] += 1.0
            acc[STAT_C_SY] += y
            acc[STAT_C_SX] += x
            if code == 1:
                acc[STAT_N_AREA] += 1.0
                acc[STAT_N_SY] += y
                acc[STAT_N_SX] += x
                acc[STAT_N_SYY] += y * y
                acc[STAT_N_SXX] += x * x
                acc[STAT_N_SXY] += y * x
                acc[STAT_N_OD] += v
                if lap >= 0.0:
                    acc[STAT_N_LAP] += lap
                    acc[STAT_N_LAP_N] += 1.0
            else:
                acc[STAT_CYT_AREA] += 1.0
                acc[STAT_CYT_OD] += v
                if lap >= 0.0:
                    acc[STAT_CYT_LAP] += lap
                    acc[STAT_CYT_LAP_N] += 1.0


@njit(cache=True)
def radial_one(nucleus, b, cy, cx, out):
    """Farthest boundary radius per angle bin of nucleus[b] seen from (cy, cx), into `out` (max)."""
    s, nbins = nucleus.shape[1], out.shape[0]
    for y in range(s):
        for x in range(s):
            if _is_boundary(nucleus, b, y, x):
                k, r = _radial_sample(y, x, cy, cx, nbins)
                if r > out[k]:
                    out[k] = r


@njit(cache=True)
def _fill_circular(r):
    """Linear interpolation over empty (< 0) bins, wrapping round the circle; False if all empty."""
    n = r.size
    valid = np.nonzero(r >= 0)[0]
    if valid.size == 0:
        return False
    for i in range(n):
        if r[i] >= 0:
            continue
        j = np.searchsorted(valid, i)
        lo = valid[j - 1] if j > 0 else valid[-1] - n
        hi = valid[j] if j < valid.size else valid[0] + n
        t = (i - lo) / (hi - lo)
        r[i] = (1 - t) * r[lo % n] + t * r[hi % n]
    return True


@njit(cache=True)
def profile_one(profile, k_lo, cos_t, sin_t):
    """(radial_cv, spikiness) of one radial profile (empty bins interpolated).

    spikiness = RMS of the profile's harmonics k_lo .. n/2 - 1 (by Parseval, from the DFT) over the
    mean radius: r = R (1 + a cos(k theta)) with k >= k_lo reads a / sqrt(2); a circle reads ~0 and an
    ellipse little (its harmonics are even and fall off fast: 0.03 at an axis ratio of 2).
    """
    n = profile.size
    r = profile.astype(np.float64)
    if not _fill_circular(r):
        return 0.0, 0.0
    mean = r.mean()
    if mean <= 0:
        return 0.0, 0.0
    energy = 0.0
    for k in range(k_lo, n // 2):
        re, im = 0.0, 0.0
        for j in range(n):
            re += r[j] * cos_t[(j * k) % n]
            im -= r[j] * sin_t[(j * k) % n]
        energy += 2.0 * (re * re + im * im) / (n * n)
    return r.std() / mean, math.sqrt(energy) / mean

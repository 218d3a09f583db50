"""Morphology features of white cells for a whole batch of crops at once (GitHub issue #7).

    crops (uint8 B x S x S x 3, RGB)
      -> stain_maps:      per-pixel nuclear score + mean optical density (OD)        [CPU | CUDA]
      -> segment:         nucleus (Otsu on the smoothed nuclear score, central components kept,
                          holes filled) and cell (rays from the nucleus to the background, robust to
                          touching red cells), uint8 B x S x S                            [CPU]
      -> region_stats:    moments, OD sums, texture sums per region                      [CPU | CUDA]
      -> radial_profiles: r(theta) of the nucleus boundary                               [CPU | CUDA]
      -> shape_stats:     convex hull, deepest concavity, lobes (distance-map persistence)   [CPU]
      -> B x F float32 features, columns named by FEATURE_NAMES

Each stage is a public batch function: a Numba `@njit(parallel=True)` kernel running a serial
per-crop function (_crop.py, _segment.py, _shape.py) over the crops in parallel; the [CUDA] stages
have twins in cuda_kernels.py built from the same per-pixel code (_scalar.py). `morphology_features`
runs all stages for one crop inside a single parallel loop instead: one parallel region per batch
(each region costs a thread wake-up, milliseconds on a loaded machine) and a crop's maps stay in
cache from the first stage to the last.

The nuclear score is an input of `segment` (and of `morphology_features`), so the colour-space score
here can be swapped for the nuclear-dye concentration of edge.stain (Macenko): Otsu thresholds do not
care about the score's units.

Lengths are in pixels of the crop, areas in px^2: a bundle fixes the crop size, so features from one
bundle are comparable; parameters that are lengths are set for 176-px crops and scaled with S.
A crop where no nucleus is found gets all-zero features (nucleus_area == 0 flags it).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import _crop
from ._crop import (N_STATS, STAT_C_AREA, STAT_C_SX, STAT_C_SY, STAT_CYT_AREA, STAT_CYT_LAP, STAT_CYT_LAP_N,
                    STAT_CYT_OD, STAT_N_AREA, STAT_N_LAP, STAT_N_LAP_N, STAT_N_OD, STAT_N_SX, STAT_N_SXX,
                    STAT_N_SXY, STAT_N_SY, STAT_N_SYY)
from ._segment import cell_one, nucleus_one
from ._shape import shape_one
from ..stain import _od_lut

FEATURE_NAMES: tuple[str, ...] = (
    "nucleus_area",       # px^2
    "cell_area",          # px^2
    "nc_ratio",           # nucleus area / cell area (0..1; the classic N:C ratio is f / (1 - f))
    "solidity",           # nucleus area / area of its convex hull
    "defect_depth",       # deepest concavity of the nucleus, / nucleus equivalent radius
    "radial_cv",          # std / mean of the nucleus boundary's radial profile r(theta)
    "spikiness",          # RMS of r(theta) from harmonic SPIKE_HARMONIC up, / mean radius
    "lobes",              # number of nuclear lobes
    "eccentricity",       # of the nucleus' second-moment ellipse (0 = round)
    "centroid_offset",    # |nucleus centroid - cell centroid| / cell equivalent radius
    "nucleus_od",         # mean optical density (mean over R, G, B) in the nucleus
    "cytoplasm_od",       # the same in the cytoplasm
    "granularity",        # mean |Laplacian of OD| inside the cytoplasm, / cytoplasm_od
    "chromatin_texture",  # the same inside the nucleus, / nucleus_od
)
N_FEATURES = len(FEATURE_NAMES)

# Natural-log optical density of each 8-bit level (the stain module's table, white at 256); +1 keeps a
# black pixel finite.
OD_LUT = _od_lut(256.0)

REF_SIZE = 176           # lengths below are for this crop size and scale with S
MIN_NUCLEUS_AREA = 15.0  # px^2: smaller dark specks (platelets beside the cell, debris) are ignored
KEEP_GAP = 14.0          # px: other nuclear pieces this close (edge to edge) are lobes of the same cell
N_RAYS = 64              # rays cast to find the cell boundary
N_ANGLES = 64            # bins of the radial profile r(theta)
SPIKE_HARMONIC = 5       # lower harmonics are overall shape (an ellipse's are 2 and 4), higher are spikes
LOBE_MIN_RADIUS = 2.0    # px: the inscribed radius a lobe needs
LOBE_NECK = 0.7          # a lobe is separate if the neck's half-width <= this x the lobe's radius
OTSU_STEP = 2            # Otsu histograms sample every 2nd row and column
N_RAW = N_STATS + 5      # per-crop raw values: region sums, (radial_cv, spikiness), shape_one's three


def _check_crops(crops) -> np.ndarray:
    crops = np.asarray(crops)
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[-1] != 3 or crops.shape[1] != crops.shape[2]:
        raise ValueError(f"expected uint8 B x S x S x 3 RGB crops, got {crops.dtype} {crops.shape}")
    return np.ascontiguousarray(crops)


def _check_maps(*maps) -> None:
    shape = maps[0].shape
    if len(shape) != 3 or shape[1] != shape[2] or any(m.shape != shape for m in maps):
        raise ValueError(f"expected B x S x S maps of one shape, got {[m.shape for m in maps]}")


def _scaled(s: int) -> tuple[float, float, float]:
    """(min nucleus area, keep gap, lobe min radius) for crops of side s."""
    k = s / REF_SIZE
    return MIN_NUCLEUS_AREA * k * k, KEEP_GAP * k, LOBE_MIN_RADIUS * k


def _dft_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    angles = 2 * np.pi * np.arange(n) / n
    return np.cos(angles), np.sin(angles)


# --- stage kernels: one per-crop function over the batch ----------------------------------------------

@njit(parallel=True, cache=True)
def _stain_maps_kernel(crops, lut, nuclear, od):
    for b in prange(crops.shape[0]):
        _crop.stain_one(crops, lut, b, nuclear, od)


@njit(parallel=True, cache=True)
def _box3_kernel(maps, out):
    for b in prange(maps.shape[0]):
        _crop.box3_one(maps, b, out)


@njit(parallel=True, cache=True)
def _otsu_kernel(maps, exclude, use_mask, step, out):
    for b in prange(maps.shape[0]):
        out[b] = _crop.otsu_one(maps, exclude, use_mask, step, b)


@njit(cache=True)
def _segment_one(smooth, od, b, min_area, keep_gap, n_rays, step, nucleus, cell):
    t = _crop.otsu_one(smooth, nucleus, False, step, b)
    nucleus_one(smooth[b], t, min_area, keep_gap, nucleus[b])
    # background vs the rest, decided on the pixels that are not nucleus (the nucleus would
    # otherwise take one of Otsu's two classes and the cytoplasm would fall in with the background)
    t_bg = _crop.otsu_one(od, nucleus, True, step, b)
    cell_one(od[b], t_bg, nucleus[b], n_rays, cell[b])


@njit(parallel=True, cache=True)
def _segment_kernel(smooth, od, min_area, keep_gap, n_rays, step, nucleus, cell):
    for b in prange(smooth.shape[0]):
        _segment_one(smooth, od, b, min_area, keep_gap, n_rays, step, nucleus, cell)


@njit(parallel=True, cache=True)
def _region_stats_kernel(nucleus, cell, od, out):
    for b in prange(nucleus.shape[0]):
        out[b, :] = 0.0
        _crop.region_stats_one(nucleus, cell, od, b, out[b])


@njit(parallel=True, cache=True)
def _radial_kernel(nucleus, centroids, out):
    for b in prange(nucleus.shape[0]):
        _crop.radial_one(nucleus, b, centroids[b, 0], centroids[b, 1], out[b])


@njit(parallel=True, cache=True)
def _profile_kernel(profiles, k_lo, cos_t, sin_t, out):
    for b in prange(profiles.shape[0]):
        out[b, 0], out[b, 1] = _crop.profile_one(profiles[b], k_lo, cos_t, sin_t)


@njit(parallel=True, cache=True)
def _shape_kernel(nucleus, min_radius, neck, out):
    for b in prange(nucleus.shape[0]):
        out[b, 0], out[b, 1], out[b, 2] = shape_one(nucleus[b], min_radius, neck)


# --- public stage functions ---------------------------------------------------------------------------

def stain_maps(crops) -> tuple[np.ndarray, np.ndarray]:
    """(nuclear score, mean OD), float32 B x S x S each, from uint8 RGB crops.

    The nuclear score is OD_green - OD_blue: the nuclear dye of Romanowsky stains absorbs green and
    passes blue, so nuclei score high, red cells ~0 and background below 0, whatever the brightness.
    """
    crops = _check_crops(crops)
    nuclear, od = np.empty(crops.shape[:3], np.float32), np.empty(crops.shape[:3], np.float32)
    _stain_maps_kernel(crops, OD_LUT, nuclear, od)
    return nuclear, od


def box3(maps) -> np.ndarray:
    """3x3 mean of each B x S x S map (the window shrinks at the crop's edge)."""
    maps = np.ascontiguousarray(maps, dtype=np.float32)
    out = np.empty_like(maps)
    _box3_kernel(maps, out)
    return out


def otsu_thresholds(maps, exclude=None, step: int = OTSU_STEP) -> np.ndarray:
    """Per-crop Otsu threshold (float32, B): foreground is `map >= threshold`; inf = nothing to split.

    `exclude` (B x S x S, non-zero = leave out) restricts the histogram; `step` samples a grid.
    """
    maps = np.ascontiguousarray(maps, dtype=np.float32)
    use = exclude is not None
    exclude = np.ascontiguousarray(exclude, dtype=np.uint8) if use else np.zeros((1, 1, 1), np.uint8)
    out = np.empty(maps.shape[0], np.float32)
    _otsu_kernel(maps, exclude, use, int(step), out)
    return out


def segment(nuclear, od, n_rays: int = N_RAYS) -> tuple[np.ndarray, np.ndarray]:
    """(nucleus, cell) uint8 B x S x S masks from a nuclear score map and the mean-OD map.

    `nuclear` may be any per-pixel score that is high on nuclei (this module's colour score, or the
    nuclear-dye concentration from edge.stain): it is smoothed 3x3 and thresholded with Otsu per crop.
    """
    nuclear = np.ascontiguousarray(nuclear, dtype=np.float32)
    od = np.ascontiguousarray(od, dtype=np.float32)
    _check_maps(nuclear, od)
    min_area, keep_gap, _ = _scaled(nuclear.shape[1])
    nucleus, cell = np.zeros(nuclear.shape, np.uint8), np.zeros(nuclear.shape, np.uint8)
    _segment_kernel(box3(nuclear), od, min_area, keep_gap, int(n_rays), OTSU_STEP, nucleus, cell)
    return nucleus, cell


def region_stats(nucleus, cell, od) -> np.ndarray:
    """B x 16 float64 sums per crop (areas, raw moments, OD, texture), columns STAT_*.

    The cell is taken as `cell | nucleus`; cytoplasm is cell minus nucleus.
    """
    nucleus = np.ascontiguousarray(nucleus, dtype=np.uint8)
    cell = np.ascontiguousarray(cell, dtype=np.uint8)
    od = np.ascontiguousarray(od, dtype=np.float32)
    _check_maps(nucleus, cell, od)
    out = np.empty((nucleus.shape[0], N_STATS), np.float64)
    _region_stats_kernel(nucleus, cell, od, out)
    return out


def nucleus_centroids(stats: np.ndarray) -> np.ndarray:
    """B x 2 (y, x) nucleus centroids in continuous pixel coordinates (pixel centres at i + 0.5)."""
    n = np.maximum(stats[:, STAT_N_AREA], 1.0)
    return np.stack([stats[:, STAT_N_SY] / n + 0.5, stats[:, STAT_N_SX] / n + 0.5], axis=1)


def radial_profiles(nucleus, centroids, n_bins: int = N_ANGLES) -> np.ndarray:
    """B x n_bins float32: farthest nucleus-boundary radius per angle bin from the centroid; -1 = none.

    Bin k covers angles atan2(dy, dx) in [-pi + 2 pi k / n, -pi + 2 pi (k + 1) / n), y pointing down.
    """
    nucleus = np.ascontiguousarray(nucleus, dtype=np.uint8)
    out = np.full((nucleus.shape[0], n_bins), -1.0, np.float32)
    _radial_kernel(nucleus, np.ascontiguousarray(centroids, dtype=np.float64), out)
    return out


def profile_features(profiles, k_lo: int = SPIKE_HARMONIC) -> np.ndarray:
    """B x 2 float64: (radial_cv, spikiness) of radial profiles (empty bins interpolated)."""
    profiles = np.ascontiguousarray(profiles, dtype=np.float32)
    out = np.empty((profiles.shape[0], 2), np.float64)
    _profile_kernel(profiles, int(k_lo), *_dft_tables(profiles.shape[1]), out)
    return out


def shape_stats(nucleus, min_radius: float | None = None, neck: float = LOBE_NECK) -> np.ndarray:
    """B x 3 float64: (convex hull area px^2, deepest concavity px, lobe count) of each nucleus."""
    nucleus = np.ascontiguousarray(nucleus, dtype=np.uint8)
    if min_radius is None:
        min_radius = _scaled(nucleus.shape[1])[2]
    out = np.empty((nucleus.shape[0], 3), np.float64)
    _shape_kernel(nucleus, float(min_radius), float(neck), out)
    return out


# --- assembly -----------------------------------------------------------------------------------------

def _div(a, b):
    a = np.asarray(a, dtype=np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=np.asarray(b) > 0)


def _moment_features(st: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eccentricity, centroid offset) from the raw moment sums, vectorised over the batch."""
    n, c = st[:, STAT_N_AREA], st[:, STAT_C_AREA]
    ny, nx = _div(st[:, STAT_N_SY], n), _div(st[:, STAT_N_SX], n)
    myy = _div(st[:, STAT_N_SYY], n) - ny ** 2
    mxx = _div(st[:, STAT_N_SXX], n) - nx ** 2
    mxy = _div(st[:, STAT_N_SXY], n) - ny * nx
    root = np.sqrt(((myy - mxx) / 2) ** 2 + mxy ** 2)
    l1, l2 = (myy + mxx) / 2 + root, (myy + mxx) / 2 - root
    ecc = np.sqrt(np.clip(1 - _div(l2, l1), 0, 1))
    offset = np.hypot(ny - _div(st[:, STAT_C_SY], c), nx - _div(st[:, STAT_C_SX], c))
    return ecc, _div(offset, np.sqrt(c / np.pi))


def assemble(st: np.ndarray, prof: np.ndarray, shp: np.ndarray) -> np.ndarray:
    """B x N_FEATURES float32 from region sums (B x 16), profile features (B x 2), shape stats (B x 3)."""
    n, c = st[:, STAT_N_AREA], st[:, STAT_C_AREA]
    n_od, cyt_od = _div(st[:, STAT_N_OD], n), _div(st[:, STAT_CYT_OD], st[:, STAT_CYT_AREA])
    ecc, offset = _moment_features(st)
    cols = {
        "nucleus_area": n, "cell_area": c, "nc_ratio": _div(n, c), "solidity": _div(n, shp[:, 0]),
        "defect_depth": _div(shp[:, 1], np.sqrt(n / np.pi)), "radial_cv": prof[:, 0], "spikiness": prof[:, 1],
        "lobes": shp[:, 2], "eccentricity": ecc, "centroid_offset": offset, "nucleus_od": n_od,
        "cytoplasm_od": cyt_od,
        "granularity": _div(_div(st[:, STAT_CYT_LAP], st[:, STAT_CYT_LAP_N]), cyt_od),
        "chromatin_texture": _div(_div(st[:, STAT_N_LAP], st[:, STAT_N_LAP_N]), n_od),
    }
    feats = np.stack([cols[name] for name in FEATURE_NAMES], axis=1)
    feats[n == 0] = 0.0  # no nucleus found: nothing to describe
    return feats.astype(np.float32)


def features_from_masks(nucleus, cell, od) -> np.ndarray:
    """B x N_FEATURES float32 features (columns FEATURE_NAMES) from masks and the mean-OD map."""
    st = region_stats(nucleus, cell, od)
    prof = profile_features(radial_profiles(nucleus, nucleus_centroids(st)))
    return assemble(st, prof, shape_stats(nucleus))


# --- everything for one crop in one parallel loop -----------------------------------------------------

@njit(parallel=True, cache=True)
def _features_kernel(crops, lut, nuclear_in, use_nuclear_in, min_area, keep_gap, n_rays, step, n_angles, k_lo,
                     cos_t, sin_t, min_radius, neck, nucleus, cell, raw):
    s = crops.shape[1]
    for b in prange(crops.shape[0]):
        # one crop's maps as 1 x S x S arrays (index 0), so the batch-indexed per-crop code applies
        score = np.empty((1, s, s), np.float32)
        od = np.empty((1, s, s), np.float32)
        smooth = np.empty((1, s, s), np.float32)
        _crop.stain_one(crops[b:b + 1], lut, 0, score, od)
        if use_nuclear_in:
            score[0] = nuclear_in[b]
        _crop.box3_one(score, 0, smooth)
        m, c = nucleus[b:b + 1], cell[b:b + 1]
        _segment_one(smooth, od, 0, min_area, keep_gap, n_rays, step, m, c)
        acc = raw[b]
        acc[:] = 0.0
        _crop.region_stats_one(m, c, od, 0, acc)
        if acc[STAT_N_AREA] == 0:
            continue
        profile = np.full(n_angles, -1.0, np.float32)
        n = acc[STAT_N_AREA]
        _crop.radial_one(m, 0, acc[STAT_N_SY] / n + 0.5, acc[STAT_N_SX] / n + 0.5, profile)
        acc[N_STATS], acc[N_STATS + 1] = _crop.profile_one(profile, k_lo, cos_t, sin_t)
        acc[N_STATS + 2], acc[N_STATS + 3], acc[N_STATS + 4] = shape_one(m[0], min_radius, neck)


def morphology_features(crops, nuclear=None, return_masks: bool = False):
    """B x N_FEATURES float32 morphology features of uint8 RGB crops (B x S x S x 3).

    `nuclear` (B x S x S), if given, replaces the colour-space nuclear score, e.g. with
    `edge.stain.nuclear_concentration(crops)`. With `return_masks`, returns (features, nucleus, cell).
    Same results as running the stage functions one after another, in one parallel loop.
    """
    crops = _check_crops(crops)
    b, s = crops.shape[:2]
    use = nuclear is not None
    nuclear = np.ascontiguousarray(nuclear, dtype=np.float32) if use else np.zeros((1, s, s), np.float32)
    if use and nuclear.shape != (b, s, s):
        raise ValueError(f"nuclear must be {(b, s, s)}, got {nuclear.shape}")
    min_area, keep_gap, min_radius = _scaled(s)
    nucleus, cell = np.zeros((b, s, s), np.uint8), np.zeros((b, s, s), np.uint8)
    raw = np.zeros((b, N_RAW), np.float64)
    _features_kernel(crops, OD_LUT, nuclear, use, min_area, keep_gap, N_RAYS, OTSU_STEP, N_ANGLES,
                     SPIKE_HARMONIC, *_dft_tables(N_ANGLES), min_radius, LOBE_NECK, nucleus, cell, raw)
    feats = assemble(raw[:, :N_STATS], raw[:, N_STATS:N_STATS + 2], raw[:, N_STATS + 2:])
    return (feats, nucleus, cell) if return_masks else feats

"""CUDA (numba.cuda) twins of the hot per-pixel stages of features.py.

Built from the same scalar code as the CPU kernels (_scalar.py), so the two give the same numbers;
tests run these under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1, which must be set before numba.cuda
is first imported) and compare them with the CPU kernels. The connectivity-bound steps (component
labelling, rays, hull, lobes) stay on the CPU; they touch a few thousand pixels per crop.

Each host function takes NumPy arrays or device arrays (numba device arrays, CuPy arrays: anything
with __cuda_array_interface__) and returns NumPy arrays.

Launch shapes: one thread per pixel for the map; one block per crop for the per-crop reductions, each
thread folding a strided share of the pixels into registers before one shared-memory atomic per
accumulator, so thousands of threads never contend for the same 16 addresses.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, float32, float64, int32

from . import _scalar
from . import features as F
from .features import N_ANGLES, OD_LUT, OTSU_STEP

NBINS = _scalar.NBINS
N_STATS = _scalar.N_STATS
THREADS = 128  # per block for the per-crop kernels

_stain_pixel = cuda.jit(device=True)(_scalar.stain_pixel)
_hist_bin = cuda.jit(device=True)(_scalar.hist_bin)
_otsu_bin = cuda.jit(device=True)(_scalar.otsu_bin)
_region_code = cuda.jit(device=True)(_scalar.region_code)
_interior_abs_laplacian = cuda.jit(device=True)(_scalar.interior_abs_laplacian)
_is_boundary = cuda.jit(device=True)(_scalar.is_boundary)
_radial_sample = cuda.jit(device=True)(_scalar.radial_sample)


@cuda.jit
def _stain_maps_k(crops, lut, nuclear, od):
    i = cuda.grid(1)
    s = crops.shape[1]
    if i >= crops.shape[0] * s * s:
        return
    b, rem = i // (s * s), i % (s * s)
    y, x = rem // s, rem % s
    n, o = _stain_pixel(crops[b, y, x, 0], crops[b, y, x, 1], crops[b, y, x, 2], lut)
    nuclear[b, y, x] = n
    od[b, y, x] = o


@cuda.jit
def _otsu_k(maps, exclude, use_mask, step, out):
    b, tid, nt = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    s = maps.shape[1]
    g = (s + step - 1) // step  # grid points per side
    lohi = cuda.shared.array(2, float32)
    count = cuda.shared.array(1, int32)
    hist = cuda.shared.array(NBINS, int32)
    if tid == 0:
        lohi[0], lohi[1], count[0] = np.inf, -np.inf, 0
    for k in range(tid, NBINS, nt):
        hist[k] = 0
    cuda.syncthreads()
    lo, hi, n = float32(np.inf), float32(-np.inf), 0
    for i in range(tid, g * g, nt):
        y, x = (i // g) * step, (i % g) * step
        if not (use_mask and exclude[b, y, x] != 0):
            v = maps[b, y, x]
            lo, hi, n = min(lo, v), max(hi, v), n + 1
    cuda.atomic.min(lohi, 0, lo)
    cuda.atomic.max(lohi, 1, hi)
    cuda.atomic.add(count, 0, n)
    cuda.syncthreads()
    lo64, hi64 = float64(lohi[0]), float64(lohi[1])
    if count[0] == 0 or not hi64 > lo64:  # the same for every thread of the block: no divergence
        if tid == 0:
            out[b] = np.inf
        return
    scale = NBINS / (hi64 - lo64)
    for i in range(tid, g * g, nt):
        y, x = (i // g) * step, (i % g) * step
        if not (use_mask and exclude[b, y, x] != 0):
            cuda.atomic.add(hist, _hist_bin(maps[b, y, x], lo64, scale, NBINS), 1)
    cuda.syncthreads()
    if tid == 0:
        k = _otsu_bin(hist, NBINS)
        out[b] = np.inf if k < 0 else lo64 + (k + 1) / scale


@cuda.jit
def _region_stats_k(nucleus, cell, od, out):
    b, tid, nt = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    s = nucleus.shape[1]
    acc = cuda.local.array(N_STATS, float64)
    for k in range(N_STATS):
        acc[k] = 0.0
    for i in range(tid, s * s, nt):
        y, x = i // s, i % s
        code = _region_code(nucleus, cell, b, y, x)
        if code == 0:
            continue
        v = float64(od[b, y, x])
        lap = _interior_abs_laplacian(nucleus, cell, od, b, y, x, code)
        acc[6] += 1.0  # column numbers: STAT_* in features.py
        acc[7] += y
        acc[8] += x
        if code == 1:
            acc[0] += 1.0
            acc[1] += y
            acc[2] += x
            acc[3] += y * y
            acc[4] += x * x
            acc[5] += y * x
            acc[9] += v
            if lap >= 0.0:
                acc[12] += lap
                acc[13] += 1.0
        else:
            acc[10] += 1.0
            acc[11] += v
            if lap >= 0.0:
                acc[14] += lap
                acc[15] += 1.0
    total = cuda.shared.array(N_STATS, float64)
    if tid < N_STATS:
        total[tid] = 0.0
    cuda.syncthreads()
    for k in range(N_STATS):
        if acc[k] != 0.0:
            cuda.atomic.add(total, k, acc[k])
    cuda.syncthreads()
    if tid < N_STATS:
        out[b, tid] = total[tid]


@cuda.jit
def _radial_k(nucleus, centroids, out):
    b, tid, nt = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    s, nbins = nucleus.shape[1], out.shape[1]
    cy, cx = centroids[b, 0], centroids[b, 1]
    for i in range(tid, s * s, nt):
        y, x = i // s, i % s
        if _is_boundary(nucleus, b, y, x):
            k, r = _radial_sample(y, x, cy, cx, nbins)
            cuda.atomic.max(out, (b, k), float32(r))


def _device(a, dtype):
    """A device view of `a`: NumPy arrays are copied over, device arrays are used as they are."""
    if isinstance(a, np.ndarray):
        return cuda.to_device(np.ascontiguousarray(a, dtype=dtype))
    return cuda.as_cuda_array(a)


def _stain_maps_device(d_crops):
    """(nuclear score, mean OD) as device arrays of a crop batch already on the device."""
    b, s = d_crops.shape[0], d_crops.shape[1]
    nuclear = cuda.device_array((b, s, s), np.float32)
    od = cuda.device_array((b, s, s), np.float32)
    n = b * s * s
    _stain_maps_k[(n + 255) // 256, 256](d_crops, cuda.to_device(OD_LUT), nuclear, od)
    return nuclear, od


def stain_maps_cuda(crops) -> tuple[np.ndarray, np.ndarray]:
    """CUDA twin of features.stain_maps."""
    nuclear, od = _stain_maps_device(_device(crops, np.uint8))
    return nuclear.copy_to_host(), od.copy_to_host()


def otsu_thresholds_cuda(maps, exclude=None, step: int = OTSU_STEP) -> np.ndarray:
    """CUDA twin of features.otsu_thresholds."""
    d_maps = _device(maps, np.float32)
    use = exclude is not None
    d_ex = _device(exclude if use else np.zeros((1, 1, 1), np.uint8), np.uint8)
    out = cuda.device_array(d_maps.shape[0], np.float32)
    _otsu_k[d_maps.shape[0], THREADS](d_maps, d_ex, use, int(step), out)
    return out.copy_to_host()


def region_stats_cuda(nucleus, cell, od) -> np.ndarray:
    """CUDA twin of features.region_stats (sums in another order: equal to rounding)."""
    d_nuc = _device(nucleus, np.uint8)
    out = cuda.device_array((d_nuc.shape[0], N_STATS), np.float64)
    _region_stats_k[d_nuc.shape[0], THREADS](d_nuc, _device(cell, np.uint8), _device(od, np.float32), out)
    return out.copy_to_host()


def radial_profiles_cuda(nucleus, centroids, n_bins: int = N_ANGLES) -> np.ndarray:
    """CUDA twin of features.radial_profiles."""
    d_nuc = _device(nucleus, np.uint8)
    out = cuda.to_device(np.full((d_nuc.shape[0], n_bins), -1.0, np.float32))
    _radial_k[d_nuc.shape[0], THREADS](d_nuc, _device(centroids, np.float64), out)
    return out.copy_to_host()


def _check_device_crops(d_crops) -> None:
    shape = tuple(d_crops.shape)
    if len(shape) != 4 or shape[-1] != 3 or shape[1] != shape[2] or np.dtype(d_crops.dtype) != np.uint8:
        raise ValueError(f"expected uint8 B x S x S x 3 RGB crops, got {d_crops.dtype} {shape}")


def morphology_features_cuda(crops, nuclear=None, return_masks: bool = False):
    """The CUDA path of features.morphology_features, same columns, same numbers up to summation order.

    `crops` (uint8 B x S x S x 3) is a NumPy array (copied to the device once) or already a device array
    (CuPy, numba: used where it is). The per-pixel stages run as kernels on that device batch: stain
    maps, region sums (on the device OD map) and radial profiles; segmentation (connected components,
    rays) and shape (hull, lobes) are connectivity-bound and stay on the CPU, as in the module docstring.
    """
    d_crops = _device(crops, np.uint8)
    _check_device_crops(d_crops)
    d_score, d_od = _stain_maps_device(d_crops)
    od = d_od.copy_to_host()
    score = d_score.copy_to_host() if nuclear is None else np.asarray(nuclear, np.float32)
    if score.shape != od.shape:
        raise ValueError(f"nuclear must be {od.shape}, got {score.shape}")
    nucleus, cell = F.segment(score, od)
    b = nucleus.shape[0]
    d_nucleus = cuda.to_device(nucleus)
    stats = cuda.device_array((b, N_STATS), np.float64)
    if b:
        _region_stats_k[b, THREADS](d_nucleus, cuda.to_device(cell), d_od, stats)
    st = stats.copy_to_host()
    profiles = cuda.to_device(np.full((b, N_ANGLES), -1.0, np.float32))
    if b:
        _radial_k[b, THREADS](d_nucleus, cuda.to_device(F.nucleus_centroids(st)), profiles)
    feats = F.assemble(st, F.profile_features(profiles.copy_to_host()), F.shape_stats(nucleus))
    return (feats, nucleus, cell) if return_masks else feats

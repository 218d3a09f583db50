"""Per-pixel / per-histogram maths shared by the CPU (@njit) and CUDA (device) kernels.

Plain Python functions, compiled twice: features.py wraps them with `numba.njit`, cuda_kernels.py with
`numba.cuda.jit(device=True)`. Writing the arithmetic once is what lets the CUDA kernels be checked
for equality against the CPU ones. Each function is a leaf (calls no other helper here), because a
helper called by name from a compiled function must itself be compiled for that target.
"""
import math

import numpy as np

NBINS = 256  # Otsu histogram bins (a compile-time constant: CUDA shared arrays need a fixed size)
THIRD = np.float32(1.0 / 3.0)
N_STATS = 16  # region-statistics accumulators per crop (see STAT_* in features.py)


def stain_pixel(r, g, b, lut):
    """(nuclear score, mean optical density) of one RGB pixel, OD from a 256-entry table.

    The nuclear dye of Romanowsky stains absorbs green strongly and passes blue: OD_green - OD_blue
    is high on nuclei, near zero on red cells and negative on the background, and being a
    difference of ODs it does not change with illumination brightness.
    """
    odr = lut[r]
    odg = lut[g]
    odb = lut[b]
    return odg - odb, (odr + odg + odb) * THIRD


def hist_bin(v, lo, scale, nbins):
    """Histogram bin of value `v` for bins of width 1/scale starting at `lo`, clamped to the range."""
    k = int((float(v) - lo) * scale)
    if k < 0:
        return 0
    if k > nbins - 1:
        return nbins - 1
    return k


def otsu_bin(hist, nbins):
    """Last bin of the lower class that maximises Otsu's between-class variance (-1: one class only)."""
    total = 0.0
    sum_all = 0.0
    for i in range(nbins):
        total += hist[i]
        sum_all += i * hist[i]
    w0 = 0.0
    s0 = 0.0
    best = -1.0
    k_best = -1
    for k in range(nbins - 1):
        w0 += hist[k]
        s0 += k * hist[k]
        w1 = total - w0
        if w0 == 0.0 or w1 == 0.0:
            continue
        d = s0 / w0 - (sum_all - s0) / w1
        between = w0 * w1 * d * d
        if between > best:
            best = between
            k_best = k
    return k_best


def region_code(nucleus, cell, b, y, x):
    """1 for nucleus, 2 for cytoplasm (cell minus nucleus), 0 outside the cell."""
    if nucleus[b, y, x] != 0:
        return 1
    if cell[b, y, x] != 0:
        return 2
    return 0


def interior_abs_laplacian(nucleus, cell, od, b, y, x, code):
    """|4-neighbour Laplacian| of OD at (y, x) if all 4 neighbours share its region, else -1.

    Restricting texture to interior pixels keeps the nucleus/cytoplasm edge (a strong, boring
    gradient) out of the granularity and chromatin measures.
    """
    s = nucleus.shape[1]
    if y == 0 or x == 0 or y == s - 1 or x == s - 1:
        return -1.0
    for k in range(4):
        yy = y - 1 if k == 0 else (y + 1 if k == 1 else y)
        xx = x - 1 if k == 2 else (x + 1 if k == 3 else x)
        c = 1 if nucleus[b, yy, xx] != 0 else (2 if cell[b, yy, xx] != 0 else 0)
        if c != code:
            return -1.0
    c0 = float(od[b, y, x])
    v = 4.0 * c0 - float(od[b, y - 1, x]) - float(od[b, y + 1, x]) - float(od[b, y, x - 1]) \
        - float(od[b, y, x + 1])
    return abs(v)


def is_boundary(mask, b, y, x):
    """A mask pixel with a 4-neighbour outside the mask or on the crop's edge."""
    if mask[b, y, x] == 0:
        return False
    s = mask.shape[1]
    if y == 0 or x == 0 or y == s - 1 or x == s - 1:
        return True
    return mask[b, y - 1, x] == 0 or mask[b, y + 1, x] == 0 or mask[b, y, x - 1] == 0 \
        or mask[b, y, x + 1] == 0


def radial_sample(y, x, cy, cx, nbins):
    """(angle bin, radius) of a boundary pixel seen from the centroid (cy, cx).

    The radius is measured to the pixel's centre plus half a pixel, so the boundary of a digital disc
    of radius R reads ~R rather than ~R - 0.5.
    """
    dy = y + 0.5 - cy
    dx = x + 0.5 - cx
    a = math.atan2(dy, dx)
    k = int((a + math.pi) * (nbins / (2.0 * math.pi)))
    if k > nbins - 1:
        k = nbins - 1
    if k < 0:
        k = 0
    return k, math.sqrt(dy * dy + dx * dx) + 0.5

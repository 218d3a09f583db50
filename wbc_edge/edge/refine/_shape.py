"""Per-crop nucleus shape: convex hull and solidity, deepest concavity, lobe count (serial Numba
functions; CPU only: they follow pixel neighbourhoods and sort)."""
import math

import numpy as np
from numba import njit

from ._segment import bbox, fill_polygon


@njit(cache=True)
def _hull(mask, y0, y1, x0, x1):
    """Convex hull (counter-clockwise in x-right / y-down coordinates) of the mask's pixel squares.

    Only each row's leftmost and rightmost pixel can be hull vertices, so at most 4 corners a row go
    into Andrew's monotone chain.
    """
    s = mask.shape[0]
    pts = np.empty((4 * (y1 - y0 + 1), 2))
    m = 0
    for y in range(y0, y1 + 1):
        xl, xr = -1, -1
        for x in range(x0, x1 + 1):
            if mask[y, x]:
                if xl < 0:
                    xl = x
                xr = x
        if xl >= 0:
            for px, py in ((xl, y), (xl, y + 1), (xr + 1, y), (xr + 1, y + 1)):
                pts[m, 0], pts[m, 1] = px, py
                m += 1
    order = np.argsort(pts[:m, 0] * (4 * s + 4) + pts[:m, 1])  # by x, then y
    p = pts[:m][order]
    hull = np.empty((2 * m + 1, 2))
    k = 0
    for i in range(m):  # lower chain
        while k >= 2 and _cross(hull[k - 2], hull[k - 1], p[i]) <= 0:
            k -= 1
        hull[k] = p[i]
        k += 1
    lower = k + 1
    for i in range(m - 2, -1, -1):  # upper chain
        while k >= lower and _cross(hull[k - 2], hull[k - 1], p[i]) <= 0:
            k -= 1
        hull[k] = p[i]
        k += 1
    return hull[:k - 1]  # the last point repeats the first


@njit(cache=True)
def _cross(o, a, b):
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


@njit(cache=True)
def _polygon_area(h):
    a = 0.0
    n = h.shape[0]
    for i in range(n):
        j = (i + 1) % n
        a += h[i, 0] * h[j, 1] - h[j, 0] * h[i, 1]
    return abs(a) / 2.0


@njit(cache=True)
def _defect_depth(mask, hull, y0, y1, x0, x1):
    """Deepest concavity: the largest distance from a non-nucleus pixel inside the convex hull to the
    outside of the hull (px). Computed as a chamfer distance on the rasterised hull (two passes over
    the box) rather than a point-to-edge test for every pixel and edge."""
    h, w = y1 - y0 + 1, x1 - x0 + 1
    filled = np.zeros((h, w), np.uint8)
    fill_polygon(hull[:, 1] - y0, hull[:, 0] - x0, filled)
    for y in range(h):  # the raster samples pixel centres: make sure the nucleus is inside
        for x in range(w):
            if mask[y0 + y, x0 + x]:
                filled[y, x] = 1
    d = _distance_inside(filled, 0, h - 1, 0, w - 1)
    deepest = 0.0
    for y in range(h):
        for x in range(w):
            if not mask[y0 + y, x0 + x]:
                deepest = max(deepest, d[y + 1, x + 1])
    return deepest


@njit(cache=True)
def _distance_inside(mask, y0, y1, x0, x1):
    """Chamfer (1, sqrt 2) distance to the nearest non-mask pixel, on the box y0..y1, x0..x1 (which
    must hold the whole mask) plus a 1-px margin: d[y, x] belongs to pixel (y0 + y - 1, x0 + x - 1)."""
    h, w = y1 - y0 + 3, x1 - x0 + 3
    d = np.zeros((h, w))
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            d[y, x] = np.inf if mask[y0 + y - 1, x0 + x - 1] else 0.0
    r2 = math.sqrt(2.0)
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            if d[y, x] > 0:
                d[y, x] = min(d[y, x], d[y - 1, x] + 1, d[y, x - 1] + 1,
                              d[y - 1, x - 1] + r2, d[y - 1, x + 1] + r2)
    for y in range(h - 2, 0, -1):
        for x in range(w - 2, 0, -1):
            if d[y, x] > 0:
                d[y, x] = min(d[y, x], d[y + 1, x] + 1, d[y, x + 1] + 1,
                              d[y + 1, x + 1] + r2, d[y + 1, x - 1] + r2)
    return d


@njit(cache=True)
def _deepest_first(flat, pix):
    """`pix` ordered by decreasing `flat`, to 1/8 px: a counting sort, several times faster than a
    comparison sort here; pixels within 1/8 px of each other may come in either order, which moves a
    merge level by at most that much."""
    levels = np.empty(pix.size, np.int64)
    top = 0
    for i in range(pix.size):
        levels[i] = int(flat[pix[i]] * 8.0)
        top = max(top, levels[i])
    start = np.zeros(top + 2, np.int64)
    for i in range(pix.size):
        start[top - levels[i] + 1] += 1
    for k in range(1, top + 2):
        start[k] += start[k - 1]
    order = np.empty(pix.size, np.int64)
    for i in range(pix.size):
        k = top - levels[i]
        order[start[k]] = pix[i]
        start[k] += 1
    return order


@njit(cache=True)
def _find(parent, p):
    while parent[p] != p:
        parent[p] = parent[parent[p]]  # path halving
        p = parent[p]
    return p


@njit(cache=True)
def _count_lobes(d, min_radius, neck):
    """Lobes as persistent peaks of the distance map (0-dimensional persistence of its upper sets).

    Pixels join from the deepest down; when two growing regions meet, the one with the lower peak
    ends there. It was a lobe if its peak (inscribed radius) is at least `min_radius` and the level
    where it met the other (the neck's half-width) is at most `neck` x its peak. Regions that never
    meet (pieces separated by background) each count if deep enough. A bump on an elongated nucleus
    or a pixel-noise maximum on its ridge meets its neighbour almost at its own height: not a lobe.
    """
    h, w = d.shape
    flat = d.ravel()
    # A region still separate when the sweep reaches neck * min_radius is a lobe whatever happens
    # below (it would end at a level < neck * its peak), so the shallow rim need not be visited.
    pix = np.nonzero(flat >= neck * min_radius)[0]
    order = _deepest_first(flat, pix)
    parent = np.full(h * w, -1, np.int64)
    peak = np.zeros(h * w)
    lobes = 0
    for p in order:
        parent[p], peak[p] = p, flat[p]
        y, x = p // w, p % w
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                q = (y + dy) * w + (x + dx)
                if (dy == 0 and dx == 0) or parent[q] < 0:
                    continue
                rp, rq = _find(parent, p), _find(parent, q)
                if rp == rq:
                    continue
                young, old = (rp, rq) if peak[rp] < peak[rq] else (rq, rp)
                if peak[young] >= min_radius and flat[p] <= neck * peak[young]:
                    lobes += 1
                parent[young] = old
    for p in pix:
        if parent[p] == p and peak[p] >= min_radius:
            lobes += 1
    return lobes


@njit(cache=True)
def shape_one(mask, min_radius, neck):
    """(convex hull area px^2, deepest concavity px, lobe count) of one nucleus mask (2-D)."""
    y0, y1, x0, x1 = bbox(mask)
    if y1 < 0:
        return 0.0, 0.0, 0.0
    hull = _hull(mask, y0, y1, x0, x1)
    lobes = _count_lobes(_distance_inside(mask, y0, y1, x0, x1), min_radius, neck)
    return _polygon_area(hull), _defect_depth(mask, hull, y0, y1, x0, x1), float(lobes)

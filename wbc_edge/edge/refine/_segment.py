"""Per-crop segmentation of the nucleus and the cell (serial Numba functions; features.py runs them
over a batch in parallel). Connectivity-bound, so CPU only.

Nucleus: threshold of the (smoothed) nuclear score -> 8-connected components -> the biggest one near
the crop's centre plus pieces close to it (lobes) -> 3x3 closing -> holes filled.
Cell: rays from the nucleus centroid out to the first background gap beyond the last nuclear pixel;
ray lengths clipped to a circular running median and a cap, because a red cell touching the white
cell is not background and would otherwise extend the ray; the star polygon is rasterised and united
with the nucleus. White cells are roughly star-shaped about their nucleus, which is what makes this
prior safe.
"""
import math

import numpy as np
from numba import njit

RAY_BG_RUN = 2   # background pixels in a row that end the cell along a ray
CELL_CAP = 1.3   # a ray longer than this x the median ray ran into a touching red cell


@njit(cache=True)
def _label_components(fg, min_area, labels, stack):
    """8-connected components of `fg` by flood fill (labels from 1). Returns (count, comps): comps
    holds one row (label, area, sum y, sum x, y0, y1, x0, x1) per component of at least `min_area`
    pixels; the many specks below it are labelled but not kept."""
    s = fg.shape[0]
    count, n_big = 0, 0
    comps = np.empty((16, 8))
    for y0 in range(s):
        for x0 in range(s):
            if fg[y0, x0] == 0 or labels[y0, x0] != 0:
                continue
            count += 1
            labels[y0, x0] = count
            top = 0
            stack[0] = y0 * s + x0
            area, sy, sx, ya, yb, xa, xb = 0, 0, 0, s, -1, s, -1
            while top >= 0:
                p = stack[top]
                top -= 1
                y, x = p // s, p % s
                area, sy, sx = area + 1, sy + y, sx + x
                ya, yb, xa, xb = min(ya, y), max(yb, y), min(xa, x), max(xb, x)
                for yy in range(max(0, y - 1), min(s, y + 2)):
                    for xx in range(max(0, x - 1), min(s, x + 2)):
                        if fg[yy, xx] != 0 and labels[yy, xx] == 0:
                            labels[yy, xx] = count
                            top += 1
                            stack[top] = yy * s + xx
            if area >= min_area:
                if n_big == comps.shape[0]:
                    grown = np.empty((2 * n_big, 8))
                    grown[:n_big] = comps
                    comps = grown
                comps[n_big, 0], comps[n_big, 1], comps[n_big, 2], comps[n_big, 3] = count, area, sy, sx
                comps[n_big, 4], comps[n_big, 5], comps[n_big, 6], comps[n_big, 7] = ya, yb, xa, xb
                n_big += 1
    return count, comps[:n_big]


@njit(cache=True)
def _choose_nucleus(comps, s, keep_gap):
    """Which components form the centred cell's nucleus: the biggest near the centre plus its lobes."""
    n = comps.shape[0]
    keep = np.zeros(n, np.bool_)
    if n == 0:
        return keep
    cy, cx = comps[:, 2] / comps[:, 1] + 0.5, comps[:, 3] / comps[:, 1] + 0.5
    radius = np.sqrt(comps[:, 1] / math.pi)
    main, main_area, nearest, nearest_d = -1, 0.0, 0, np.inf
    for i in range(n):
        d = math.hypot(cy[i] - s / 2.0, cx[i] - s / 2.0)
        if d <= s / 4.0 and comps[i, 1] > main_area:
            main, main_area = i, comps[i, 1]
        if d < nearest_d:
            nearest, nearest_d = i, d
    keep[main if main >= 0 else nearest] = True
    # Lobes of one nucleus sit a few pixels apart; the next cell's nucleus is a cytoplasm width away.
    # Edge-to-edge gaps are estimated from centroids and equivalent radii; repeated so chains join.
    for _ in range(4):
        changed = False
        for i in range(n):
            for j in range(n):
                if not keep[i] and keep[j] and \
                        math.hypot(cy[i] - cy[j], cx[i] - cx[j]) - radius[i] - radius[j] <= keep_gap:
                    keep[i] = True
                    changed = True
        if not changed:
            break
    return keep


@njit(cache=True)
def bbox(mask):
    """(y0, y1, x0, x1) inclusive bounds of the non-zero pixels of 2-D `mask`; y1 < 0 if none."""
    s, w = mask.shape
    y0, y1, x0, x1 = s, -1, w, -1
    for y in range(s):
        row = mask[y]
        hit = 0
        for x in range(w):  # branch-free, so it vectorises: most rows are empty
            hit |= row[x]
        if hit == 0:
            continue
        y0, y1 = min(y0, y), y
        xl = 0
        while row[xl] == 0:
            xl += 1
        xr = w - 1
        while row[xr] == 0:
            xr -= 1
        x0, x1 = min(x0, xl), max(x1, xr)
    return y0, y1, x0, x1


@njit(cache=True)
def _close3(mask):
    """3x3 closing in place, on the mask's box: seals pale-chromatin pits and channels that would
    otherwise read as holes and extra lobes. Pieces 1-2 px apart join (lobe counting copes)."""
    s = mask.shape[0]
    y0, y1, x0, x1 = bbox(mask)
    if y1 < 0:
        return
    y0, y1, x0, x1 = max(0, y0 - 1), min(s - 1, y1 + 1), max(0, x0 - 1), min(s - 1, x1 + 1)
    h, w = y1 - y0 + 1, x1 - x0 + 1
    grown = np.zeros((h + 2, w + 2), np.bool_)  # dilation, with a 1-px frame left empty
    for y in range(h):
        for x in range(w):
            if mask[y0 + y, x0 + x]:
                for yy in range(y, y + 3):
                    for xx in range(x, x + 3):
                        grown[yy, xx] = True
    for y in range(h):  # erosion of the dilation; the crop's edge counts as mask, so it is kept
        for x in range(w):
            keep = True
            for yy in range(y, y + 3):
                for xx in range(x, x + 3):
                    gy, gx = y0 + yy - 1, x0 + xx - 1
                    if 0 <= gy < s and 0 <= gx < s and not grown[yy, xx]:
                        keep = False
            if keep:
                mask[y0 + y, x0 + x] = 1


@njit(cache=True)
def _fill_holes(mask):
    """Set pixels of `mask` (2-D uint8) not 4-connected to the outside of its bounding box."""
    y0, y1, x0, x1 = bbox(mask)
    if y1 < 0:
        return
    h, w = y1 - y0 + 1, x1 - x0 + 1
    outside = np.zeros((h, w), np.bool_)
    stack = np.empty(h * w, np.int64)
    top = -1
    for y in range(h):  # seeds: non-mask pixels on the box's border
        for x in range(w):
            if (y == 0 or x == 0 or y == h - 1 or x == w - 1) and not mask[y0 + y, x0 + x]:
                outside[y, x] = True
                top += 1
                stack[top] = y * w + x
    while top >= 0:
        p = stack[top]
        top -= 1
        y, x = p // w, p % w
        for k in range(4):
            yy = y - 1 if k == 0 else (y + 1 if k == 1 else y)
            xx = x - 1 if k == 2 else (x + 1 if k == 3 else x)
            if 0 <= yy < h and 0 <= xx < w and not outside[yy, xx] and not mask[y0 + yy, x0 + xx]:
                outside[yy, xx] = True
                top += 1
                stack[top] = yy * w + xx
    for y in range(h):
        for x in range(w):
            if not outside[y, x]:
                mask[y0 + y, x0 + x] = 1


@njit(cache=True)
def nucleus_one(score, t, min_area, keep_gap, out):
    """Nucleus mask of one crop (2-D uint8 `out`, overwritten) from its score map and threshold."""
    s = score.shape[0]
    fg = np.empty((s, s), np.uint8)
    for y in range(s):
        for x in range(s):
            fg[y, x] = score[y, x] >= t
    labels = np.zeros((s, s), np.int32)
    count, comps = _label_components(fg, min_area, labels, np.empty(s * s, np.int32))
    keep = _choose_nucleus(comps, s, keep_gap)
    kept = np.zeros(count + 1, np.bool_)
    out[:] = 0
    for i in range(comps.shape[0]):
        if not keep[i]:
            continue
        kept[int(comps[i, 0])] = True
    for i in range(comps.shape[0]):
        if keep[i]:
            for y in range(int(comps[i, 4]), int(comps[i, 5]) + 1):
                for x in range(int(comps[i, 6]), int(comps[i, 7]) + 1):
                    if kept[labels[y, x]]:
                        out[y, x] = 1
    _close3(out)
    _fill_holes(out)


@njit(cache=True)
def _smoothed(od, y, x):
    """3x3 mean of OD around (y, x), clamped at the crop's edge: one stray pixel must not end a ray."""
    s = od.shape[0]
    acc, n = 0.0, 0
    for yy in range(max(0, y - 1), min(s, y + 2)):
        for xx in range(max(0, x - 1), min(s, x + 2)):
            acc += od[yy, xx]
            n += 1
    return acc / n


@njit(cache=True)
def _ray_lengths(od, t_bg, nucleus, cy, cx, r_nuc, n_rays):
    """Distance from the nucleus centroid to the first background gap after the last nuclear pixel."""
    s = od.shape[0]
    r = np.empty(n_rays)
    for a in range(n_rays):
        dy, dx = math.sin(2 * math.pi * a / n_rays), math.cos(2 * math.pi * a / n_rays)
        stop, run, step = -1.0, 0, 0
        while True:
            iy, ix = int(math.floor(cy + step * dy)), int(math.floor(cx + step * dx))
            if iy < 0 or ix < 0 or iy >= s or ix >= s:
                if stop < 0:
                    stop = step  # the cell runs off the crop
                break
            if stop >= 0 and step > r_nuc:
                break  # past the nucleus' reach: no lobe can reopen the ray
            if nucleus[iy, ix]:
                stop, run = -1.0, 0  # a lobe further out: the cell goes on at least to here
            elif _smoothed(od, iy, ix) < t_bg:
                run += 1
                if run == RAY_BG_RUN and stop < 0:
                    stop = step - RAY_BG_RUN + 1
            else:
                run = 0
            step += 1
        r[a] = stop
    return r


@njit(cache=True)
def _robust_radii(r):
    """Clip rays that ran on into touching red cells: below the local (circular) median and a cap."""
    n = r.size
    half = max(1, n // 8)  # +-45 degrees: wider than the arc a touching red cell covers
    cap = CELL_CAP * np.median(r)
    out = np.empty(n)
    window = np.empty(2 * half + 1)
    for a in range(n):
        for k in range(-half, half + 1):
            window[k + half] = r[(a + k) % n]
        out[a] = min(r[a], np.median(window), cap)
    return out


@njit(cache=True)
def fill_polygon(vy, vx, out):
    """Rasterise a closed polygon into `out` (even-odd rule, sampled at pixel centres)."""
    h, w = out.shape
    n = vy.size
    xs = np.empty(n)
    for y in range(max(0, int(vy.min())), min(h, int(vy.max()) + 1)):
        yc = y + 0.5
        m = 0
        for i in range(n):
            j = (i + 1) % n
            if (vy[i] <= yc < vy[j]) or (vy[j] <= yc < vy[i]):
                xs[m] = vx[i] + (yc - vy[i]) * (vx[j] - vx[i]) / (vy[j] - vy[i])
                m += 1
        xs_sorted = np.sort(xs[:m])
        for k in range(0, m - 1, 2):
            x_from = max(0, int(math.ceil(xs_sorted[k] - 0.5)))  # centres x + 0.5 in [xs_k, xs_k+1)
            for x in range(x_from, min(w, int(math.ceil(xs_sorted[k + 1] - 0.5)))):
                out[y, x] = 1


@njit(cache=True)
def cell_one(od, t_bg, nucleus, n_rays, out):
    """Cell mask of one crop: the star-shaped region the rays reach, united with the nucleus."""
    y0, y1, x0, x1 = bbox(nucleus)
    if y1 < 0:
        return
    n, sy, sx = 0, 0.0, 0.0
    for y in range(y0, y1 + 1):
        for x in range(x0, x1 + 1):
            if nucleus[y, x]:
                n, sy, sx = n + 1, sy + y, sx + x
    cy, cx = sy / n + 0.5, sx / n + 0.5
    r_nuc = max(math.hypot(cy - y0, cx - x0), math.hypot(cy - y0, x1 + 1 - cx),
                math.hypot(y1 + 1 - cy, cx - x0), math.hypot(y1 + 1 - cy, x1 + 1 - cx))
    r = _robust_radii(_ray_lengths(od, t_bg, nucleus, cy, cx, r_nuc, n_rays))
    vy, vx = np.empty(n_rays), np.empty(n_rays)
    for a in range(n_rays):
        vy[a] = cy + r[a] * math.sin(2 * math.pi * a / n_rays)
        vx[a] = cx + r[a] * math.cos(2 * math.pi * a / n_rays)
    fill_polygon(vy, vx, out)
    for y in range(y0, y1 + 1):
        for x in range(x0, x1 + 1):
            if nucleus[y, x]:
                out[y, x] = 1

"""Numba kernels of the impulse-noise detector and restorer (wbc_edge.edge.quality).

A module of their own so that importing `quality` (and every stream) does not import Numba: the
detector's NumPy pre-check clears clean images without them, and Numba with its compiled code costs
about 100 MB of RSS, which an edge device should only pay when noise actually shows up.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _median3(img, y, x, c, buf):
    """3x3 median of channel c around (y, x), borders replicated (as cv2.medianBlur does)."""
    h, w = img.shape[0], img.shape[1]
    n = 0
    for dy in (-1, 0, 1):
        yy = min(max(y + dy, 0), h - 1)
        for dx in (-1, 0, 1):
            v = img[yy, min(max(x + dx, 0), w - 1), c]
            j = n
            while j > 0 and buf[j - 1] > v:
                buf[j] = buf[j - 1]
                j -= 1
            buf[j] = v
            n += 1
    return buf[4]


@njit(cache=True)
def _impulse_rows(im, diff, counts):
    # one thread: a scan is well under a millisecond, and the stream's other stages own the cores
    h, w, ch = im.shape
    for y in range(h):
        buf = np.empty(9, np.uint8)
        k = 0
        for x in range(w):
            for c in range(ch):
                z = im[y, x, c]
                # the median is needed only at 0/255 values, which are rare in real images
                if (z == 0 or z == 255) and abs(np.int16(z) - np.int16(_median3(im, y, x, c, buf))) > diff:
                    k += 1
                    break  # a pixel counts once, whichever channel fired
        counts[y] = k


@njit(cache=True)
def _window_stats(img, y, x, c, r, buf):
    """(min, median, max) of the (2r+1)^2 window around (y, x) in channel c, clipped at the border."""
    h, w = img.shape[0], img.shape[1]
    n = 0
    for yy in range(max(0, y - r), min(h, y + r + 1)):
        for xx in range(max(0, x - r), min(w, x + r + 1)):
            v = img[yy, xx, c]
            j = n  # insertion sort as we gather: windows hold at most 49 values
            while j > 0 and buf[j - 1] > v:
                buf[j] = buf[j - 1]
                j -= 1
            buf[j] = v
            n += 1
    return buf[0], buf[n // 2], buf[n - 1]


@njit(cache=True)
def _amf_value(img, y, x, c, max_radius, buf):
    """Adaptive median (Hwang & Haddad): grow the window until its median is not itself an impulse,
    then keep the pixel if it is not an extreme of the window, else take the median."""
    z = img[y, x, c]
    med = z
    for r in range(1, max_radius + 1):
        lo, med, hi = _window_stats(img, y, x, c, r, buf)
        if lo < med < hi:
            return z if lo < z < hi else med
    return med


@njit(parallel=True, cache=True)
def _amf_batch(batch, out, max_radius):
    b, h, w, ch = batch.shape
    for i in prange(b * h):  # rows of all images: enough parallel work even for a batch of one
        n, y = i // h, i % h
        buf = np.empty((2 * max_radius + 1) ** 2, np.uint8)
        for x in range(w):
            for c in range(ch):
                z = batch[n, y, x, c]
                # only 0/255 values can be salt or pepper; everything else is copied untouched
                impulse = z == 0 or z == 255
                out[n, y, x, c] = _amf_value(batch[n], y, x, c, max_radius, buf) if impulse else z

"""WBC localiser for full microscope frames: stain-based nucleus detection -> one cell box per WBC.

Why colour works: in a Romanowsky/Wright-stained smear only white-cell nuclei (and platelets, which
are small) take up the blue-purple nuclear dye; red cells are pink and the background is pale.
A per-pixel score "blueness" = B - (R + G) / 2 is a colour-space stand-in for the nuclear-dye
concentration of colour deconvolution, and costs one pass.

Why it must be relative, not absolute: another microscope changes everything an absolute threshold
rests on. A Raspberry Pi camera on another lab's scope (benchmarks: Chula) has vignetting whose colour
drifts from pink at the rim to blue-green in the centre, soft focus with blue/yellow colour fringes
round every red cell, another stain, and red cells packed edge to edge; a fixed blueness cut found
64 "cells" for 30 there. So, each step physically motivated and none tied to one stain or camera:

  1. scale: every length and area is in red-cell diameters (7-8 um in any lab): `rbc_px` is given
     by the caller (a stream pools it per slide), or set in the config, or measured on the frame
     (wbc_edge.edge.scale; BCCD's 91 px if nothing can be measured). The frame is shrunk until a red
     cell spans `work_rbc_px` (speed; a 2x magnification then gives the same cells): a block mean by
     the largest whole factor first (cheap), the rest with an area resize of the smaller image;
  2. flat field: the frame is divided by its local background colour, a per-channel median over
     `background_window` red cells (a median ignores bright pallor highlights; the window dwarfs a
     nucleus; a second pass leaves stained pixels out). Light falloff, the lamp's colour and white
     balance are per-channel gains, so they divide out exactly; where red cells are packed the
     "background" is their colour, and they divide out too. Blueness is then in % of the background;
  3. blur at `blur_sigma` (~0.1 red cell): wider than colour fringes of soft focus, which are a
     blue and a yellow band side by side and cancel, narrower than a nucleus, which stays;
  4. two cuts from the frame itself: Otsu over the frame separates stained material ("stained":
     nuclei plus the bluish cytoplasm and granules next to them); Otsu over the stained pixels alone
     separates the dense nucleus. Each cut has a floor relative to the frame's own spread (median +
     n robust sigmas: a pale stain lowers nuclei and noise alike) and a small absolute floor, so a
     frame without any stained object gives no boxes;
  5. opening removes specks; a dilation by `merge_radius` joins the lobes of a segmented nucleus
     into one cell; nucleus area limits drop platelets (small) and stain blotches (huge); a cell
     cut by the frame edge is kept only with enough nucleus in view;
  6. the cell box: the stained region connected to that nucleus, limited to a disc around it
     (neighbouring cells must not be swallowed); boxes that mostly overlap are one cell (lobes
     further apart than the merge radius); finally padded by a fitted fraction, because pale
     cytoplasm is barely stained and the annotated box encloses the whole cell.

Figures (benchmarks/results/localise.md): fitted on even BCCD frames only, reported on the odd ones
and on the Chula frames, never fitted on.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

from ..xp import to_numpy
from .scale import estimate_scale

REF_RBC_PX = 91.0  # red-cell diameter of a BCCD frame (640x480): where the defaults were first fitted
# red-cell diameter (px) of the small image the background colour is estimated on: 4, not 8, measured
# the same recall and precision on BCCD and Chula with a quarter of the median filtering (the median is
# over 4 red cells and smoothed over half of one: 4 px per red cell resolve that)
BACKGROUND_PX = 4
# The block mean may leave a red cell down to this fraction of `work_rbc_px` (then no second resize: a
# 1440x900 Chula frame, red cells 85 px, is localised at 28 px by a 3x3 block mean). Measured: the same
# cells on BCCD and Chula at IoU 0.3, and at 0.5 on Chula; 24 px lost a Chula box at IoU 0.5.
BLOCK_SLACK = 0.85


@dataclass(frozen=True)
class LocaliserConfig:
    """Every knob of the localiser; JSON-able so a bundle can store the values it was checked with.

    Lengths are in red-cell diameters and areas in squared red-cell diameters (a red cell is 7-8 um
    in any lab), so one config serves every microscope; scores are in % of the local background
    brightness. Defaults were chosen on the even-numbered BCCD frames (benchmarks/bench_localise.py)
    and are reported on the odd-numbered ones and on frames of another lab (Chula, never fitted on).
    """

    rbc_px: float | None = None  # red-cell diameter in px of the frames; None: measured on each frame
    # frames are shrunk (never enlarged) until a red cell spans this many px. 32, not the 48 the fit ran
    # at: the same recall and precision (IoU 0.3 and 0.5) on BCCD and Chula, 3x less time per frame
    work_rbc_px: float = 32.0
    background_window: float = 4.0  # RBC; median window of the local background colour (>> a nucleus)
    blur_sigma: float = 0.12  # RBC; wider than the colour fringes of soft focus (they cancel), < a nucleus
    stained_floor: float = 6.0  # % blueness; the stained cut is never below this ...
    stained_spread: float = 2.0  # ... nor below the frame's median + this many robust sigmas
    nucleus_floor: float = 12.0  # % blueness; the nucleus cut is never below this ...
    nucleus_spread: float = 4.0  # ... nor below the frame's median + this many robust sigmas
    open_radius: float = 0.022  # RBC; opening removes specks and thin fringes narrower than this
    merge_radius: float = 0.15  # RBC; nucleus lobes closer than about twice this form one cell
    min_area: float = 0.24  # RBC^2 of nucleus; platelet clumps reach ~0.2, a small lymphocyte ~0.5
    max_area: float = 7.2  # RBC^2 of nucleus; beyond this it is a stain blotch, not a cell
    cell_radius: float = 2.0  # cell disc radius / nucleus equivalent radius (caps the growth)
    edge_min_area: float = 0.36  # RBC^2; a cell cut by the frame edge needs this much nucleus in view
    merge_overlap: float = 0.2  # join cell boxes whose intersection covers this much of the smaller
    box_pad: float = 0.15  # fraction of the cell box side added on each side (fitted)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "LocaliserConfig":
        """Build from a bundle's dict; unknown keys are an error (a typo must not silently do nothing)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LocaliserConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "LocaliserConfig":
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class Box:
    """One white cell: its box in frame pixels (x1, y1 exclusive), a confidence-like score in
    [0, 1] (mean nucleus blueness, in % of the background, / 64) and the nucleus area in px."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    nucleus_area: int

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]


def nuclear_score(frame: np.ndarray, blur_sigma: float = 1.5) -> np.ndarray:
    """Per-pixel raw blueness B - (R+G)/2 (float32 HxW, roughly -60..130) of an unflattened frame."""
    f = frame.astype(np.float32)
    s = f[..., 2] - 0.5 * (f[..., 0] + f[..., 1])
    return cv2.GaussianBlur(s, (0, 0), blur_sigma) if blur_sigma > 0 else s


def frame_rbc_px(frame: np.ndarray, cfg: LocaliserConfig, rbc_px: float | None = None) -> float:
    """The red-cell diameter (px) to use: the caller's, the config's, measured here, or BCCD's."""
    if rbc_px:
        return float(rbc_px)
    if cfg.rbc_px:
        return float(cfg.rbc_px)
    return estimate_scale(frame).rbc_px or REF_RBC_PX


def work_image(frame: np.ndarray, rbc_px: float, work_rbc_px: float) -> np.ndarray:
    """The frame shrunk (never enlarged) until a red cell spans about `work_rbc_px`. First a block mean by
    the largest whole factor f that keeps a red cell at least BLOCK_SLACK x that wide (OpenCV's area resize
    has a fast path for whole ratios: 0.3 ms for a 1440x900 frame against 5 ms for another ratio; the last
    < f rows and columns are left out), then, if still larger, a resize the rest of the way: bilinear,
    since that rest is under 2x (f was the largest whole factor; area averaging buys nothing there that
    the score's blur of ~4 px does not, and cost 2.3 against 0.3 ms on a 720x450 frame)."""
    h, w = frame.shape[:2]
    f = max(1, min(int(rbc_px // (BLOCK_SLACK * work_rbc_px)), h, w))
    if f > 1:
        frame = cv2.resize(frame[:h - h % f, :w - w % f], (w // f, h // f), interpolation=cv2.INTER_AREA)
    k = min(1.0, work_rbc_px * f / rbc_px)
    if k == 1.0:
        return frame
    h, w = frame.shape[:2]
    return cv2.resize(frame, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_LINEAR)


def _median(small: np.ndarray, ksize: int, smooth: float) -> np.ndarray:
    """Per-channel median over ksize px, the border mirrored (replicating it would let a cell at the
    edge fill the window with itself), then smoothed: the median's blocks would print."""
    p = ksize // 2
    pad = cv2.copyMakeBorder(small, p, p, p, p, cv2.BORDER_REFLECT_101)
    med = cv2.medianBlur(pad, ksize)[p:p + small.shape[0], p:p + small.shape[1]]
    return cv2.GaussianBlur(med.astype(np.float32), (0, 0), smooth)


def background(frame: np.ndarray, rbc_px: float, window: float, stained_floor: float = 6.0) -> np.ndarray:
    """Local background colour (float32 HxWx3): a per-channel median over `window` red cells, on an
    image shrunk to BACKGROUND_PX per red cell. A median ignores the specular pallor highlights a max
    filter would pick, and the window is far larger than a nucleus; a second pass leaves out what the
    first found stained, so a large cell never sets its own background. Where red cells are packed it
    is their colour, which is as good: they are divided out like the background."""
    h, w = frame.shape[:2]
    k = min(1.0, BACKGROUND_PX / rbc_px)
    small = cv2.resize(frame, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)
    ksize, smooth = min(255, max(3, int(window * rbc_px * k) | 1)), max(0.5, rbc_px * k / 2)
    bg = _median(small, ksize, smooth)
    t = small.astype(np.float32) / np.maximum(bg, 1.0)
    stained = 100.0 * (t[..., 2] - 0.5 * (t[..., 0] + t[..., 1])) > stained_floor
    if stained.any():
        small = np.where(stained[..., None], np.clip(bg, 0, 255).astype(np.uint8), small)
        bg = _median(small, ksize, smooth)
    return cv2.resize(bg, (w, h), interpolation=cv2.INTER_LINEAR)


def flat_blueness(frame: np.ndarray, rbc_px: float, cfg: LocaliserConfig) -> np.ndarray:
    """Blueness of the frame divided by its local background, in % (0 on background and on red
    cells alike, whatever the light, its colour or vignetting; 20-60 on nuclei)."""
    t = frame.astype(np.float32) / np.maximum(background(frame, rbc_px, cfg.background_window, cfg.stained_floor), 1.0)
    return 100.0 * (t[..., 2] - 0.5 * (t[..., 0] + t[..., 1]))


def _blur(score: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(score, (0, 0), sigma) if sigma > 0.3 else score


def _otsu(values: np.ndarray, floor: float) -> float:
    """Otsu's cut on `values`, never below `floor`; the floor alone if too few values."""
    if values.size < 64:
        return floor
    lo, hi = np.percentile(values, (0.1, 99.9))
    if hi - lo < 1e-3:
        return floor
    v8 = np.clip((values - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8).reshape(1, -1)
    cut, _ = cv2.threshold(v8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return max(lo + cut * (hi - lo) / 255.0, floor)


def _disc(radius: float) -> np.ndarray:
    r = max(1, int(round(radius)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def masks(frame: np.ndarray, cfg: LocaliserConfig, rbc_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, stained mask, nucleus mask) for one frame whose red cells span `rbc_px`; masks uint8 0/1.

    Floors are relative to the frame's own spread (median + n robust sigmas): a soft-focus or pale
    stain lowers nuclei and fringes alike, and a noisy one raises both, so no cut is tied to one stain."""
    raw = flat_blueness(frame, rbc_px, cfg)
    score = _blur(raw, cfg.blur_sigma * rbc_px)
    sample = score[::2, ::2]  # a quarter of the pixels is plenty for a cut
    med = float(np.median(sample))
    sigma = 1.4826 * float(np.median(np.abs(sample - med)))
    t_stained = _otsu(sample, max(cfg.stained_floor, med + cfg.stained_spread * sigma))
    floor = max(cfg.nucleus_floor, med + cfg.nucleus_spread * sigma, t_stained)
    nucleus = (score > _otsu(score[score > t_stained], floor)).astype(np.uint8)
    stained = score > t_stained
    nucleus = cv2.morphologyEx(nucleus, cv2.MORPH_OPEN, _disc(cfg.open_radius * rbc_px))
    return score, stained.astype(np.uint8), nucleus


def _cell_box(stained: np.ndarray, nuc: np.ndarray, x: int, y: int, cfg: LocaliserConfig):
    """Box of the stained region around one nucleus (nuc: its mask inside the window at x, y)."""
    ys, xs = np.nonzero(nuc)
    cy, cx = y + ys.mean(), x + xs.mean()
    r = cfg.cell_radius * np.sqrt(nuc.sum() / np.pi)
    h, w = stained.shape
    # The window holds the disc and the whole nucleus (an elongated band nucleus may leave the disc).
    wx0, wy0 = max(0, min(int(cx - r), x)), max(0, min(int(cy - r), y))
    wx1 = min(w, max(int(cx + r) + 1, x + nuc.shape[1]))
    wy1 = min(h, max(int(cy + r) + 1, y + nuc.shape[0]))
    gy, gx = np.mgrid[wy0:wy1, wx0:wx1]
    inside = (gx - cx) ** 2 + (gy - cy) ** 2 <= r * r
    region = stained[wy0:wy1, wx0:wx1].astype(bool) & inside
    region[y - wy0 + ys, x - wx0 + xs] = True  # the nucleus always belongs to its cell
    # Only stained pixels connected to the nucleus count: a neighbour's granules inside the disc do not.
    _, lab = cv2.connectedComponents(region.astype(np.uint8))
    keep = np.isin(lab, np.unique(lab[y - wy0 + ys, x - wx0 + xs]))
    ry, rx = np.nonzero(keep)
    return wx0 + rx.min(), wy0 + ry.min(), wx0 + rx.max() + 1, wy0 + ry.max() + 1


def _padded(box, pad: float, w: int, h: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    px, py = pad * (x1 - x0), pad * (y1 - y0)
    return max(0.0, x0 - px), max(0.0, y0 - py), min(float(w), x1 + px), min(float(h), y1 + py)


def _candidates(score, stained, nucleus, cfg: LocaliserConfig, rbc_px: float) -> list[Box]:
    """One unpadded cell box per group of nucleus fragments within `merge_radius` of each other."""
    merged = cv2.dilate(nucleus, _disc(cfg.merge_radius * rbc_px))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(merged)
    h, w = nucleus.shape
    a = rbc_px ** 2  # areas in the config are in squared red-cell diameters
    out = []
    for i in range(1, n):
        x, y, bw, bh = (int(v) for v in stats[i, :4])
        nuc = (labels[y:y + bh, x:x + bw] == i) & (nucleus[y:y + bh, x:x + bw] > 0)
        area = int(nuc.sum())
        if not cfg.min_area * a <= area <= cfg.max_area * a:
            continue
        # A cell cut by the frame edge with little nucleus in view cannot be classified reliably
        # (and BCCD's annotators skipped such cells): it will be seen whole in another field.
        at_edge = x == 0 or y == 0 or x + bw == w or y + bh == h
        if at_edge and area < cfg.edge_min_area * a:
            continue
        conf = float(np.clip(score[y:y + bh, x:x + bw][nuc].mean() / 64.0, 0.0, 1.0))
        out.append(Box(*(float(v) for v in _cell_box(stained, nuc, x, y, cfg)), conf, area))
    return out


def _overlap(a: Box, b: Box) -> float:
    """Intersection over the smaller box: near 1 when one box sits inside the other."""
    ix = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    iy = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    smaller = min((a.x1 - a.x0) * (a.y1 - a.y0), (b.x1 - b.x0) * (b.y1 - b.y0))
    return ix * iy / smaller if smaller > 0 else 0.0


def _union(a: Box, b: Box) -> Box:
    area = a.nucleus_area + b.nucleus_area
    conf = (a.score * a.nucleus_area + b.score * b.nucleus_area) / area
    return Box(min(a.x0, b.x0), min(a.y0, b.y0), max(a.x1, b.x1), max(a.y1, b.y1), conf, area)


def _merge_overlapping(boxes: list[Box], threshold: float) -> list[Box]:
    """Join cell boxes that mostly overlap: lobes of one large cell (a band, an eosinophil's two
    lobes behind its granules) lie further apart than `merge_radius`, but their cells coincide."""
    boxes = list(boxes)
    merged = True
    while merged and len(boxes) > 1:  # frames hold a handful of candidates: quadratic is fine
        merged = False
        for i in range(len(boxes)):
            j = next((j for j in range(i + 1, len(boxes)) if _overlap(boxes[i], boxes[j]) >= threshold), None)
            if j is not None:
                boxes[i] = _union(boxes[i], boxes.pop(j))
                merged = True
                break
    return boxes


def localise(frame: np.ndarray, config: LocaliserConfig | None = None, *, rbc_px: float | None = None) -> list[Box]:
    """Boxes of the white cells in an RGB uint8 HxWx3 frame, largest nucleus first (empty if none).

    `rbc_px`: the red-cell diameter in px of this frame if the caller measured it (a stream pools
    it per slide); else the config's, else it is measured on the frame (wbc_edge.edge.scale)."""
    cfg = LocaliserConfig() if config is None else config
    if not isinstance(cfg, LocaliserConfig):
        raise TypeError(f"config must be a LocaliserConfig, not {type(cfg).__name__}")
    frame = to_numpy(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 HxWx3 frame, got {frame.dtype} {frame.shape}")
    rbc = frame_rbc_px(frame, cfg, rbc_px)
    work = work_image(frame, rbc, cfg.work_rbc_px)  # where a red cell spans work_rbc_px: same cells, less time
    h, w = frame.shape[:2]
    kx, ky = work.shape[1] / w, work.shape[0] / h
    score, stained, nucleus = masks(work, cfg, rbc * kx)
    cells = _merge_overlapping(_candidates(score, stained, nucleus, cfg, rbc * kx), cfg.merge_overlap)
    boxes = []
    for b in cells:
        full = (b.x0 / kx, b.y0 / ky, b.x1 / kx, b.y1 / ky)
        boxes.append(Box(*_padded(full, cfg.box_pad, w, h), b.score, int(round(b.nucleus_area / (kx * ky)))))
    return sorted(boxes, key=lambda b: -b.nucleus_area)


def iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (x1, y1 exclusive)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_pairs(pred, truth, threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """One-to-one matching, highest IoU pairs first: (pred index, truth index, IoU) of each pair.

    Greedy is exact enough here: frames hold one to three WBCs that rarely overlap."""
    pred = [p.as_list() if isinstance(p, Box) else p for p in pred]
    ranked = sorted(((iou(p, t), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)), reverse=True)
    used_p, used_t, pairs = set(), set(), []
    for v, i, j in ranked:
        if v >= threshold and i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            pairs.append((i, j, v))
    return pairs


def match(pred, truth, threshold: float = 0.5) -> tuple[int, int, int, list[float]]:
    """(tp, fp, fn, IoUs of the matched pairs) of `match_pairs`."""
    ious = [v for _, _, v in match_pairs(pred, truth, threshold)]
    return len(ious), len(pred) - len(ious), len(truth) - len(ious), ious

"""WBC localiser for full microscope frames: stain-based nucleus detection -> one cell box per WBC.

Why colour works: in a Romanowsky/Wright-stained smear only white-cell nuclei (and platelets, which
are small) take up the blue-purple nuclear dye; red cells are pink and the background is pale grey.
A per-pixel score "blueness" = B - (R + G) / 2 is a colour-space stand-in for the nuclear-dye
concentration of colour deconvolution. It needs no per-frame stain estimate and costs one pass.
(`wbc_edge.edge.stain` computes a Macenko nuclear concentration; it can replace `nuclear_score`
here, with thresholds refitted by benchmarks/bench_localise.py, if a scanner shift ever needs it.)

Steps, each one parameter of `LocaliserConfig`:
  1. score, lightly blurred (JPEG noise, granules);
  2. two thresholds from the frame itself: Otsu over the whole frame separates stained material
     from red cells and background ("stained": nuclei plus the bluish cytoplasm and granules next
     to them); Otsu over the stained pixels alone separates the dense nucleus ("nucleus").
     Both have a floor, so a frame without any stained object gives no boxes;
  3. opening removes specks; a dilation by `merge_radius` joins the lobes of a segmented nucleus
     into one cell; nucleus area limits drop platelets (small) and stain blotches (huge); a cell
     cut by the frame edge is kept only with enough nucleus in view;
  4. the cell box: the stained region connected to that nucleus, limited to a disc around it
     (neighbouring cells must not be swallowed); boxes that mostly overlap are one cell (lobes
     further apart than the merge radius); finally padded by a fitted fraction, because pale
     cytoplasm is barely stained and the annotated box encloses the whole cell.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

from ..xp import to_numpy
from .preprocess import INTERPOLATIONS

@dataclass(frozen=True)
class LocaliserConfig:
    """Every knob of the localiser; JSON-able so a bundle can store the values it was checked with.

    Defaults were chosen on the even-numbered BCCD frames (benchmarks/bench_localise.py) and are
    reported on the odd-numbered ones. Lengths are in pixels of a 640x480 BCCD frame (about
    12 px/um: a red cell is ~90 px across); `frame_scale` rescales them for cameras with another sampling.
    """

    blur_sigma: float = 1.5  # px; smooths JPEG blocks and granules before thresholding
    stained_floor: float = 20.0  # blueness; frame-wide Otsu may raise, never lower, the stained cut
    nucleus_floor: float = 35.0  # blueness; Otsu over stained pixels may raise it, never lower
    open_radius: int = 2  # px; opening removes specks smaller than this
    merge_radius: int = 6  # px; nucleus lobes closer than about twice this form one cell
    min_area: int = 2000  # nucleus px; platelets (clumps) reach ~1800, a small lymphocyte ~4000
    max_area: int = 60_000  # nucleus px; beyond this it is a stain blotch, not a cell
    cell_radius: float = 1.6  # cell disc radius / nucleus equivalent radius (caps the growth)
    edge_min_area: int = 3000  # nucleus px; a cell cut by the frame edge needs this much in view
    merge_overlap: float = 0.2  # join cell boxes whose intersection covers this much of the smaller
    box_pad: float = 0.1  # fraction of the cell box side added on each side (fitted)
    frame_scale: float = 1.0  # px of this camera per px of a BCCD frame

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
    [0, 1] (mean nucleus blueness / 128) and the nucleus area in px."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    nucleus_area: int

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]


def nuclear_score(frame: np.ndarray, blur_sigma: float = 1.5) -> np.ndarray:
    """Per-pixel blueness B - (R+G)/2 (float32 HxW, roughly -60..130): high on nuclear dye only."""
    f = frame.astype(np.float32)
    s = f[..., 2] - 0.5 * (f[..., 0] + f[..., 1])
    return cv2.GaussianBlur(s, (0, 0), blur_sigma) if blur_sigma > 0 else s


def _otsu(values: np.ndarray, floor: float) -> float:
    """Otsu's cut on `values` (blueness), never below `floor`; the floor alone if too few values."""
    if values.size < 64:
        return floor
    v8 = np.clip(values * 2 + 128, 0, 255).astype(np.uint8).reshape(1, -1)  # 0.5-level bins, range -64..63
    cut, _ = cv2.threshold(v8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return max((cut - 128) / 2, floor)


def _disc(radius: float) -> np.ndarray:
    r = max(1, int(round(radius)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def masks(frame: np.ndarray, cfg: LocaliserConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, stained mask, nucleus mask) for one frame; masks are uint8 0/1."""
    score = nuclear_score(frame, cfg.blur_sigma * cfg.frame_scale)
    t_stained = _otsu(score[::2, ::2], cfg.stained_floor)  # a quarter of the pixels is plenty for a cut
    stained = score > t_stained
    t_nucleus = _otsu(score[stained], max(cfg.nucleus_floor, t_stained))
    nucleus = (score > t_nucleus).astype(np.uint8)
    nucleus = cv2.morphologyEx(nucleus, cv2.MORPH_OPEN, _disc(cfg.open_radius * cfg.frame_scale))
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


def _candidates(score, stained, nucleus, cfg: LocaliserConfig) -> list[Box]:
    """One unpadded cell box per group of nucleus fragments within `merge_radius` of each other."""
    merged = cv2.dilate(nucleus, _disc(cfg.merge_radius * cfg.frame_scale))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(merged)
    h, w = nucleus.shape
    s2 = cfg.frame_scale ** 2
    out = []
    for i in range(1, n):
        x, y, bw, bh = (int(v) for v in stats[i, :4])
        nuc = (labels[y:y + bh, x:x + bw] == i) & (nucleus[y:y + bh, x:x + bw] > 0)
        area = int(nuc.sum())
        if not cfg.min_area * s2 <= area <= cfg.max_area * s2:
            continue
        # A cell cut by the frame edge with little nucleus in view cannot be classified reliably
        # (and BCCD's annotators skipped such cells): it will be seen whole in another field.
        at_edge = x == 0 or y == 0 or x + bw == w or y + bh == h
        if at_edge and area < cfg.edge_min_area * s2:
            continue
        conf = float(np.clip(score[y:y + bh, x:x + bw][nuc].mean() / 128.0, 0.0, 1.0))
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


def localise(frame: np.ndarray, config: LocaliserConfig | None = None) -> list[Box]:
    """Boxes of the white cells in an RGB uint8 HxWx3 frame, largest nucleus first (empty if none)."""
    cfg = LocaliserConfig() if config is None else config
    if not isinstance(cfg, LocaliserConfig):
        raise TypeError(f"config must be a LocaliserConfig, not {type(cfg).__name__}")
    frame = to_numpy(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 HxWx3 frame, got {frame.dtype} {frame.shape}")
    score, stained, nucleus = masks(frame, cfg)
    cells = _merge_overlapping(_candidates(score, stained, nucleus, cfg), cfg.merge_overlap)
    h, w = nucleus.shape
    boxes = [Box(*_padded(b.as_list(), cfg.box_pad, w, h), b.score, b.nucleus_area) for b in cells]
    return sorted(boxes, key=lambda b: -b.nucleus_area)


# PBC's 360-px cell images span about 468 px of a BCCD frame: isolated red cells (7-8 um in any
# normal smear) measure 70 px across in PBC and 91 px in BCCD (benchmarks/bench_localise.py).
# Models trained on PBC without scale augmentation need that field of view: re-cropping PBC images
# with a box-relative margin drops the sample bundle from 0.84 to at best 0.62 accuracy, a fixed
# 360-px field keeps 0.84. So by default a crop is a fixed field of view, not a margin.
PBC_FIELD_PX = 468.0


def crop_window(box, margin: float | None = None, side: float | None = None) -> tuple[int, int, int]:
    """(x0, y0, side) of the square crop centred on the box: `side` px, or the longer box side x
    (1 + 2 margin) when a margin is given, or PBC_FIELD_PX when neither is."""
    x0, y0, x1, y1 = (box.as_list() if isinstance(box, Box) else box)
    if side is None:
        side = PBC_FIELD_PX if margin is None else max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    side = max(1, int(round(side)))
    return int(round((x0 + x1 - side) / 2)), int(round((y0 + y1 - side) / 2)), side


def extract_crops(frame: np.ndarray, boxes, size: int, margin: float | None = None, side: float | None = None,
                  fill=None, interpolation: str = "area") -> np.ndarray:
    """Square crops around each cell box -> uint8 N x size x size x 3 (one batch for the runner).

    The window is `side` px (default PBC_FIELD_PX; scale it with the camera like frame_scale) or,
    with `margin`, box-relative. Crops running off the frame are padded with a constant background
    colour (the frame's median unless `fill` is given) rather than shifted, so the cell stays centred
    as in the training images.
    """
    if margin is not None and side is not None:
        raise ValueError("give a crop margin or a fixed side, not both")
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    if not len(boxes):
        return out
    if fill is None:  # median of a pixel sample: the background dominates every smear frame
        fill = np.median(frame.reshape(-1, 3)[::97], axis=0)
    fill = tuple(int(v) for v in np.broadcast_to(np.asarray(fill), (3,)))
    h, w = frame.shape[:2]
    for i, b in enumerate(boxes):
        x0, y0, n = crop_window(b, margin, side)
        crop = np.empty((n, n, 3), np.uint8)
        crop[:] = fill
        sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x0 + n), min(h, y0 + n)
        if sx1 > sx0 and sy1 > sy0:
            crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = frame[sy0:sy1, sx0:sx1]
        out[i] = cv2.resize(crop, (size, size), interpolation=INTERPOLATIONS[interpolation])
    return out


def iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (x1, y1 exclusive)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(pred, truth, threshold: float = 0.5) -> tuple[int, int, int, list[float]]:
    """One-to-one matching, highest IoU pairs first: (tp, fp, fn, IoUs of the matched pairs).

    Greedy is exact enough here: frames hold one to three WBCs that rarely overlap."""
    pred = [p.as_list() if isinstance(p, Box) else p for p in pred]
    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)), reverse=True)
    used_p, used_t, ious = set(), set(), []
    for v, i, j in pairs:
        if v >= threshold and i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            ious.append(v)
    return len(ious), len(pred) - len(ious), len(truth) - len(ious), ious

"""WBC localiser for full microscope frames: stain-based nucleus detection -> one box per cell.

White cells are the only large objects carrying the nuclear (azure/methylene-blue) dye, so a
per-pixel "blueness" score B - (R+G)/2 separates them from red cells (balanced R,G,B: pink-grey) and
background. It is a colour-space stand-in for the Macenko nuclear-dye concentration
(`stain.nuclear_concentration`), chosen because it needs no per-frame stain estimate and costs one
pass. Steps: score -> Otsu threshold (with a floor, so a frame without a WBC gives no boxes) ->
opening (specks) -> dilation to merge the lobes of a segmented nucleus -> components -> area filter
(platelets are small) -> a box around the stained region, grown by a margin.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .preprocess import INTERPOLATIONS


@dataclass
class LocaliserConfig:
    score_floor: float = 25.0  # minimum blueness (grey levels); Otsu may only raise it
    min_area: int = 1500  # px of stained region; platelets and debris are smaller
    max_area: int = 120_000  # px; larger is a stain blotch or an out-of-focus smear
    merge_radius: int = 10  # px; lobes of one nucleus closer than this become one cell
    box_margin: float = 0.05  # box side = stained extent x (1 + 2 margin); fitted on BCCD frames
    blur: int = 5

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Box:
    x0: float
    y0: float
    x1: float
    y1: float
    score: float  # mean blueness of the stained region
    nucleus_area: int

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]


def blueness(frame: np.ndarray, blur: int = 5) -> np.ndarray:
    f = frame.astype(np.float32)
    s = f[..., 2] - 0.5 * (f[..., 0] + f[..., 1])
    return cv2.GaussianBlur(s, (blur, blur), 0) if blur > 1 else s


def stained_mask(score: np.ndarray, cfg: LocaliserConfig) -> np.ndarray:
    s8 = np.clip(score * 2 + 128, 0, 255).astype(np.uint8)  # Otsu needs 8 bits; 0.5 grey-level steps
    otsu, _ = cv2.threshold(s8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (score > max((otsu - 128) / 2, cfg.score_floor)).astype(np.uint8)
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))


def localise(frame: np.ndarray, cfg: LocaliserConfig | None = None) -> list[Box]:
    """Boxes of the white cells in an RGB uint8 frame (empty for a frame without any)."""
    cfg = cfg or LocaliserConfig()
    score = blueness(frame, cfg.blur)
    mask = stained_mask(score, cfg)
    r = cfg.merge_radius
    merged = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(merged)
    h, w = mask.shape
    boxes = []
    for i in range(1, n):
        x, y, bw, bh = stats[i, :4]
        region = (labels[y:y + bh, x:x + bw] == i) & (mask[y:y + bh, x:x + bw] > 0)
        area = int(region.sum())
        if not cfg.min_area <= area <= cfg.max_area:
            continue
        ys, xs = np.nonzero(region)
        cx, cy = x + (xs.min() + xs.max()) / 2, y + (ys.min() + ys.max()) / 2
        half = max(xs.max() - xs.min(), ys.max() - ys.min()) * (1 + 2 * cfg.box_margin) / 2
        boxes.append(Box(max(0.0, cx - half), max(0.0, cy - half), min(float(w), cx + half), min(float(h), cy + half),
                         float(score[y:y + bh, x:x + bw][region].mean()), area))
    return boxes


def extract_crops(frame: np.ndarray, boxes: list[Box], size: int, margin: float = 0.6,
                  interpolation: str = "area") -> np.ndarray:
    """Square crops centred on each box, side = box side x (1 + 2 margin) so the cell fills about as
    much of the crop as in PBC's training images; the frame is padded with its median colour."""
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    fill = [int(v) for v in np.median(frame.reshape(-1, 3)[::97], axis=0)]
    for i, b in enumerate(boxes):
        side = int(round(max(b.x1 - b.x0, b.y1 - b.y0) * (1 + 2 * margin)))
        x0, y0 = int(round((b.x0 + b.x1 - side) / 2)), int(round((b.y0 + b.y1 - side) / 2))
        pad = max(0, -x0, -y0, x0 + side - frame.shape[1], y0 + side - frame.shape[0])
        src = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=fill) if pad else frame
        crop = src[y0 + pad:y0 + pad + side, x0 + pad:x0 + pad + side]
        out[i] = cv2.resize(crop, (size, size), interpolation=INTERPOLATIONS[interpolation])
    return out


def iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(pred: list, truth: list, threshold: float = 0.5) -> tuple[int, int, int, list[float]]:
    """Greedy one-to-one matching by IoU (best pairs first): (tp, fp, fn, IoUs of the matches)."""
    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)), reverse=True)
    used_p, used_t, ious = set(), set(), []
    for v, i, j in pairs:
        if v >= threshold and i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            ious.append(v)
    return len(ious), len(pred) - len(ious), len(truth) - len(ious), ious

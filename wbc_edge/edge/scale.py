"""Physical scale of an image: how many pixels a red cell spans here, and so how to meet the model.

A model learns cells at the pixel size its training images had; another microscope (objective,
camera, binning) shows the same cell larger or smaller. Red cells are the ruler every smear carries:
a normal erythrocyte is 7-8 um across in any lab (RBC_UM), they are the most numerous objects, and
their rim is a strong circular edge whatever the stain. So the scale of an image is the dominant
red-cell diameter, found as the mode of circle diameters (OpenCV's HoughCircles, gradient variant).

Why a mode of circles and not segmentation: on dense or soft-focus smears (a Raspberry Pi camera,
a thick area) red cells touch and overlap and no threshold separates them, but each rim still votes
for its circle. Circles inside a much larger circle (central pallor, a nucleus inside its cell) are
dropped; the mode of log-diameters ignores the few white cells and platelets.

Order of sources (the row of every cell says which one was used, `scale_from`):
  pixel_size  the user gave um/px: exact, nothing estimated;
  rbc         red cells of this image;
  rbc_slide   red cells pooled over the images of one slide/stream (`same_scale`);
  cell        no red cells (a tight crop): the white cell's own extent against the training cells';
  none        nothing to measure: the image is taken as it is (whole crop resized).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np

RBC_UM = 7.5  # diameter of a normal red cell in um: turns a user's um/px into px per red cell
WORK_PX = 384  # images are resampled so their longer side is this before the circle search
# Larger images are measured on their central square of this side. The search finds circles down to
# 1/30 of the side it sees: a 2448x2048 camera frame seen whole would hide red cells under 82 px (a
# mosaic of Chula frames, red cells 85 px, measured 184), while 1536 px hold plenty of them.
MAX_FIELD_PX = 1536
MIN_CIRCLES = 5  # fewer red cells than this: no estimate from this image
MIN_SUPPORT = 4  # circles within +-15 % of the mode needed to trust it
SLIDE_CIRCLES = 200  # a slide's pooled estimate freezes once this many circles were seen


@dataclass(frozen=True)
class Scale:
    """The scale of one image: its red-cell diameter in its own pixels (None: unknown) and the source."""

    rbc_px: float | None
    source: str  # pixel_size | rbc | rbc_slide | cell | none
    n: int = 0  # circles (or cells) the estimate rests on

    @property
    def um_per_px(self) -> float | None:
        return RBC_UM / self.rbc_px if self.rbc_px else None

    def reduced(self, factor: int) -> "Scale":
        """The same scale in the pixels of the image decoded at 1/factor per side."""
        return self if factor == 1 or not self.rbc_px else Scale(self.rbc_px / factor, self.source, self.n)

    def as_row(self) -> dict:
        """The per-cell fields: `scale` in um/px (None when unknown) and where it came from."""
        um = self.um_per_px
        return {"scale": round(um, 4) if um else None, "scale_from": self.source,
                "rbc_px": round(self.rbc_px, 1) if self.rbc_px else None}


def red_cell_diameters(image: np.ndarray) -> np.ndarray:
    """Diameters (px of `image`) of the circular objects of an RGB uint8 image, pallor circles removed."""
    h, w = image.shape[:2]
    if max(h, w) > MAX_FIELD_PX:  # the central square (a view: nothing copied)
        y0, x0 = max(0, (h - MAX_FIELD_PX) // 2), max(0, (w - MAX_FIELD_PX) // 2)
        image = image[y0:y0 + MAX_FIELD_PX, x0:x0 + MAX_FIELD_PX]
        h, w = image.shape[:2]
    k = WORK_PX / max(h, w)  # a fixed working size keeps the estimate independent of the resolution
    flag = cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR
    grey = cv2.cvtColor(cv2.resize(image, (max(8, round(w * k)), max(8, round(h * k))), interpolation=flag),
                        cv2.COLOR_RGB2GRAY)
    grey = cv2.GaussianBlur(grey, (0, 0), 1.0)
    found = cv2.HoughCircles(grey, cv2.HOUGH_GRADIENT_ALT, 1.5, minDist=WORK_PX / 40, param1=60, param2=0.5,
                             minRadius=int(WORK_PX / 60), maxRadius=int(WORK_PX / 3))
    if found is None:
        return np.zeros(0)
    x, y, r = found[0][:, 0], found[0][:, 1], found[0][:, 2]
    dist = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    inner = ((dist < 0.5 * r[None]) & (r[None] > 1.6 * r[:, None])).any(1)
    return 2 * r[~inner] / k


def dominant_diameter(diameters: np.ndarray, bandwidth: float = 0.08) -> float | None:
    """Mode of a Gaussian density of log-diameters, or None when too few circles agree on one size."""
    d = np.asarray(diameters, np.float64)
    if d.size < MIN_CIRCLES:
        return None
    logs = np.log(d)
    grid = np.linspace(logs.min(), logs.max(), 200)
    density = np.exp(-0.5 * ((grid[:, None] - logs[None]) / bandwidth) ** 2).sum(1)
    # red cells are the largest round objects a smear has many of: of the density's peaks at least half
    # as high as the highest, take the largest (pallor rims, lobes and platelets give smaller peaks)
    peaks = np.flatnonzero((density >= np.roll(density, 1)) & (density >= np.roll(density, -1))
                           & (density >= 0.5 * density.max()))
    mode = float(np.exp(grid[peaks.max()]))
    return mode if int((np.abs(logs - np.log(mode)) < 0.14).sum()) >= MIN_SUPPORT else None


def cell_extent(image: np.ndarray) -> float | None:
    """Equivalent diameter (px) of the stained object at the centre of a crop: the white cell itself.

    Foreground is what is darker than the background (Otsu on grey); the component under the centre
    (or the largest one, if the centre is background) is the cell."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    grey = cv2.GaussianBlur(grey, (0, 0), max(1.0, min(grey.shape) / 200))
    _, fg = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg)
    if n < 2:
        return None
    h, w = fg.shape
    pick = labels[h // 2, w // 2] or 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return float(2 * np.sqrt(stats[pick, cv2.CC_STAT_AREA] / np.pi))


class SlideScales:
    """Red-cell circles pooled per slide (or stream): each image gets the estimate of its slide's
    images so far; a slide's estimate freezes once SLIDE_CIRCLES circles were seen. Thread-safe
    (the stream localises on several threads)."""

    def __init__(self):
        self._pool: dict[str, list[np.ndarray]] = {}
        self._frozen: dict[str, Scale] = {}
        self._lock = threading.Lock()

    def settled(self, slide: str) -> Scale | None:
        """The slide's estimate once frozen (it no longer needs the slide's images at full size), else None."""
        with self._lock:
            return self._frozen.get(slide)

    def scale(self, slide: str, image: np.ndarray, reduced: int = 1) -> Scale | None:
        with self._lock:
            if slide in self._frozen:
                return self._frozen[slide]
        d = red_cell_diameters(image) * reduced
        with self._lock:
            if slide in self._frozen:
                return self._frozen[slide]
            pool = self._pool.setdefault(slide, [])
            pool.append(d)
            seen = np.concatenate(pool)
            mode = dominant_diameter(seen)
            if mode is None:
                return None
            s = Scale(mode, "rbc_slide", int(seen.size))
            if seen.size >= SLIDE_CIRCLES:
                self._frozen[slide] = s
                del self._pool[slide]
            return s


def estimate_scale(image: np.ndarray, *, pixel_size: float | None = None, slides: SlideScales | None = None,
                   slide: str = "", extent_ratio: float | None = None, reduced: int = 1) -> Scale:
    """The scale of one image, from the best source available (see the module's docstring), in the
    pixels of its file: `reduced` > 1 when `image` was decoded at 1/reduced per side.

    `extent_ratio` is the training cells' red-cell diameter / white-cell extent, used for crops
    without red cells; `slides` pools red cells per `slide` when images are known to share a scale."""
    if pixel_size:
        return Scale(RBC_UM / pixel_size, "pixel_size")
    if slides is not None:
        s = slides.scale(slide, image, reduced)
        if s is not None:
            return s
    else:
        d = red_cell_diameters(image) * reduced
        mode = dominant_diameter(d)
        if mode is not None:
            return Scale(mode, "rbc", int(d.size))
    if extent_ratio:
        extent = cell_extent(image)
        if extent:
            return Scale(extent * reduced * extent_ratio, "cell", 1)
    return Scale(None, "none")


def measure_training_scale(images, n: int = 256, seed: int = 0) -> dict:
    """The `scale` section of a bundle, measured on (up to `n` of) its training images at native size:
    red-cell diameter (pooled mode), the images' field of view and the white cells' median extent, all
    in the training images' pixels."""
    images = list(images)
    rng = np.random.default_rng(seed)
    pick = [images[i] for i in np.sort(rng.permutation(len(images))[:n])]
    rbc = dominant_diameter(np.concatenate([red_cell_diameters(im) for im in pick] + [np.zeros(0)]))
    if rbc is None:
        raise ValueError(f"no red cells found in {len(pick)} training images: cannot record their scale")
    extents = [e for e in map(cell_extent, pick) if e]
    return {"rbc_px": round(rbc, 2), "window_px": int(np.median([max(im.shape[:2]) for im in pick])),
            "cell_px": round(float(np.median(extents)), 2) if extents else None, "rbc_um": RBC_UM,
            "um_per_px": round(RBC_UM / rbc, 5), "n_images": len(pick)}

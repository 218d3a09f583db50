"""The one preprocessor: a native image (a cell crop, or a window of a frame) -> model input.

Every consumer prepares cells here and nowhere else: training, `evaluate`, `stream` (crops and
frames), INT8 calibration, temperature/refinement fitting and the embedder. A cross-site measure
added here therefore reaches all of them; `tests/test_preprocess.py` checks that one cell gives
bit-identical model input through each consumer.

    impulse guard (native size) -> physical scale -> canonical window -> resize -> colour step
    (anchoring to the training lab's background and dark point; stain normalisation)

The canonical window is the field of view of the bundle's training images at their red-cell size
(`Bundle.extra["scale"]`: `rbc_px`, `window_px`): an image whose red cells span d px is cut to a
window of window_px * d / rbc_px px around the cell (padded with the image's own background colour
where it runs off the image), then resized once, with the bundle's interpolation, to the model's
input size. The exported ONNX graphs take that uint8 NHWC batch and normalise inside the graph;
the PyTorch side uses `normalise` below with the same bundle values, so both see identical inputs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import cv2
import numpy as np

from ..xp import get_xp
from .scale import RBC_UM, Scale, SlideScales, estimate_scale

INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC,
                  "nearest": cv2.INTER_NEAREST}
# Bundles made before the scale section: a frame window of PBC's field of view at BCCD's sampling
# (red cells 70 px in a 360-px PBC image, 91 px in a BCCD frame: 360 * 91 / 70 = 468 px).
LEGACY_FRAME_WINDOW = 468.0
# Per-image red-cell estimates on PBC's own images spread -9 %..+12 % (p10-p90) around the training
# scale, and the shipped model loses 8 macro-F1 points when every cell is rescaled by that noise:
# an estimate closer than this to the training scale is taken as the training scale.
SNAP = 0.12


def resize_batch(images, size: int, interpolation: str = "area") -> np.ndarray:
    """List/array of HxWx3 uint8 images -> uint8 BxSxSx3. A uint8 batch already SxS is returned as it is
    (callers never write into the result), so crops resized upstream cost nothing here."""
    flag = INTERPOLATIONS[interpolation]
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == (size, size, 3):
        return images
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, img in enumerate(images):  # OpenCV resizes one image per call; it is the fastest option on CPU
        out[i] = img if img.shape[:2] == (size, size) else cv2.resize(img, (size, size), interpolation=flag)
    return out


def normalise(batch, mean, std):
    """uint8 BxHxWx3 -> float32 Bx3xHxW, (x/255 - mean) / std; NumPy or CuPy in, same out."""
    xp = get_xp(batch)
    x = batch.astype(xp.float32) / 255.0
    x = (x - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)
    return xp.ascontiguousarray(x.transpose(0, 3, 1, 2))


def background_colour(image: np.ndarray) -> tuple[int, int, int]:
    """The smear's background: median colour of the brightest tenth of a pixel sample (plasma between
    cells is the lightest thing on a slide; a border median would be a red cell on a dense smear)."""
    px = image.reshape(-1, 3)[:: max(1, image.shape[0] * image.shape[1] // 20000)]
    bright = px.astype(np.int32).sum(1)
    sel = px[bright >= np.percentile(bright, 90)]
    return tuple(int(v) for v in np.median(sel, axis=0))


def cut_window(image: np.ndarray, cx: float, cy: float, side: float, fill) -> np.ndarray:
    """The side x side window centred on (cx, cy), padded with `fill` where it leaves the image. `fill`
    is a colour, or a callable giving it, called only when padding is needed (measuring the smear's
    background costs a percentile per cell: most windows lie inside the image)."""
    n = max(1, int(round(side)))
    x0, y0 = int(round(cx - n / 2)), int(round(cy - n / 2))
    h, w = image.shape[:2]
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x0 + n), min(h, y0 + n)
    if (sx0, sy0, sx1, sy1) == (x0, y0, x0 + n, y0 + n):
        return image[y0:y0 + n, x0:x0 + n]
    out = np.empty((n, n, 3), np.uint8)
    out[:] = fill() if callable(fill) else fill
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


@dataclass
class Prepared:
    """Model-input cells (uint8 BxSxSx3) and, per cell, its scale and whether the guard restored it."""

    batch: np.ndarray
    scales: list[Scale]
    restored: np.ndarray
    gate: object = None  # edge/restore.py GateResult: the quality gate's scores and restored cells (None: no restorer)


class Preprocessor:
    """Built from a bundle (`for_bundle`), or from the trainer's pieces before a bundle exists."""

    def __init__(self, input_size: int, interpolation: str = "area", scale: dict | None = None, stain=None,
                 guard=None, pixel_size: float | None = None, same_scale: bool = True, anchor: dict | None = None,
                 restorer=None):
        self.restorer = restorer  # quality gate + learned restorer on canonical cells (edge/restore.py), or None
        self.size, self.interpolation = int(input_size), interpolation
        self.anchor = anchor  # the training cells' background and dark point (edge/anchor.py)
        self.scale_spec = dict(scale or {})  # rbc_px, window_px, cell_px of the training images
        self.stain_ref, self.guard, self.pixel_size = stain, guard, pixel_size
        self.slides = SlideScales() if same_scale else None
        spec = self.scale_spec
        self.extent_ratio = spec["rbc_px"] / spec["cell_px"] if spec.get("cell_px") else None

    @classmethod
    def for_bundle(cls, bundle, pixel_size: float | None = None, same_scale: bool = True) -> "Preprocessor":
        from .quality import ImpulseGuard
        from .restore import RestoreStep
        from .stain import StainReference, bundle_stain

        ref = bundle_stain(bundle)  # a model trained on normalised cells: same step, same reference
        pp = bundle.preprocess
        return cls(pp.input_size, pp.interpolation, bundle.extra.get("scale"),
                   StainReference.from_dict(ref) if ref else None, ImpulseGuard.for_bundle(bundle),
                   pixel_size, same_scale, bundle.extra.get("anchor"), RestoreStep.for_bundle(bundle))

    # ---- the steps ---------------------------------------------------------------------------
    def guarded(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
        """Impulse (salt-and-pepper) repair at native size, before any resize smears the impulses."""
        return self.guard(image) if self.guard is not None else (image, False)

    def scale_of(self, image: np.ndarray, slide: str = "", reduced: int = 1) -> Scale:
        """This image's scale in its file's pixels (`reduced`: the image was decoded at 1/reduced per
        side): the user's um/px, else red cells (of the image or its slide), else the cell."""
        if not self.scale_spec.get("rbc_px"):
            return Scale(None, "none")  # a bundle without a training scale cannot use one
        return estimate_scale(image, pixel_size=self.pixel_size, slides=self.slides, slide=slide,
                              extent_ratio=self.extent_ratio, reduced=reduced)

    def settled_rbc_px(self, slide: str = "") -> float | None:
        """The red-cell diameter (px) a slide's images will get without measuring them again: the user's
        um/px, or the slide's frozen pooled estimate; None while it is still being measured."""
        if not self.scale_spec.get("rbc_px"):
            return None
        if self.pixel_size:
            return RBC_UM / self.pixel_size
        settled = self.slides.settled(slide) if self.slides is not None else None
        return settled.rbc_px if settled is not None else None

    def window_side(self, scale: Scale) -> float:
        """Side (px of the image) of the training field of view at this image's scale; an unknown
        scale is taken as the training images' own."""
        spec = self.scale_spec
        if not spec.get("rbc_px"):
            return LEGACY_FRAME_WINDOW
        ratio = (scale.rbc_px or spec["rbc_px"]) / spec["rbc_px"]
        if scale.source != "pixel_size" and abs(np.log(ratio)) < np.log(1 + SNAP):
            ratio = 1.0  # a rescale within the estimator's own spread adds noise, not accuracy
        return spec["window_px"] * ratio

    def canonical(self, image: np.ndarray, scale: Scale, centre=None, fill=None) -> np.ndarray:
        """One cell at the training scale and size (uint8 SxSx3), before the stain step. A crop of
        unknown scale is resized whole, as it is; a frame window is cut around `centre`."""
        if centre is None and scale.rbc_px is None:
            return resize_batch([image], self.size, self.interpolation)[0]
        h, w = image.shape[:2]
        cx, cy = centre if centre is not None else (w / 2, h / 2)
        fill = fill if fill is not None else (lambda: background_colour(image))
        return resize_batch([cut_window(image, cx, cy, self.window_side(scale), fill)], self.size,
                            self.interpolation)[0]

    def restore(self, batch: np.ndarray):
        """The learned-restoration step on canonical cells (before the colour step): (cells, GateResult or
        None). Cells the gate passes come back bit-identical; without a restorer the batch itself."""
        return (batch, None) if self.restorer is None else self.restorer(batch)

    def stain(self, batch: np.ndarray) -> np.ndarray:
        """The colour step on canonical cells: anchored to the training cells' background and dark
        point, then stain-normalised to the bundle's reference, each when the bundle asks for it."""
        if not len(batch):
            return batch
        if self.anchor:
            from .anchor import anchor

            batch = anchor(batch, self.anchor)
        if self.stain_ref is None:
            return batch
        from .stain import normalise_batch

        return normalise_batch(batch, self.stain_ref)[0]

    # ---- whole paths -------------------------------------------------------------------------
    def crop(self, image: np.ndarray, slide: str = "") -> tuple[np.ndarray, Scale, bool]:
        """A single-cell crop -> (canonical cell SxSx3, its scale, restored?), before the stain step."""
        image, restored = self.guarded(image)
        scale = self.scale_of(image, slide)
        return self.canonical(image, scale), scale, restored

    def crops(self, images, slides=None) -> Prepared:
        """Single-cell crops (native size) -> model input."""
        slides = slides or [""] * len(images)
        return self._model_input([self.crop(im, s) for im, s in zip(images, slides)])

    def _model_input(self, done: list[tuple[np.ndarray, Scale, bool]]) -> Prepared:
        """`crop` results -> Prepared: the restoration and colour steps over the whole batch."""
        batch = np.stack([d[0] for d in done]) if done else np.zeros((0, self.size, self.size, 3), np.uint8)
        batch, gate = self.restore(batch)
        return Prepared(self.stain(batch), [d[1] for d in done], np.asarray([d[2] for d in done], bool), gate)

    def frame_cells(self, frame: np.ndarray, boxes, scale: Scale) -> np.ndarray:
        """Canonical cells around each localiser box of a (guarded) frame, before the stain step."""
        out = np.empty((len(boxes), self.size, self.size, 3), np.uint8)
        fill = functools.cache(lambda: background_colour(frame))  # once per frame, only if a window leaves it
        for i, b in enumerate(boxes):
            x0, y0, x1, y1 = b.as_list() if hasattr(b, "as_list") else b
            out[i] = self.canonical(frame, scale, ((x0 + x1) / 2, (y0 + y1) / 2), fill)
        return out

    def load(self, dataset, progress: bool = False, workers: int = 4, max_bytes: int = 256 << 20):
        """Read and prepare every sample of a CellDataset -> (model-input batch, kept indices, errors,
        Prepared). With `same_scale` the dataset is one slide (or one per `group`).

        Images are read at native size in runs that hold at most `max_bytes` of decoded pixels (from
        the files' headers), each run cut to canonical cells before the next is read: a batch of 64
        large frames must not hold 64 native images at once."""
        from ..data.inventory import byte_chunks

        done, kept, errors = [], [], []
        for run in byte_chunks([s.path for s in dataset.samples], max_bytes):
            images, k, errs = dataset.subset(run).load(progress=progress, workers=workers)
            done += [self.crop(img, dataset.samples[run[j]].group or "") for j, img in zip(k, images)]
            kept += [run[j] for j in k]
            errors += [replace(e, index=run[e.index]) for e in errs]
        prepared = self._model_input(done)
        return prepared.batch, np.asarray(kept, np.int64), errors, prepared

"""One preprocessor for every consumer; the physical scale of real images from three microscopes."""
import json
import shutil

import cv2
import numpy as np
import pytest

from wbc_edge.bundle import Bundle
from wbc_edge.data.datasets import from_manifest, load_bundle_cells, write_manifest
from wbc_edge.data.images import read_image
from wbc_edge.edge import scale as sc
from wbc_edge.edge.classifier import EnsembleClassifier
from wbc_edge.edge.preprocess import Preprocessor, background_colour


@pytest.fixture
def stained_bundle(bundle_copy) -> Bundle:
    """The shipped bundle asking for the stain step, so every consumer must apply it too."""
    b = Bundle.load(bundle_copy)
    b.extra["stain"]["normalise"] = True
    b.save()
    return Bundle.load(bundle_copy)


@pytest.fixture
def few_cells(tmp_path, sample_dir):
    """Two real cells of each of six classes, as a manifest (dataset order = file order)."""
    rows = [(str(p), p.parent.name) for c in ("BA", "EO", "LY", "MO", "SNE", "PMY")
            for p in sorted((sample_dir / "cells" / c).glob("*.jpg"))[:2]]
    return write_manifest(tmp_path / "cells.csv", rows)


def _spy(monkeypatch):
    """Record what EnsembleClassifier.predict is given (our own method, still run for real)."""
    seen = []
    real = EnsembleClassifier.predict

    def predict(self, batch):
        seen.append(np.array(batch, copy=True))
        return real(self, batch)

    monkeypatch.setattr(EnsembleClassifier, "predict", predict)
    return seen


def test_one_cell_is_the_same_model_input_through_every_consumer(stained_bundle, few_cells, tmp_path, monkeypatch):
    from wbc_edge.calibration.reader import calibration_images
    from wbc_edge.edge.pipeline import run_stream
    from wbc_edge.edge.refine.embed import Embedder, make_embedder
    from wbc_edge.evaluate import evaluate
    from wbc_edge.trainer.config import load_config
    from wbc_edge.trainer.loop import load_pool

    b = stained_bundle
    reference = Preprocessor.for_bundle(b).load(from_manifest(few_cells))[0]
    assert reference.shape == (12, 128, 128, 3)
    # fitting (temperature, refinement, INT8 check) and INT8 calibration
    assert np.array_equal(load_bundle_cells(b, few_cells)[0], reference)
    assert np.array_equal(calibration_images(b, few_cells, n=12), reference)
    # evaluate, then stream --crops (a folder of the same files, same order)
    seen = _spy(monkeypatch)
    evaluate(b.root, few_cells, tmp_path / "eval", progress=False)
    assert np.array_equal(np.concatenate(seen), reference)
    crops = tmp_path / "crops"
    crops.mkdir()
    for i, row in enumerate(from_manifest(few_cells).samples):
        shutil.copy(row.path, crops / f"{i:02d}.jpg")
    seen.clear()
    run_stream(crops, b.root, tmp_path / "stream", mode="crops", report=False)
    assert np.array_equal(np.concatenate(seen), reference)
    # training: canonical cells at the bundle's scale, then the same stain step
    cfg = load_config(progress=False, exclude_from=None)
    pool = load_pool(str(few_cells), cfg, 128, scale=b.extra["scale"])
    order = np.argsort([str(p) for p in pool.paths])  # the pool is grouped by class; match by path
    by_path = {str(r.path): i for i, r in enumerate(from_manifest(few_cells).samples)}
    mine = Preprocessor.for_bundle(b).stain(pool.x[order])
    assert np.array_equal(mine, reference[[by_path[str(pool.paths[i])] for i in order]])
    # the refinement's embedder (the bundle's own member) takes the model input as it is
    spec = make_embedder(b, "member", tmp_path / "embed.onnx", tmp_path)
    with Embedder(tmp_path / "embed.onnx", spec) as emb:
        assert np.allclose(emb(reference), emb(reference.copy()))
        assert spec.stain is None and spec.input_size == reference.shape[1]


def test_red_cell_scale_follows_the_magnification(sample_dir):
    """Real frames at 1x and 1.6x, each set pooled as one slide: the red-cell diameter follows."""
    frames = [read_image(p) for p in sorted((sample_dir / "frames" / "JPEGImages").glob("*.jpg"))]
    big = [cv2.resize(f, None, fx=1.6, fy=1.6, interpolation=cv2.INTER_LINEAR) for f in frames]
    slides = sc.SlideScales()
    d1 = [slides.scale("1x", f) for f in frames][-1]
    d2 = [slides.scale("1.6x", f) for f in big][-1]
    assert d1.source == d2.source == "rbc_slide"
    assert 75 < d1.rbc_px < 110  # BCCD: a red cell is about 90 px across
    assert d2.rbc_px / d1.rbc_px == pytest.approx(1.6, rel=0.1)
    given = sc.estimate_scale(frames[0], pixel_size=0.1)
    assert given.source == "pixel_size" and given.um_per_px == pytest.approx(0.1)


def test_pbc_images_agree_with_their_own_downsized_copies(sample_dir):
    """PBC's 360-px images and the same cells at 176 px, pooled: scales in the ratio of the sizes."""
    full, small = [], []
    for p in sorted((sample_dir / "fullres").glob("*/*.jpg")):
        img = read_image(p)
        full.append(sc.red_cell_diameters(img))
        small.append(sc.red_cell_diameters(cv2.resize(img, (176, 176 * img.shape[0] // img.shape[1]),
                                                      interpolation=cv2.INTER_AREA)))
    a, s = sc.dominant_diameter(np.concatenate(full)), sc.dominant_diameter(np.concatenate(small))
    assert 60 < a < 85  # PBC: red cells of 7-8 um span about 70 px of a 360-px image
    assert a / s == pytest.approx(360 / 176, rel=0.08)


def test_tight_crop_without_red_cells_falls_back_to_the_cell(sample_bundle, sample_dir):
    pre = Preprocessor.for_bundle(Bundle.load(sample_bundle), same_scale=False)
    cell = read_image(sorted((sample_dir / "cells" / "LY").glob("*.jpg"))[0])
    h, w = cell.shape[:2]
    tight = cell[h // 4:3 * h // 4, w // 4:3 * w // 4]  # the cell fills the crop: no whole red cell left
    s = pre.scale_of(tight)
    assert s.source in ("cell", "rbc") and s.rbc_px
    out, s2, _ = pre.crop(tight)
    assert out.shape == (128, 128, 3) and s2 == s
    blank = np.full((64, 64, 3), 230, np.uint8)
    assert pre.scale_of(blank).source == "none"
    assert pre.crop(blank)[0].shape == (128, 128, 3)


def test_window_is_padded_with_the_image_background_not_grey(sample_bundle, sample_dir):
    b = Bundle.load(sample_bundle)
    cell = read_image(sorted((sample_dir / "cells" / "MO").glob("*.jpg"))[0])
    bg = np.asarray(background_colour(cell), float)
    pre = Preprocessor.for_bundle(b, pixel_size=b.extra["scale"]["um_per_px"] * 2, same_scale=False)
    out = pre.crop(cell)[0]  # red cells half as large as in training: the window is half the crop
    assert not np.array_equal(out[0, 0], np.asarray(bg, np.uint8))  # no padding: the image itself
    pre = Preprocessor.for_bundle(b, pixel_size=b.extra["scale"]["um_per_px"] / 2, same_scale=False)
    out = pre.crop(cell)[0]  # red cells twice as large: the crop fills the middle, padded around
    assert np.array_equal(out[0, 0], np.asarray(bg, np.uint8)) and np.array_equal(out[-1, -1], out[0, 0])
    assert abs(int(out[0, 0].mean()) - 128) > 40  # the smear's light background, never grey bars


def test_two_slides_at_two_magnifications_get_two_scales(sample_dir, sample_bundle, tmp_path):
    from wbc_edge.edge.pipeline import run_stream

    frames = sorted((sample_dir / "frames" / "JPEGImages").glob("*.jpg"))[:3]
    for slide, zoom in (("slide_a", 1.0), ("slide_b", 1.5)):
        (tmp_path / "in" / slide).mkdir(parents=True)
        for p in frames:
            img = cv2.imread(str(p))
            cv2.imwrite(str(tmp_path / "in" / slide / p.name), cv2.resize(img, None, fx=zoom, fy=zoom))
    s = run_stream(str(tmp_path / "in" / "*" / "*.jpg"), sample_bundle, tmp_path / "out", report=False)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "cells.jsonl")]
    assert rows and all(r["scale"] and r["scale_from"] == "rbc_slide" for r in rows if r.get("pred"))
    per_slide = {}
    for r in rows:
        per_slide.setdefault(r["source"].split("/")[-2], set()).add(r["scale"])
    assert set(per_slide) == {"slide_a", "slide_b"}
    a, b_ = (np.median(list(per_slide[k])) for k in ("slide_a", "slide_b"))
    assert a / b_ == pytest.approx(1.5, rel=0.12)  # um/px: the zoomed slide has smaller pixels
    assert len(s.scales) == 2

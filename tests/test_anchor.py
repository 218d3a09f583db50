"""Colour anchoring on real cells: another lab's light, exposure and haze undone at two anchors."""
import numpy as np
import pytest

from wbc_edge.bundle import Bundle
from wbc_edge.data.datasets import from_image_folder
from wbc_edge.edge import anchor as A
from wbc_edge.edge.preprocess import Preprocessor


@pytest.fixture(scope="module")
def cells(sample_dir, sample_bundle):
    b = Bundle.load(sample_bundle)
    pre = Preprocessor.for_bundle(b)
    pre.anchor = None  # canonical cells before the colour step
    return pre.load(from_image_folder(sample_dir / "cells", b.classes).subset(range(0, 270, 9)))[0], b.extra["anchor"]


def test_anchors_land_on_the_reference(cells):
    x, ref = cells
    out = A.anchor(x, ref)
    bg, dark = A.anchors(out)
    assert np.abs(bg - np.asarray(ref["background"])).max() <= 3
    assert np.abs(dark - np.asarray(ref["dark"])).max() <= 3


def test_training_lab_cells_barely_move(cells):
    x, ref = cells
    assert np.abs(A.anchor(x, ref).astype(int) - x).mean() < 6


def test_another_labs_light_and_haze_are_undone(cells):
    x, ref = cells
    f = x.astype(np.float32)
    foreign = np.clip(0.55 * f * np.array([0.85, 0.8, 1.0]) + 0.45 * np.array([200, 170, 185]), 0, 255).astype(np.uint8)
    before = np.abs(foreign.astype(int) - x).mean()
    after = np.abs(A.anchor(foreign, ref).astype(int) - A.anchor(x, ref)).mean()
    assert after < 0.3 * before  # a linear per-channel change is undone up to rounding and clipping


def test_blank_and_empty_batches_are_safe(cells):
    _, ref = cells
    blank = np.full((2, 32, 32, 3), 200, np.uint8)
    out = A.anchor(blank, ref)
    assert out.dtype == np.uint8 and np.isfinite(out).all()
    assert A.anchor(np.zeros((0, 8, 8, 3), np.uint8), ref).shape == (0, 8, 8, 3)


def test_the_bundle_preprocessor_applies_it(cells, sample_bundle):
    x, ref = cells
    pre = Preprocessor.for_bundle(Bundle.load(sample_bundle))
    assert np.array_equal(pre.stain(x), A.anchor(x, ref))

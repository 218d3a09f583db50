"""Salt-and-pepper detector and adaptive-median restorer on real PBC cells."""
import numpy as np
import pytest

from wbc_edge.data.datasets import from_image_folder
from wbc_edge.data.degrade import apply
from wbc_edge.edge import quality


def psnr(a, b):
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return 10 * np.log10(255 ** 2 / mse)


@pytest.fixture(scope="module")
def cells(sample_dir):
    x, _, _ = from_image_folder(sample_dir / "cells").load(None, progress=False)
    return np.stack(x)


def test_threshold_separates_clean_from_noisy_real_cells(cells):
    noisy = apply(cells, "salt_pepper", 1, np.random.default_rng(0))
    thr, sep = quality.fit_threshold(cells, noisy)
    assert sep["separable"]
    assert sep["clean_max"] < quality.DEFAULT_THRESHOLD < sep["noisy_min"]  # the stored default still fits
    assert not quality.detect(cells).any() and quality.detect(noisy).all()


def test_restoration_improves_psnr_and_leaves_clean_images_alone(cells):
    sub = cells[::10]
    noisy = apply(sub, "salt_pepper", 3, np.random.default_rng(1))
    restored, fired = quality.restore(noisy)
    assert fired.all()
    assert psnr(restored, sub) > psnr(noisy, sub) + 10
    same, fired_clean = quality.restore(sub)
    assert not fired_clean.any() and np.array_equal(same, sub)


def test_adaptive_median_on_a_known_case():
    img = np.full((1, 7, 7, 3), 100, np.uint8)
    img[0, 3, 3] = 255  # one salt pixel in a flat field
    img[0, 1, 1, 0] = 0  # one pepper value in one channel
    out = quality.adaptive_median(img)
    assert (out == 100).all()

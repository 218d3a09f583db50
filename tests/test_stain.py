"""Batched Macenko on real PBC cells: torchstain agreement, batch == per-image, degenerate inputs."""
import numpy as np
import pytest

from wbc_edge.data.datasets import from_image_folder
from wbc_edge.edge.stain import (StainCache, StainReference, estimate_stains, fit_reference, normalise_batch,
                                 nuclear_concentration)

TORCHSTAIN_REF = StainReference(np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]),
                                np.array([1.9705, 1.0308]))


@pytest.fixture(scope="module")
def cells(sample_dir):
    x, _, errors = from_image_folder(sample_dir / "cells").load(None, progress=False)
    assert not errors
    return np.stack(x)  # 330 real 176x176 cells, all classes


def test_agrees_with_torchstain_numpy_macenko(cells):
    """Same images, same reference: at most 1 grey level apart (float32 vs float64 rounding at the
    uint8 cast), and almost everywhere identical."""
    macenko = pytest.importorskip("torchstain.numpy.normalizers.macenko")
    ts = macenko.NumpyMacenkoNormalizer()
    sub = cells[::5]
    ours, ok = normalise_batch(sub, TORCHSTAIN_REF)
    theirs = np.stack([ts.normalize(im, stains=False)[0] for im in sub])
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert ok.all()
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_batch_equals_per_image(cells):
    sub = cells[:12]
    batch, ok = normalise_batch(sub, TORCHSTAIN_REF)
    for i in range(len(sub)):
        single, ok1 = normalise_batch(sub[i:i + 1], TORCHSTAIN_REF)
        assert ok1[0] == ok[i] and np.array_equal(single[0], batch[i])


def test_stain_vectors_are_stable_and_nuclear_first(cells):
    m, c, ok = estimate_stains(cells)
    assert ok.mean() > 0.95
    nuclear, eosin = m[ok, :, 0], m[ok, :, 1]
    # every image's nuclear vector points the same way (cosine to the median close to 1)
    med = np.median(nuclear, axis=0)
    cos = nuclear @ med / np.linalg.norm(med)
    assert np.median(cos) > 0.98
    assert (nuclear[:, 0] > eosin[:, 0]).all()  # the nuclear dye absorbs more red light
    ref = fit_reference(cells)
    assert np.allclose(np.linalg.norm(ref.stain_matrix, axis=0), 1)
    assert StainReference.from_dict(ref.to_dict()).to_dict() == ref.to_dict()


def test_nucleus_has_more_nuclear_dye_than_background(cells):
    conc = nuclear_concentration(cells[:20])
    assert conc.shape == (20, 176, 176) and np.isfinite(conc).all()
    centre = conc[:, 68:108, 68:108].mean(axis=(1, 2))  # PBC cells are centred
    corner = conc[:, :20, :20].mean(axis=(1, 2))
    assert (centre > corner).mean() >= 0.85


def test_degenerate_inputs_pass_through_flagged_never_nan(cells):
    white = np.full((1, 64, 64, 3), 255, np.uint8)
    black = np.zeros((1, 64, 64, 3), np.uint8)
    grey = np.full((1, 64, 64, 3), 120, np.uint8)  # no stain contrast at all
    batch = np.concatenate([white, black, grey, cells[:1, :64, :64]])
    out, ok = normalise_batch(batch, TORCHSTAIN_REF)
    assert list(ok) == [False, False, False, True]
    assert np.array_equal(out[:3], batch[:3])  # unchanged, flagged
    m, c, _ = estimate_stains(batch)
    assert np.isfinite(out).all()
    with pytest.raises(ValueError, match="8-bit"):
        normalise_batch(cells[:2].astype(np.uint16) * 257, TORCHSTAIN_REF)
    with pytest.raises(ValueError, match="BxHxWx3"):
        normalise_batch(cells[:2, :, :, 0], TORCHSTAIN_REF)


def pooled_stains(batch):
    m, c, ok = estimate_stains(batch)
    return np.median(m[ok], axis=0), np.median(c[ok], axis=0)


def test_slide_level_normalisation_reduces_a_lab_stain_shift(cells):
    """A whole set re-stained the same way (another lab), normalised with one pooled estimate per set
    (what a stream's StainCache does), ends closer to the original set than the shifted set was.
    Per-crop estimates are NOT used here: on MGG single-cell crops they are unstable (see benchmark)."""
    from wbc_edge.data.degrade import apply

    ref = fit_reference(cells)
    shifted = np.concatenate([apply(cells[i:i + 1], "stain_shift", 3, np.random.default_rng(7))
                              for i in range(len(cells))])  # the same draw for every cell: one lab
    a, _ = normalise_batch(cells, ref, pooled_stains(cells))
    b, _ = normalise_batch(shifted, ref, pooled_stains(shifted))
    dist = lambda p, q: np.linalg.norm(p.astype(float).mean((1, 2)) - q.astype(float).mean((1, 2)), axis=1).mean()  # noqa: E731
    assert dist(b, a) < 0.8 * dist(shifted, cells)


def test_stain_cache_reuses_one_estimate(cells):
    cache = StainCache(fit_reference(cells[:50]), refresh=100)
    a, ok = cache.normalise(cells[:16])
    first = cache.stains
    b, _ = cache.normalise(cells[16:32])
    assert cache.stains is first and ok.all() and a.shape == b.shape

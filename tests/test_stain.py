"""Batched Macenko on real PBC cells: torchstain agreement, batch == per-image, stability, bad inputs."""
import json
import warnings

import cv2
import numpy as np
import pytest

from wbc_edge.data.datasets import from_image_folder
from wbc_edge.edge import stain
from wbc_edge.edge.stain import (TORCHSTAIN_PARAMS, MacenkoParams, StainCache, StainReference,
                                 estimate_stains, fit_reference, normalise_batch, nuclear_concentration)


@pytest.fixture(scope="module")
def cells(sample_dir):
    x, _, errors = from_image_folder(sample_dir / "cells").load(progress=False)
    assert not errors
    return np.stack(x)  # 330 real 176x176 MGG cells, 11 classes


@pytest.fixture(scope="module")
def torchstain_macenko():
    return pytest.importorskip("torchstain.numpy.normalizers.macenko").NumpyMacenkoNormalizer


def _angle(v, ref):
    return np.degrees(np.arccos(np.clip(v @ (ref / np.linalg.norm(ref)), -1, 1)))


def _assert_matches_torchstain(images, normalizer_cls):
    """Same images, same reference, same settings -> at most 1 grey level apart, almost nowhere.

    Why this tolerance: we compute OD and the per-pixel products in float32 (torchstain: float64),
    so an output value differs by ~1e-5 grey levels; both truncate to uint8, which turns that into a
    difference of exactly 1 only where the value sits within ~1e-5 of an integer (~1e-4 of pixels).
    A real disagreement (ordering, percentile, concentration scaling) moves whole images by many levels.
    """
    ts = normalizer_cls()
    ref = StainReference(ts.HERef, ts.maxCRef, TORCHSTAIN_PARAMS)
    ours, ok = normalise_batch(images, ref)
    theirs = np.stack([ts.normalize(im, stains=False)[0] for im in images])
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert ok.all()
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_normalisation_agrees_with_torchstain(cells, torchstain_macenko):
    _assert_matches_torchstain(cells[::10], torchstain_macenko)


def test_fit_agrees_with_torchstain(cells, torchstain_macenko):
    """One image's reference = torchstain's fit. The angle percentiles are order statistics of float32
    (ours) vs float64 angles: neighbouring samples ~1e-4 rad apart may trade places, hence 1e-3."""
    ts = torchstain_macenko()
    for im in cells[::33]:
        ts.fit(im)
        ours = fit_reference([im], TORCHSTAIN_PARAMS)
        np.testing.assert_allclose(ours.stain_matrix, ts.HERef, atol=1e-3)
        np.testing.assert_allclose(ours.max_conc, ts.maxCRef, rtol=1e-3)


def test_batch_equals_per_image(cells, monkeypatch):
    sub = cells[::30]
    ref = fit_reference(cells[1::30])
    batch, ok = normalise_batch(sub, ref)
    m, c, ok_m = estimate_stains(sub)
    whole, ok_w = normalise_batch(sub, ref, chunk_pixels=None)  # one piece instead of cache-sized ones
    assert np.array_equal(whole, batch) and np.array_equal(ok_w, ok)
    monkeypatch.setattr(stain, "THREADS", 1)  # the pieces one after another instead of on threads
    assert np.array_equal(normalise_batch(sub, ref)[0], batch)
    for i in range(len(sub)):
        single, ok1 = normalise_batch(sub[i:i + 1], ref)
        m1, c1, _ = estimate_stains(sub[i:i + 1])
        assert ok1[0] == ok[i] and np.array_equal(single[0], batch[i])
        np.testing.assert_array_equal(m1[0], m[i])
        np.testing.assert_array_equal(c1[0], c[i])


def test_stain_vectors_are_stable_and_not_swapped(cells):
    """Per-cell vectors against the reference fitted on the other cells: tight for our MGG settings,
    and tighter than with Macenko's all-channels rule (the reason for the default)."""
    fit, test = cells[::2], cells[1::2]
    p90 = {}
    for name, params in (("mgg", MacenkoParams()), ("ts", TORCHSTAIN_PARAMS)):
        ref = fit_reference(fit, params)
        m, _, ok = estimate_stains(test, params)
        assert ok.mean() > 0.97
        nuc = _angle(m[ok, :, 0], ref.stain_matrix[:, 0])
        p90[name] = np.percentile(nuc, 90)
        if name == "mgg":
            eos = _angle(m[ok, :, 1], ref.stain_matrix[:, 1])
            assert np.percentile(nuc, 90) < 10 and np.percentile(eos, 90) < 20
            assert (nuc < _angle(m[ok, :, 0], ref.stain_matrix[:, 1])).all()  # never closer to eosin
    assert p90["mgg"] < p90["ts"]


def test_column_zero_is_the_colour_of_nuclei(cells):
    """The darkest pixels of a cell are its nucleus; their OD direction is the nuclear vector's."""
    ref = fit_reference(cells)
    od = stain.optical_density(cells[::5]).transpose(0, 2, 1)  # (B, N, 3)
    norm = np.linalg.norm(od, axis=2)
    dark = od[norm >= np.percentile(norm, 99, axis=1, keepdims=True)]  # top 1% per cell
    d = dark / np.linalg.norm(dark, axis=1, keepdims=True)
    assert (_angle(d, ref.stain_matrix[:, 0]) < _angle(d, ref.stain_matrix[:, 1])).mean() > 0.95


def test_nuclear_concentration_marks_the_nucleus(cells):
    ref = fit_reference(cells)
    conc = nuclear_concentration(cells[:40], ref)
    assert conc.shape == (40, 176, 176) and conc.dtype == np.float32 and np.isfinite(conc).all()
    centre = conc[:, 68:108, 68:108].mean(axis=(1, 2))  # PBC cells are centred
    corner = conc[:, :20, :20].mean(axis=(1, 2))
    assert (centre > corner).mean() >= 0.85
    np.testing.assert_allclose(nuclear_concentration(cells[:4], ref.stain_matrix), conc[:4], rtol=1e-6)
    assert np.isfinite(nuclear_concentration(cells[:4])).all()  # per-image estimates


def _degenerate(cells):
    white = np.full((64, 64, 3), 255, np.uint8)
    black = np.zeros((64, 64, 3), np.uint8)
    grey = np.full((64, 64, 3), 120, np.uint8)  # flat: no contrast at all
    unstained = np.repeat(cv2.cvtColor(cells[0, :64, :64], cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    speck = white.copy()
    speck[30:33, 30:33] = (90, 40, 120)  # 9 stained pixels: below the minimum stained fraction
    return np.stack([white, black, grey, unstained, speck, cells[0, :64, :64]])


def test_degenerate_images_pass_through_flagged_never_nan(cells):
    batch = _degenerate(cells)
    ref = fit_reference(cells[:60])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid-value warnings on the way either
        out, ok = normalise_batch(batch, ref)
        m, c, ok_m = estimate_stains(batch)
        cached, ok_c = normalise_batch(batch, ref, (ref.stain_matrix, ref.max_conc))
        conc = nuclear_concentration(batch, ref)
    assert ok.tolist() == [False] * 5 + [True] and ok_m.tolist() == ok.tolist()
    assert np.array_equal(out[:5], batch[:5]) and not np.array_equal(out[5], batch[5])
    assert np.isfinite(m).all() and np.isfinite(c).all() and np.isfinite(conc).all()
    assert not ok_c[[0, 4]].any() and np.array_equal(cached[0], batch[0])  # a blank frame stays flagged


def test_unusable_inputs_raise_clear_errors(cells):
    ref = fit_reference(cells[:30])
    with pytest.raises(ValueError, match="8-bit"):
        normalise_batch(cells[:2].astype(np.uint16) * 257, ref)
    with pytest.raises(ValueError, match="8-bit"):
        estimate_stains(cells[:2].astype(np.float32))
    with pytest.raises(ValueError, match="single-channel"):
        normalise_batch(cells[:2, :, :, :1], ref)
    with pytest.raises(ValueError, match="single-channel"):
        nuclear_concentration(cells[:2, :, :, 0], ref)
    with pytest.raises(ValueError, match="BxHxWx3"):
        normalise_batch(cells[0], ref)  # one image without its batch axis
    with pytest.raises(ValueError, match="no image with enough stain"):
        fit_reference(np.full((3, 32, 32, 3), 255, np.uint8))


def test_reference_round_trips_through_json(cells):
    ref = fit_reference(cells[:60])
    back = StainReference.from_dict(json.loads(json.dumps(ref.to_dict())))
    assert back.params == ref.params and back.to_dict() == ref.to_dict()
    np.testing.assert_array_equal(normalise_batch(cells[:4], back)[0], normalise_batch(cells[:4], ref)[0])
    legacy = {"method": "macenko", "stain_matrix": ref.to_dict()["stain_matrix"], "max_conc": [1.5, 0.5],
              "io": 240.0, "beta": 0.15, "alpha": 1.0}  # written before the tissue rule existed
    assert StainReference.from_dict(legacy).params == TORCHSTAIN_PARAMS
    with pytest.raises(ValueError, match="malformed"):
        StainReference.from_dict({"stain_matrix": [[1, 0]], "max_conc": [1, 1]})


def _mean_lab(batch):
    return np.stack([cv2.cvtColor(im, cv2.COLOR_RGB2LAB) for im in batch]).astype(float).mean(axis=(0, 1, 2))


def test_normalisation_undoes_a_lab_stain_shift(cells):
    """A set re-stained the same way (another lab: one draw for every cell) ends, once each crop is
    normalised, far closer in mean colour to the normalised original than the shifted set was."""
    from wbc_edge.data.degrade import apply

    sub = cells[::3]
    ref = fit_reference(cells[1::3])
    shifted = np.concatenate([apply(sub[i:i + 1], "stain_shift", 3, np.random.default_rng(7))
                              for i in range(len(sub))])
    before = np.linalg.norm(_mean_lab(shifted) - _mean_lab(sub))
    norm = lambda b: normalise_batch(b, ref)[0]  # noqa: E731
    after = np.linalg.norm(_mean_lab(norm(shifted)) - _mean_lab(norm(sub)))
    assert after < 0.5 * before


def test_stain_cache_estimates_once_per_refresh(cells):
    ref = fit_reference(cells[:50])
    cache = StainCache(ref, refresh=2)
    a, ok = cache.normalise(cells[50:66])
    first = cache.stains
    np.testing.assert_array_equal(a, normalise_batch(cells[50:66], ref, first)[0])
    cache.normalise(cells[66:82])
    assert cache.stains is first and cache.updates == 1  # the second batch reused it
    cache.normalise(cells[82:98])
    assert cache.updates == 2 and cache.stains is not first  # refreshed on the third
    cache.reset()
    out, ok = cache.normalise(np.full((2, 32, 32, 3), 255, np.uint8))  # nothing to estimate from
    assert cache.stains is None and not ok.any()


def test_agreement_and_stability_on_shared_data(shared_data, torchstain_macenko):
    ds = from_image_folder(shared_data / "pbc-176")
    idx = np.random.default_rng(3).permutation(len(ds))[:96]
    x, _, errors = ds.subset(idx).load(progress=False)
    x = np.stack(x)
    _assert_matches_torchstain(x[:8], torchstain_macenko)
    ref = fit_reference(x[:48])
    m, _, ok = estimate_stains(x[48:])
    assert ok.mean() > 0.97 and np.percentile(_angle(m[ok, :, 0], ref.stain_matrix[:, 0]), 90) < 10


def test_given_stains_that_cannot_be_unmixed_are_flagged(cells):
    ref = fit_reference(cells[:30])
    one_dye = np.repeat(ref.stain_matrix[:, :1], 2, axis=1)  # both columns the same dye
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, ok = normalise_batch(cells[:3], ref, (one_dye, ref.max_conc))
    assert not ok.any() and np.array_equal(out, cells[:3])


@pytest.mark.gpu
def test_cupy_gives_the_numpy_result(cells):
    """The same code on CuPy arrays (no device branches): within float rounding of the NumPy path."""
    cp = pytest.importorskip("cupy")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CuPy raises its own error types without a driver
        pytest.skip(f"no CUDA device: {exc}")
    ref, x = fit_reference(cells[:60]), cells[::30]
    out, ok = normalise_batch(x, ref)
    out_g, ok_g = normalise_batch(cp.asarray(x), ref)
    diff = np.abs(cp.asnumpy(out_g).astype(int) - out)
    assert np.array_equal(cp.asnumpy(ok_g), ok) and diff.max() <= 1 and (diff > 0).mean() < 1e-3
    m_g = cp.asnumpy(estimate_stains(cp.asarray(x))[0])
    np.testing.assert_allclose(m_g, estimate_stains(x)[0], atol=1e-3)
    np.testing.assert_allclose(cp.asnumpy(nuclear_concentration(cp.asarray(x), ref)),
                               nuclear_concentration(x, ref), rtol=1e-4, atol=1e-4)

"""Morphology features (issue #7): synthetic shapes with known answers, then real PBC cells."""
import json

import numpy as np
import pytest

from wbc_edge.data.images import read_image
from wbc_edge.edge.refine import features as F

COL = {name: i for i, name in enumerate(F.FEATURE_NAMES)}
S = 96


def _grid(s=S):
    yy, xx = np.mgrid[:s, :s]
    return yy + 0.5, xx + 0.5  # pixel centres


def disc(cy, cx, r, s=S):
    yy, xx = _grid(s)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def star(cy, cx, r, amp, k, s=S):
    yy, xx = _grid(s)
    theta = np.arctan2(yy - cy, xx - cx)
    return np.hypot(yy - cy, xx - cx) <= r * (1 + amp * np.cos(k * theta))


def ellipse(cy, cx, a, b, s=S):
    yy, xx = _grid(s)
    return ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1


def feats(nucleus, cell=None, od=None):
    """Features of single masks (cell defaults to a big disc, OD to a flat map)."""
    nucleus = np.asarray(nucleus, np.uint8)[None]
    cell = (disc(S / 2, S / 2, 44) if cell is None else cell).astype(np.uint8)[None]
    od = np.full(nucleus.shape, 0.5, np.float32) if od is None else np.asarray(od, np.float32)[None]
    return dict(zip(F.FEATURE_NAMES, F.features_from_masks(nucleus, cell, od)[0]))


def test_disc_is_round_with_one_lobe():
    f = feats(disc(48, 48, 18), disc(48, 48, 36))
    assert f["nucleus_area"] == pytest.approx(np.pi * 18 ** 2, rel=0.02)
    assert f["nc_ratio"] == pytest.approx(0.25, abs=0.01)
    assert f["lobes"] == 1
    assert f["spikiness"] < 0.02 and f["radial_cv"] < 0.03
    assert f["solidity"] > 0.93 and f["defect_depth"] < 0.1
    assert f["eccentricity"] < 0.15 and f["centroid_offset"] < 0.01


def test_star_is_spiky_and_concave():
    round_ = feats(disc(48, 48, 20))
    f = feats(star(48, 48, 20, 0.35, 7))
    # r = R (1 + a cos 7 theta): the 7th harmonic carries RMS a / sqrt(2) of the mean radius
    assert f["spikiness"] == pytest.approx(0.35 / np.sqrt(2), rel=0.25)
    assert f["spikiness"] > 10 * round_["spikiness"]
    assert f["solidity"] < 0.85 and f["defect_depth"] > 0.3
    assert f["lobes"] == 1  # spikes are thin: not lobes


def test_touching_discs_are_two_lobes_and_ellipses_one():
    two = disc(48, 36, 14) | disc(48, 60, 14)  # centres 24 apart: a neck of ~7 px half-width
    assert feats(two)["lobes"] == 2
    three = disc(30, 30, 9) | disc(30, 62, 9) | disc(64, 46, 9)  # separate pieces
    assert feats(three)["lobes"] == 3
    f = feats(ellipse(48, 48, 26, 12))
    assert f["lobes"] == 1 and f["spikiness"] < 0.04  # an elongated outline is not a spiky one
    assert f["eccentricity"] == pytest.approx(np.sqrt(1 - (12 / 26) ** 2), abs=0.02)
    yy, xx = _grid()
    band = (np.abs(np.hypot(yy - 48, xx - 48) - 22) <= 6) & (yy > 40)  # a thick C: one lobe, concave
    fb = feats(band)
    assert fb["lobes"] == 1 and fb["solidity"] < 0.8 and fb["defect_depth"] > 0.5


def test_offset_od_and_texture():
    cell = disc(48, 48, 30)
    nucleus = disc(48, 57, 12)
    od = np.where(nucleus, 1.5, np.where(cell, 0.5, 0.1))
    f = feats(nucleus, cell, od)
    assert f["centroid_offset"] == pytest.approx(9 / 30, abs=0.02)
    assert f["nucleus_od"] == pytest.approx(1.5) and f["cytoplasm_od"] == pytest.approx(0.5)
    assert f["granularity"] == 0 and f["chromatin_texture"] == 0  # flat inside each region
    yy, xx = np.mgrid[:S, :S]
    grainy = np.where(nucleus, 1.5, np.where(cell, 0.5 + 0.2 * ((yy + xx) % 2), 0.1))
    g = feats(nucleus, cell, grainy)
    # checkerboard +-0.1 about 0.6: |Laplacian| = 0.8 everywhere inside, over the mean OD 0.6
    assert g["granularity"] == pytest.approx(0.8 / 0.6, rel=0.05) and g["chromatin_texture"] == 0


def smear(touching_rbc=True):
    """A synthetic 176-px crop: background, red cells, a white cell with a purple nucleus."""
    s = 176
    img = np.empty((s, s, 3), np.uint8)
    img[:] = (252, 228, 200)
    img[disc(30, 30, 22, s)] = (210, 172, 168)
    if touching_rbc:
        img[disc(88, 140, 22, s)] = (210, 172, 168)  # touches the cell's right edge
    cell, nucleus = disc(88, 88, 34, s), ellipse(90, 85, 20, 15, s)
    img[cell] = (200, 170, 190)
    img[nucleus] = (95, 45, 140)
    return img, nucleus, cell


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_segmentation_of_a_synthetic_smear():
    img, nucleus, cell = smear()
    f, n, c = F.morphology_features(img[None], return_masks=True)
    assert iou(n[0] > 0, nucleus) > 0.97
    assert iou(c[0] > 0, cell) > 0.9  # the touching red cell is not part of the white cell
    assert f[0, COL["lobes"]] == 1


def test_crop_without_a_nucleus_gives_zeros():
    blank = np.full((2, 64, 64, 3), (252, 228, 200), np.uint8)
    f, n, c = F.morphology_features(blank, return_masks=True)
    assert not f.any() and not n.any() and not c.any()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        F.morphology_features(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="S x S"):
        F.morphology_features(np.zeros((1, 32, 40, 3), np.uint8))
    with pytest.raises(ValueError, match="nuclear"):
        F.morphology_features(np.zeros((2, 32, 32, 3), np.uint8), nuclear=np.zeros((1, 32, 32)))


def _load(root, per_class, codes=("SNE", "BNE", "LY", "MO", "EO", "BA", "MY")):
    crops, labels = [], []
    for code in codes:
        for p in sorted((root / code).glob("*.jpg"))[:per_class]:
            crops.append(read_image(p))
            labels.append(code)
    return np.stack(crops), np.array(labels)


@pytest.fixture(scope="module")
def sample_cells(sample_dir):
    crops, labels = _load(sample_dir / "cells", 30)
    f, n, c = F.morphology_features(crops, return_masks=True)
    return crops, labels, f, n, c


def test_real_cells_have_sensible_features(sample_cells):
    crops, labels, f, _, _ = sample_cells
    assert np.isfinite(f).all() and (f[:, COL["nucleus_area"]] > 0).mean() > 0.95
    med = {code: np.median(f[labels == code], axis=0) for code in set(labels)}
    # lymphocytes are nearly all nucleus; segmented neutrophils have lobes and a thin concave nucleus
    assert med["LY"][COL["nc_ratio"]] > med["SNE"][COL["nc_ratio"]] + 0.25
    assert med["SNE"][COL["lobes"]] >= 2 and med["LY"][COL["lobes"]] == 1
    assert med["SNE"][COL["solidity"]] < med["LY"][COL["solidity"]] - 0.1
    assert med["EO"][COL["cytoplasm_od"]] > med["SNE"][COL["cytoplasm_od"]]  # the eosin-laden granules


def test_fused_kernel_equals_the_stages(sample_cells):
    crops, _, f, n, c = sample_cells
    nuclear, od = F.stain_maps(crops)
    n2, c2 = F.segment(nuclear, od)
    assert np.array_equal(n, n2) and np.array_equal(c, c2)
    assert np.array_equal(f, F.features_from_masks(n2, c2, od))


def test_any_nuclear_score_can_drive_the_segmentation(sample_cells):
    crops, _, f, n, _ = sample_cells
    score = F.stain_maps(crops)[0]
    # Otsu does not care about units: an affine change of the score changes nothing
    f2, n2, _ = F.morphology_features(crops, nuclear=3.0 * score - 1.0, return_masks=True)
    assert np.array_equal(n, n2) and np.array_equal(f, f2)
    from wbc_edge.edge import stain

    # the Macenko nuclear-dye concentration finds (nearly) the same nuclei
    _, n3, _ = F.morphology_features(crops, nuclear=stain.nuclear_concentration(crops), return_masks=True)
    overlap = [iou(a > 0, b > 0) for a, b in zip(n, n3)]
    assert np.median(overlap) > 0.9


def test_shared_pbc_cells(shared_data):
    crops, labels = _load(shared_data / "pbc-176", 12, codes=("SNE", "LY"))
    f = F.morphology_features(crops)
    assert (f[:, COL["nucleus_area"]] > 0).all()
    ly, sne = f[labels == "LY"], f[labels == "SNE"]
    assert np.median(ly[:, COL["nc_ratio"]]) > np.median(sne[:, COL["nc_ratio"]]) + 0.2


def test_benchmark_quick(tmp_path):
    from benchmarks import bench_features

    bench_features.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "features.json").read_text())
    assert [r["crops"] for r in data["rows"]] == [16, 16] and all(r["crops_per_s"] > 0 for r in data["rows"])
    assert (tmp_path / "features.md").read_text().startswith("# features")

"""WBC localiser on real BCCD and Chula frames; scale and stain invariance; IoU matching by hand;
crops at borders; blank frames; VOC errors."""
import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from wbc_edge.data.images import read_image
from wbc_edge.data.voc import VocAnnotationError, read_voc
from wbc_edge.edge.localise import REF_RBC_PX, Box, LocaliserConfig, iou, localise, match
from wbc_edge.edge.preprocess import cut_window
from wbc_edge.edge.preprocess import resize_batch


def _frames(root, every: int = 1, start: int = 0):
    xmls = sorted((root / "Annotations").glob("*.xml"))[start::every]
    for xml in xmls:
        yield read_image(root / "JPEGImages" / f"{xml.stem}.jpg"), read_voc(xml).of("WBC")


def _counts(frames, cfg=None):
    tp = fp = fn = 0
    for img, truth in frames:
        a, b, c, _ = match(localise(img, cfg), truth)
        tp, fp, fn = tp + a, fp + b, fn + c
    return tp, fp, fn


def test_finds_the_white_cells_in_the_sample_frames(sample_dir):
    # 8 frames, 8 WBCs. On the 182 held-out BCCD frames recall is 0.978 and precision 0.963
    # (benchmarks/results/localise.md): P(2+ misses in 8) is about 1%, so one miss and one false
    # box are allowed and anything worse is a regression, not bad luck.
    tp, fp, fn = _counts(_frames(sample_dir / "frames"))
    assert tp + fn == 8 and tp >= 7 and fp <= 1


def test_held_out_bccd_frames_meet_the_issue_goal(shared_data):
    root = shared_data / "bccd-frames" / "BCCD"
    if not root.is_dir():
        pytest.skip("BCCD frames are not in ../shared/data")
    tp, fp, fn = _counts(_frames(root, every=2, start=1))  # the odd frames: never seen by the fit
    assert tp / (tp + fn) >= 0.95 and tp / (tp + fp) >= 0.90


def test_iou_and_matching_by_hand():
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [2, 2, 6, 6]) == pytest.approx(16 / 100)
    assert iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0
    # pred 0 overlaps truth 0 by 9x10 = 90 of 110; pred 1 overlaps nothing; truth 1 is missed
    tp, fp, fn, ious = match([[0, 0, 10, 10], [100, 100, 110, 110]], [[1, 0, 11, 10], [50, 50, 60, 60]])
    assert (tp, fp, fn) == (1, 1, 1) and ious == [pytest.approx(90 / 110)]
    # one-to-one: two predictions on one truth give one match and one false box
    assert match([[0, 0, 10, 10], [0, 0, 10, 9]], [[0, 0, 10, 10]])[:3] == (1, 1, 0)


def test_blank_and_flat_frames_give_no_boxes():
    for value in (0, 255, 128):
        assert localise(np.full((480, 640, 3), value, np.uint8)) == []
    blue = np.zeros((480, 640, 3), np.uint8)
    blue[..., 2] = 200  # the whole frame "stained": one blotch larger than max_area, not a cell
    assert localise(blue) == []


def test_windows_at_the_border_are_padded_not_shifted():
    """Cells near the frame edge: the preprocessor's window stays centred, padded with the fill."""
    frame = np.full((100, 100, 3), 200, np.uint8)
    frame[0:20, 0:20] = (60, 30, 150)  # a 'cell' in the corner
    win = cut_window(frame, 10, 10, 40, (10, 20, 30))
    assert win.shape == (40, 40, 3)  # frame x, y in [-10, 30)
    assert (win[:10, :10] == (10, 20, 30)).all()  # outside the frame: the constant fill
    assert (win[15:25, 15:25] == (60, 30, 150)).all()  # the cell stays centred
    assert (win[35:, 35:] == 200).all()  # frame background beyond the cell
    inside = np.random.default_rng(0).integers(0, 256, (120, 160, 3), np.uint8)
    assert np.array_equal(cut_window(inside, 70, 60, 60, (0, 0, 0)), inside[30:90, 40:100])


def test_single_cell_inputs_pass_through_with_only_a_resize():
    cell = np.random.default_rng(1).integers(0, 256, (363, 360, 3), np.uint8)
    out = resize_batch([cell, cell[:64, :64]], 64)
    assert out.shape == (2, 64, 64, 3)
    assert np.array_equal(out[1], cell[:64, :64])  # already the right size: untouched


SAMPLE_FRAMES = Path(__file__).resolve().parents[1] / "data" / "sample" / "frames"


def _sample(n: int = 8):
    return list(_frames(SAMPLE_FRAMES))[:n]


def _same_cells(a, b, threshold: float = 0.7) -> bool:
    """The two box lists are the same cells: one-to-one matches at a high IoU, nothing left over."""
    tp, fp, fn, _ = match(a, [x.as_list() for x in b], threshold)
    return fp == 0 and fn == 0 and tp == len(b)


@pytest.mark.parametrize("k", [1.5, 0.75])
def test_a_rescaled_frame_gives_the_same_cells_with_no_config_change(k):
    # A camera with another magnification: red cells are measured on each frame (scale.py) and every
    # length follows them. The boxes must scale with the frame, on every sample frame.
    for img, truth in _sample():
        same = localise(img)
        big = cv2.resize(img, None, fx=k, fy=k, interpolation=cv2.INTER_LINEAR if k > 1 else cv2.INTER_AREA)
        scaled = [Box(b.x0 * k, b.y0 * k, b.x1 * k, b.y1 * k, b.score, b.nucleus_area) for b in same]
        assert _same_cells(localise(big), scaled)
        # a caller who measured the scale passes it; the config then needs no change either
        assert _same_cells(localise(big, rbc_px=REF_RBC_PX * k), scaled)


def test_the_scale_the_caller_gives_sets_the_size_limits(sample_dir):
    # A lymphocyte's nucleus next to red cells 4x larger would be platelet-sized: telling the
    # localiser so must drop the cell, not leave the boxes alone (the limits follow the scale given).
    img, truth = _sample(1)[0]
    assert len(localise(img, rbc_px=REF_RBC_PX)) == len(truth) == 1
    assert localise(img, rbc_px=REF_RBC_PX * 4) == []


def _restain(img: np.ndarray, od_gain, white) -> np.ndarray:
    """Another stain and light: optical density scaled per channel (a paler/bluer dye), then the
    light's colour (white balance) applied."""
    od = -np.log(np.maximum(img.astype(np.float32), 1.0) / 255.0)
    out = 255.0 * np.exp(-od * np.asarray(od_gain, np.float32)) * np.asarray(white, np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("od_gain, white", [
    ((0.6, 0.6, 0.6), (1.0, 1.0, 1.0)),  # a paler stain: 60 % of the dye
    ((0.8, 0.9, 1.1), (0.85, 0.95, 1.0)),  # bluer dye under a warmer (yellower) lamp
    ((1.0, 1.0, 1.0), (0.8, 0.85, 1.0)),  # a bluish camera white balance only
])
def test_a_shifted_stain_or_light_still_gives_the_cells(od_gain, white):
    tp = fp = fn = 0
    for img, truth in _sample():
        a, b, c, _ = match(localise(_restain(img, od_gain, white)), truth)
        tp, fp, fn = tp + a, fp + b, fn + c
    assert tp >= 7 and fp <= 1  # as on the untouched frames (8 WBCs)


def test_uneven_light_does_not_make_cells(sample_dir):
    # Vignetting: the frame darkened towards its corners to 55 % (a Raspberry Pi camera's falloff).
    img, truth = _sample(1)[0]
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    fall = 1.0 - 0.45 * (((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2) / 2
    dim = (img * fall[..., None]).astype(np.uint8)
    assert match(localise(dim), truth)[:3] == (1, 0, 0)


def _chula_frames(shared_data):
    """(the Chula folder, its frames' true WBC boxes by frame name); skipped where the frames are absent."""
    root = shared_data / "chula-rpi"
    if not (root / "frames.csv").is_file():
        pytest.skip("Chula frames are not in ../shared/data")
    truth = {}
    with open(root / "frames.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            truth.setdefault(r["frame"], []).append([float(r[k]) for k in ("x0", "y0", "x1", "y1")])
    return root, truth


def test_chula_frames_of_another_lab(shared_data):
    # Another microscope, camera, stain and hospital (never fitted on): 8 of the 29 frames.
    root, truth = _chula_frames(shared_data)
    tp = fp = fn = 0
    for f in sorted((root / "frames").glob("*.jpg"))[::4]:
        a, b, c, _ = match(localise(read_image(f)), truth.get(f.name, []), 0.3)
        tp, fp, fn = tp + a, fp + b, fn + c
    assert tp / (tp + fn) >= 0.8 and tp / (tp + fp) >= 0.8


def test_the_faster_working_scale_finds_every_cell_the_old_one_did(shared_data):
    """Localising where a red cell spans about 32 px (a whole-factor block mean, area resize if needed) instead
    of 48 px: on all 29 Chula frames (another lab) no cell is lost at IoU 0.3 or 0.5, and none added."""
    from dataclasses import replace

    from wbc_edge.edge.localise import work_image

    root, truth = _chula_frames(shared_data)
    old, new = replace(LocaliserConfig(), work_rbc_px=48.0), LocaliserConfig()
    assert new.work_rbc_px == 32.0
    found = {0.3: [0, 0], 0.5: [0, 0]}
    for f in sorted((root / "frames").glob("*.jpg")):
        img = read_image(f)
        assert work_image(img, 85.0, 32.0).shape[:2] == (300, 480)  # 1440x900, red cells 85 px: a 3x3 block mean
        for t, n in found.items():
            n[0] += match(localise(img, old, rbc_px=85.0), truth[f.name], t)[0]
            n[1] += match(localise(img, new, rbc_px=85.0), truth[f.name], t)[0]
    assert all(n[1] >= n[0] for n in found.values()), found
    assert found[0.3][1] == sum(len(v) for v in truth.values())  # every annotated WBC


def test_config_is_json_and_rejects_typos():
    cfg = LocaliserConfig(min_area=1500)
    assert LocaliserConfig.from_json(json.dumps(cfg.to_dict())) == cfg
    with pytest.raises(ValueError, match="min_aera"):
        LocaliserConfig.from_dict({"min_aera": 10})
    with pytest.raises(TypeError):
        localise(np.zeros((64, 64, 3), np.uint8), "not a config")


def test_voc_reader_reads_boxes_by_class(sample_dir):
    ann = read_voc(sample_dir / "frames" / "Annotations" / "BloodImage_00057.xml")
    assert ann.of("WBC") == [(165, 71, 317, 215)] and len(ann.of("Platelets")) == 2
    assert len(ann.of("RBC")) == 8 and ann.of("Basophil") == [] and (ann.width, ann.height) == (640, 480)


def test_voc_errors_name_the_file(tmp_path):
    cases = {"broken.xml": "<annotation><object><name>WBC</name>",  # truncated
             "nobox.xml": "<annotation><object><name>WBC</name></object></annotation>",
             "nan.xml": "<annotation><object><name>WBC</name><bndbox><xmin>a</xmin><ymin>1</ymin>"
                        "<xmax>2</xmax><ymax>3</ymax></bndbox></object></annotation>"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(VocAnnotationError, match=name):
            read_voc(tmp_path / name)
    with pytest.raises(VocAnnotationError, match="missing.xml"):
        read_voc(tmp_path / "missing.xml")


def test_voc_zero_area_boxes_are_reported_not_fatal(tmp_path):
    p = tmp_path / "z.xml"
    p.write_text("<annotation><object><name>RBC</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>5</xmax>"
                 "<ymax>5</ymax></bndbox></object></annotation>")  # as in BCCD frames 00338 and 00343
    ann = read_voc(p)
    assert ann.of("RBC") == [] and ann.dropped == [("RBC", (5, 5, 5, 5))]


def test_a_megapixel_camera_frame_gets_the_red_cell_scale_of_its_tiles(shared_data):
    """A 2448x2048 frame (a mosaic of Chula frames, red cells 85 px) seen whole at the circle search's
    working size hid its red cells (measured 184 px): the central square is measured instead."""
    from wbc_edge.edge.scale import dominant_diameter, red_cell_diameters

    frames = [read_image(f) for f in sorted((shared_data / "chula-rpi" / "frames").glob("*.jpg"))[:6]]
    if not frames:
        pytest.skip("Chula frames are not in ../shared/data")
    mosaic = np.concatenate([np.concatenate(frames[r * 2:r * 2 + 2], 1) for r in range(3)], 0)[:2048, :2448]
    tiles = dominant_diameter(np.concatenate([red_cell_diameters(f) for f in frames]))
    big = dominant_diameter(red_cell_diameters(np.ascontiguousarray(mosaic)))
    assert 75 < tiles < 95 and abs(np.log(big / tiles)) < np.log(1.1), (tiles, big)

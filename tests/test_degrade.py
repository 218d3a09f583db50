"""Degradations on real cells: every kind x severity, deterministic per seed, monotone in severity;
training augmentation; degraded dataset copies with a manifest that lists every input."""
import csv

import cv2
import numpy as np
import pytest

from wbc_edge.data import degrade
from wbc_edge.data.datasets import from_image_folder
from wbc_edge.data.images import read_image

RANDOM_KINDS = {"gaussian_noise", "salt_pepper", "motion_blur", "illumination", "gamma", "stain_shift"}


@pytest.fixture(scope="module")
def cells(sample_dir):
    x, _, _ = from_image_folder(sample_dir / "cells").subset(range(0, 330, 33)).load(progress=False)
    return np.stack(x)  # 10 real cells, one per class


def test_the_kinds_table_is_complete():
    assert set(degrade.KINDS) >= {"gaussian_noise", "salt_pepper", "gaussian_blur", "defocus_blur",
                                  "motion_blur", "illumination", "gamma", "jpeg", "stain_shift"}
    for name, k in degrade.KINDS.items():
        assert callable(k.fn) and len(k.levels) == len(degrade.SEVERITIES) == 4 and k.description and k.param


@pytest.mark.parametrize("kind", list(degrade.KINDS))
def test_each_kind_is_deterministic_and_grows_with_severity(cells, kind):
    change = []
    for sev in degrade.SEVERITIES:
        a = degrade.apply(cells, kind, sev, np.random.default_rng(5))
        b = degrade.apply(cells, kind, sev, np.random.default_rng(5))
        assert a.dtype == np.uint8 and a.shape == cells.shape and np.array_equal(a, b)
        change.append(np.abs(a.astype(float) - cells).mean())
    assert change[0] > 0 and all(c2 > c1 for c1, c2 in zip(change, change[1:])), change
    if kind in RANDOM_KINDS:  # another seed, another draw
        assert not np.array_equal(degrade.apply(cells, kind, 2, np.random.default_rng(6)),
                                  degrade.apply(cells, kind, 2, np.random.default_rng(5)))


def test_salt_pepper_hits_the_stated_fraction(cells):
    out = degrade.apply(cells, "salt_pepper", 3, np.random.default_rng(0))
    hit = np.any(out != cells, axis=3)
    assert abs(hit.mean() - degrade.KINDS["salt_pepper"].levels[2]) < 0.005
    assert set(np.unique(out[hit])) <= {0, 255}


def test_stain_shift_changes_colour_not_structure(cells):
    """Another lab's stain: hue and dye amounts move, the image's structure (its edges) stays."""
    out = degrade.apply(cells, "stain_shift", 4, np.random.default_rng(1))
    assert np.abs(out.astype(float) - cells).mean() > 3
    for a, b in zip(cells, out):
        ga, gb = (cv2.Laplacian(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), cv2.CV_32F).ravel() for im in (a, b))
        assert np.corrcoef(ga, gb)[0, 1] > 0.9


def test_bad_arguments_are_named(cells):
    with pytest.raises(ValueError, match="unknown degradation 'fog'"):
        degrade.apply(cells, "fog", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity"):
        degrade.apply(cells, "jpeg", 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8 BxHxWx3"):
        degrade.apply(cells[0], "jpeg", 1, np.random.default_rng(0))


def test_random_degradation_for_training(cells):
    batch = np.repeat(cells[:1], 200, axis=0)
    out = degrade.random_degradation(batch, np.random.default_rng(0), p=0.3)
    changed = np.any(out != batch, axis=(1, 2, 3)).mean()
    assert 0.18 < changed < 0.42
    assert np.array_equal(out, degrade.random_degradation(batch, np.random.default_rng(0), p=0.3))
    assert np.array_equal(degrade.random_degradation(cells, np.random.default_rng(0), p=0.0), cells)
    every = degrade.random_degradation(cells, np.random.default_rng(0), p=1.0)
    assert np.any(every != cells, axis=(1, 2, 3)).all()
    sp = degrade.random_degradation(cells, np.random.default_rng(0), p=1.0, kinds=["salt_pepper"])
    assert set(np.unique(sp[sp != cells])) <= {0, 255}  # only the asked-for kind was used


def _dataset(root, sample_dir):
    src = root / "LY"
    src.mkdir(parents=True)
    for p in sorted((sample_dir / "cells" / "LY").glob("*.jpg"))[:3]:
        (src / p.name).write_bytes(p.read_bytes())
    (src / "corrupt.jpg").write_bytes(b"not an image")
    good = (sample_dir / "cells" / "LY").glob("*.jpg").__next__().read_bytes()
    (src / "truncated.jpg").write_bytes(good[: len(good) // 2])
    cv2.imwrite(str(src / "gray.png"), np.full((40, 40), 128, np.uint8))
    rgb = read_image(sorted(src.glob("*.jpg"))[0])
    cv2.imwrite(str(src / "deep.png"), rgb[..., ::-1].astype(np.uint16) * 257)  # 16-bit: converted, kept
    return root


def test_degrade_dataset_lists_every_input_and_is_deterministic(tmp_path, sample_dir):
    src = _dataset(tmp_path / "src", sample_dir)
    manifest = degrade.degrade_dataset(src, tmp_path / "dst", "gaussian_noise", 2, seed=1, progress=False)
    rows = list(csv.DictReader(open(manifest)))
    assert list(rows[0]) == degrade.MANIFEST_COLUMNS and len(rows) == 7  # nothing silently dropped
    bad = {r["source"].rsplit("/", 1)[1]: r["error"] for r in rows if r["error"]}
    assert set(bad) == {"corrupt.jpg", "truncated.jpg", "gray.png"}
    assert "truncated" in bad["truncated.jpg"] and "single-channel" in bad["gray.png"]
    good = [r for r in rows if not r["error"]]
    assert all((r["kind"], r["severity"], r["seed"], r["label"]) == ("gaussian_noise", "2", "1", "LY")
               for r in good)
    for r in good:  # readable copies of the same size, really degraded
        out, orig = read_image(tmp_path / "dst" / r["path"]), read_image(r["source"])
        assert out.shape == orig.shape and not np.array_equal(out, orig)
    # a file's output depends on its own name and the seed, not on which other files are present
    (src / "LY" / "corrupt.jpg").unlink()
    sorted(p for p in (src / "LY").glob("*.jpg") if p.name != "truncated.jpg")[0].unlink()
    again = degrade.degrade_dataset(src, tmp_path / "dst2", "gaussian_noise", 2, seed=1, progress=False)
    for r in csv.DictReader(open(again)):
        if r["path"]:
            assert (tmp_path / "dst" / r["path"]).read_bytes() == (tmp_path / "dst2" / r["path"]).read_bytes()
    other = degrade.degrade_dataset(src, tmp_path / "dst3", "gaussian_noise", 2, seed=2, progress=False)
    first = next(r["path"] for r in csv.DictReader(open(other)) if r["path"])
    assert (tmp_path / "dst3" / first).read_bytes() != (tmp_path / "dst" / first).read_bytes()


def test_degrade_dataset_refuses_bad_arguments_before_writing(tmp_path, sample_dir):
    src = _dataset(tmp_path / "src", sample_dir)
    with pytest.raises(ValueError, match="severity"):
        degrade.degrade_dataset(src, tmp_path / "dst", "jpeg", 0, progress=False)
    assert not (tmp_path / "dst").exists()

import shutil

import cv2
import numpy as np
import pytest

from wbc_edge.data import datasets, splits, wbcbench
from wbc_edge.data.images import ImageReadError, read_image


@pytest.fixture
def messy_folder(tmp_path, sample_dir):
    """A real ImageFolder with a corrupt, a truncated, an empty and a grayscale file planted in it."""
    root = tmp_path / "cells"
    for code in ("LY", "MO"):
        (root / code).mkdir(parents=True)
        for p in sorted((sample_dir / "cells" / code).glob("*.jpg"))[:5]:
            shutil.copy(p, root / code / p.name)
    good = (root / "LY").glob("*.jpg").__next__().read_bytes()
    (root / "LY" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "LY" / "corrupt.png").write_bytes(b"\x89PNG not really")
    (root / "MO" / "empty.jpg").write_bytes(b"")
    cv2.imwrite(str(root / "MO" / "grey.png"), np.full((50, 50), 128, np.uint8))
    return root


def test_image_folder_loads_good_and_reports_every_bad_file(messy_folder):
    ds = datasets.from_image_folder(messy_folder)
    assert len(ds) == 14 and ds.classes == ["LY", "MO"]
    images, kept, errors = ds.load(progress=False)
    assert len(images) == 10 and all(im.dtype == np.uint8 and im.ndim == 3 for im in images)
    assert len(kept) + len(errors) == len(ds)  # nothing disappears from the counts
    reasons = {e.path.split("/")[-1]: e.reason for e in errors}
    assert "truncated" in reasons["truncated.jpg"]
    assert "empty" in reasons["empty.jpg"]
    assert "decodable" in reasons["corrupt.png"]
    assert "single-channel" in reasons["grey.png"]


def test_read_image_is_rgb_and_16bit_is_scaled(tmp_path, sample_dir):
    path = sorted((sample_dir / "cells" / "EO").glob("*.jpg"))[0]
    rgb = read_image(path)
    bgr = cv2.imread(str(path))
    assert np.array_equal(rgb, bgr[..., ::-1])
    cv2.imwrite(str(tmp_path / "x16.png"), bgr.astype(np.uint16) * 257)
    assert np.array_equal(read_image(tmp_path / "x16.png"), rgb)
    with pytest.raises(ImageReadError, match="missing.jpg"):
        read_image(tmp_path / "missing.jpg")


def test_manifest_dataset(sample_dir):
    ds = datasets.from_manifest(sample_dir / "cells" / "manifest.csv")
    assert len(ds) == 330 and len(ds.classes) == 11
    assert all(p.exists() for p in map(__import__("pathlib").Path, (s.path for s in ds.samples)))
    assert datasets.open_dataset(sample_dir / "cells").labels == ds.labels


def test_splits_are_stratified_deterministic_and_group_aware():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 500)
    tr, va = splits.train_val_split(y, 0.2, seed=3)
    tr2, va2 = splits.train_val_split(y, 0.2, seed=3)
    assert np.array_equal(va, va2) and len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 500
    for c in range(5):  # each class keeps its share in the validation split
        assert abs((y[va] == c).mean() - (y == c).mean()) < 0.03
    groups = rng.integers(0, 40, 500)
    for tr, va in splits.kfold_indices(y, 4, seed=1, groups=groups):
        assert not set(groups[tr]) & set(groups[va])


def test_wbcbench_submission_roundtrip_and_errors(tmp_path):
    path = wbcbench.write_submission(tmp_path / "sub.csv", ["a.jpg", "b.jpg"], ["SNE", "PLY"])
    assert wbcbench.read_submission(path) == {"a.jpg": "SNE", "b.jpg": "PLY"}
    (tmp_path / "dup.csv").write_text("ID,labels\na.jpg,SNE\na.jpg,LY\n")
    with pytest.raises(ValueError, match="dup.csv:3: duplicate"):
        wbcbench.read_submission(tmp_path / "dup.csv")
    (tmp_path / "bad.csv").write_text("image,label\na.jpg,SNE\n")
    with pytest.raises(ValueError, match="ID,labels"):
        wbcbench.read_submission(tmp_path / "bad.csv")

"""Degradations on real cells: every kind x severity, deterministic per seed, monotone in severity."""
import csv

import numpy as np
import pytest

from wbc_edge.data import degrade
from wbc_edge.data.datasets import from_image_folder


@pytest.fixture(scope="module")
def cells(sample_dir):
    x, _, _ = from_image_folder(sample_dir / "cells").subset(range(0, 330, 33)).load(None, progress=False)
    return np.stack(x)


@pytest.mark.parametrize("kind", list(degrade.KINDS))
def test_each_kind_is_deterministic_and_grows_with_severity(cells, kind):
    change = []
    for sev in (1, 2, 3, 4):
        a = degrade.apply(cells, kind, sev, np.random.default_rng(5))
        b = degrade.apply(cells, kind, sev, np.random.default_rng(5))
        assert a.dtype == np.uint8 and a.shape == cells.shape and np.array_equal(a, b)
        change.append(np.abs(a.astype(float) - cells).mean())
    assert change[0] > 0 and change[3] > change[0]  # severity 4 changes the image more than severity 1


def test_bad_arguments_are_named(cells):
    with pytest.raises(ValueError, match="unknown degradation 'fog'"):
        degrade.apply(cells, "fog", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity"):
        degrade.apply(cells, "jpeg", 5, np.random.default_rng(0))


def test_random_degradation_touches_about_p_of_the_batch(cells):
    batch = np.repeat(cells[:1], 200, axis=0)
    out = degrade.random_degradation(batch, np.random.default_rng(0), p=0.3)
    changed = np.any(out != batch, axis=(1, 2, 3)).mean()
    assert 0.18 < changed < 0.42


def test_degrade_dataset_writes_every_input_with_a_manifest(tmp_path, sample_dir):
    src = tmp_path / "src" / "LY"
    src.mkdir(parents=True)
    for p in sorted((sample_dir / "cells" / "LY").glob("*.jpg"))[:3]:
        (src / p.name).write_bytes(p.read_bytes())
    (src / "bad.jpg").write_bytes(b"nope")
    manifest = degrade.degrade_dataset(tmp_path / "src", tmp_path / "dst", "gaussian_blur", 2, seed=1, progress=False)
    rows = list(csv.DictReader(open(manifest)))
    assert len(rows) == 4
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["source"].endswith("bad.jpg")
    again = degrade.degrade_dataset(tmp_path / "src", tmp_path / "dst2", "gaussian_blur", 2, seed=1, progress=False)
    for r in rows:
        if r["path"]:
            assert (tmp_path / "dst" / r["path"]).read_bytes() == (again.parent / r["path"]).read_bytes()

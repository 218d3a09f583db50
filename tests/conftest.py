import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "pbc-176").is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED


@pytest.fixture(scope="session")
def sample_bundle() -> Path:
    path = SAMPLE / "bundle"
    assert (path / "manifest.json").is_file(), "the repo must ship data/sample/bundle"
    return path


@pytest.fixture
def bundle_copy(tmp_path, sample_bundle) -> Path:
    """A private copy of the shipped bundle (without built INT8 graphs and without its fused graph, which a
    test builds when it needs one) that a test may change."""
    from wbc_edge.bundle import Bundle

    dst = tmp_path / "bundle"
    shutil.copytree(sample_bundle, dst, ignore=shutil.ignore_patterns("*.int8*", "ensemble*.onnx"))
    b = Bundle.load(dst, verify=False)
    if b.extra.pop("fused", None) is not None:
        b.extra.pop("parity", None)  # the fused graph's check went with it
        b.save()
    return dst


def copy_sample_cells(dst: Path, codes=("LY", "EO"), n: int = 2) -> Path:
    """A small ImageFolder at `dst`: the first `n` sample cells of each class in `codes` (real cells,
    scoreable by evaluate) -> dst."""
    for code in codes:
        (dst / code).mkdir(parents=True, exist_ok=True)
        for p in sorted((SAMPLE / "cells" / code).glob("*.jpg"))[:n]:
            shutil.copy(p, dst / code / p.name)
    return dst

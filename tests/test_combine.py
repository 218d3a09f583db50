"""`wbc-edge combine`: members of separately trained bundles joined into one ensemble that predicts the
weighted mean of its sources, refuses sources prepared differently, and refits its temperature."""
import json
import shutil

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")  # the second source bundle is made with `adapt` (train extra)

from click.testing import CliRunner  # noqa: E402

from wbc_edge.bundle import Bundle  # noqa: E402
from wbc_edge.cli import main  # noqa: E402
from wbc_edge.data.datasets import from_image_folder, write_manifest  # noqa: E402
from wbc_edge.edge.classifier import EnsembleClassifier  # noqa: E402
from wbc_edge.edge.preprocess import Preprocessor  # noqa: E402
from wbc_edge.fit.adapt import adapt  # noqa: E402
from wbc_edge.fit.combine import combine  # noqa: E402


@pytest.fixture(scope="module")
def sources(tmp_path_factory, sample_bundle, sample_dir):
    """The shipped bundle and a genuinely different one: the same member with BatchNorm statistics
    re-estimated on 30 sample cells (`adapt`)."""
    tmp = tmp_path_factory.mktemp("combine")
    cells = from_image_folder(sample_dir / "cells")
    site = write_manifest(tmp / "site.csv", ((str(cells.samples[i].path), "") for i in range(0, 330, 11)))
    other = adapt(sample_bundle, site, tmp / "adapted", batch_size=15)
    x = Preprocessor.for_bundle(Bundle.load(sample_bundle)).load(cells.subset(range(3, 330, 17)))[0]
    return {"a": Bundle.load(sample_bundle), "b": Bundle.load(other.root), "x": x, "tmp": tmp, "cells": cells}


def _raw(bundle, x) -> np.ndarray:
    with EnsembleClassifier(bundle, calibrated=False) as clf:
        return clf.predict(x)


def test_ensemble_predicts_the_weighted_mean_of_its_sources(sources, tmp_path):
    a, b, x = sources["a"], sources["b"], sources["x"]
    pa, pb = _raw(a, x), _raw(b, x)
    assert np.abs(pa - pb).max() > 1e-3  # the sources differ, so the weights matter
    new = Bundle.load(combine([a.root, b.root], tmp_path / "ens", weights=[1.0, 3.0]).root)  # verified
    na, nb = len(a.members), len(b.members)
    assert [m.name for m in new.members] == [f"m{i}" for i in range(na + nb)]
    assert [m.weight for m in new.members] == [m.weight for m in a.members] + [3 * m.weight for m in b.members]
    np.testing.assert_allclose(_raw(new, x), (pa + 3 * pb) / 4, atol=1e-5)
    for m in new.members:  # each graph names its new member
        meta = {p.key: p.value for p in onnx.load(str(new.path(m.onnx))).metadata_props}
        assert meta["member"] == m.name and json.loads(meta["classes"]) == new.classes
    sources_ = new.extra["training"]["combined"]["sources"]
    assert [s["bundle"] for s in sources_] == [str(a.root), str(b.root)]
    assert "confidence" not in new.extra and "drift" not in new.extra  # the sources' describe other models


def test_temperature_is_fitted_for_the_ensemble(sources, tmp_path):
    cells = sources["cells"]
    val = write_manifest(tmp_path / "val.csv", ((str(s.path), s.label) for s in cells.samples[::5]
                                                 if s.label in sources["a"].classes))
    new = combine([sources["a"].root, sources["b"].root], tmp_path / "ens", val=val)
    conf = new.extra["confidence"]
    assert conf["n_val"] == sum(1 for s in cells.samples[::5] if s.label in new.classes)
    assert conf["nll_after"] <= conf["nll_before"]


def test_sources_prepared_differently_are_refused(sources, tmp_path):
    other = Bundle.load(shutil.copytree(sources["b"].root, tmp_path / "other"))
    other.classes = list(reversed(other.classes))
    other.save()
    with pytest.raises(ValueError, match="classes"):
        combine([sources["a"].root, other.root], tmp_path / "ens")
    other = Bundle.load(shutil.copytree(sources["b"].root, tmp_path / "other2"))
    other.extra["scale"] = {**other.extra["scale"], "rbc_px": other.extra["scale"]["rbc_px"] * 1.5}
    other.save()
    with pytest.raises(ValueError, match="scale.rbc_px"):
        combine([sources["a"].root, other.root], tmp_path / "ens2")
    assert not (tmp_path / "ens").exists() or not any((tmp_path / "ens").iterdir())


def test_cli_combines_and_refuses_bad_weights(sources, tmp_path):
    a, b = str(sources["a"].root), str(sources["b"].root)
    r = CliRunner().invoke(main, ["combine", a, b, "--out", str(tmp_path / "bad"), "--weights", "0,0"])
    assert r.exit_code == 1 and "not all zero" in r.output
    r = CliRunner().invoke(main, ["combine", a, b, "--out", str(tmp_path / "ens"), "--weights", "2,1"])
    assert r.exit_code == 0, r.output
    n = len(sources["a"].members)
    assert f"{2 * n} members" in r.output
    assert [m.weight for m in Bundle.load(tmp_path / "ens").members] == [2.0] * n + [1.0] * n


def test_an_out_folder_in_use_is_refused(sources, tmp_path):
    from wbc_edge.outdir import OutputDirError, claim

    with claim(tmp_path / "ens"):  # another run holds it
        with pytest.raises(OutputDirError, match="in use by another wbc-edge run"):
            combine([sources["a"].root, sources["b"].root], tmp_path / "ens")
        with pytest.raises(OutputDirError, match="in use"):
            adapt(sources["a"].root, sources["tmp"] / "site.csv", tmp_path / "ens")

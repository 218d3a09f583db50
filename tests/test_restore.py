"""Learned restoration (issue 15): the quality gate, the restorer graph, its bundle section, and the
run-time path without torch. A tiny restorer is trained here on the sample cells (seconds); the shipped
bundle is not needed."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wbc_edge.bundle import Bundle, BundleError
from wbc_edge.data import degrade
from wbc_edge.data.datasets import open_dataset
from wbc_edge.edge.preprocess import Preprocessor
from wbc_edge.edge.quality import QualityGate, fit_gate, psnr, quality_scores

pytest.importorskip("torch")  # the trainer side (the run-time side is checked without torch below)
from wbc_edge.trainer.restorer import (RestorerConfig, build_unet, canonical, export_onnx,  # noqa: E402
                                       pair_preprocessor, run_torch, select_cells, train_restorer)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE, CELLS, PBC = ROOT / "data/sample/bundle", ROOT / "data/sample/cells", ROOT / "../shared/data/pbc-176"


@pytest.fixture(scope="module")
def cells():
    """The sample's white cells at native size, and the bundle."""
    bundle = Bundle.load(SAMPLE)
    ds = open_dataset(CELLS).filter_classes(bundle.classes)
    images, _, _ = ds.subset(range(0, len(ds), 3)).load(progress=False)
    return bundle, images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A bundle with a tiny restorer trained on unevenly lit sample cells (36 steps: under a minute on
    2 busy cores; uneven light is what so short a run learns measurably)."""
    out = tmp_path_factory.mktemp("restore") / "bundle"
    cfg = RestorerConfig(width=8, depth=2, n_cells=48, n_val=8, epochs=6, batch_size=8, crop=48, lr=1e-2,
                         clean_p=0.0, kinds=("illumination",), threads=2)
    return train_restorer(CELLS, SAMPLE, out, cfg)


def test_bundle_with_restorer_loads_verified_and_checksummed(tiny):
    b = Bundle.load(tiny.root)  # digest, every checksum, each graph's metadata
    section = b.extra["restore"]
    assert section["onnx"] in json.loads(b.manifest_path.read_text())["checksums"]
    assert section["onnx"] in b.extra_files()
    assert set(section["gate"]) >= {"min_sharpness", "max_unevenness", "max_tilt"}


def test_replaced_restorer_graph_is_refused(tiny, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny.root, copy)
    graph = copy / tiny.extra["restore"]["onnx"]
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="does not match its checksum"):
        Bundle.load(copy)


def test_restore_section_is_validated(tiny, tmp_path):
    for bad, match in ((lambda s: s["gate"].pop("min_sharpness"), "restore.gate.min_sharpness"),
                       (lambda s: s.update(onnx="../x.onnx"), "restore.onnx"),
                       (lambda s: s.update(enabled="yes"), "restore.enabled")):
        b = Bundle.load(tiny.root)
        bad(b.extra["restore"])
        b.root = tmp_path / "x"
        with pytest.raises(BundleError, match=match):
            b.validate()


def test_restorer_graph_must_be_one(tiny, tmp_path):
    """A classifier graph named as the restorer is refused at load, with the reason."""
    copy = tmp_path / "b"
    shutil.copytree(tiny.root, copy)
    b = Bundle.load(copy)
    b.extra["restore"]["onnx"] = b.members[0].onnx
    b.save()
    with pytest.raises(BundleError, match="not a restorer graph"):
        Bundle.load(copy)


def test_clean_cells_pass_bit_identical(tiny, cells):
    """Through the whole preprocessor: cells the gate passes give the same model input with and without
    the restorer. (The tiny bundle's gate is fitted on 40 cells only; the gate fitted on training cells
    passes every held-out clean cell: the next test.)"""
    bundle, images = cells
    plain = Preprocessor.for_bundle(bundle).crops(images)
    gated = Preprocessor.for_bundle(tiny).crops(images)
    passed = ~gated.gate.restored
    assert passed.mean() > 0.9
    assert np.array_equal(plain.batch[passed], gated.batch[passed])


@pytest.mark.skipif(not PBC.is_dir(), reason="../shared/data/pbc-176 is not here")
def test_gate_fitted_on_training_cells_passes_held_out_clean_cells(cells):
    """Thresholds fitted on PBC training cells (never the sample's) let every held-out clean cell pass,
    and catch severity-4 blur and uneven light."""
    bundle, images = cells
    pre = pair_preprocessor(bundle)
    ds = select_cells(PBC, 300, CELLS, seed=1)
    train, _, _ = ds.load(progress=False)
    gate = QualityGate(**fit_gate(canonical(pre, train)))
    run = Preprocessor.for_bundle(bundle)
    assert not gate(np.stack([run.crop(im)[0] for im in images]))[0].any()
    x = np.stack(images)
    for kind in ("gaussian_blur", "defocus_blur", "illumination"):
        bad = degrade.apply(x, kind, 4, np.random.default_rng(0))
        fired = gate(np.stack([run.crop(im)[0] for im in bad]))[0]
        assert fired.mean() > 0.8, (kind, fired.mean())


def test_degraded_cell_is_gated_and_restored(tiny, cells):
    bundle, images = cells
    pre = pair_preprocessor(bundle)
    clean = canonical(pre, images)
    blurred = canonical(pre, degrade.apply(np.stack(images), "illumination", 4, np.random.default_rng(0)))
    step = Preprocessor.for_bundle(tiny).restorer
    out, gate = step(blurred)
    assert gate.restored.mean() > 0.8
    assert gate.scores.shape == (len(blurred), 3)
    before = np.mean([psnr(a, b) for a, b in zip(blurred[gate.restored], clean[gate.restored])])
    after = np.mean([psnr(a, b) for a, b in zip(out[gate.restored], clean[gate.restored])])
    assert after > before + 0.3, (before, after)
    assert np.array_equal(out[~gate.restored], blurred[~gate.restored])  # passed cells untouched


def test_onnx_export_matches_torch(tmp_path, cells):
    import onnxruntime as ort
    import torch

    torch.manual_seed(0)
    net = build_unet(8, 2).eval()
    with torch.no_grad():  # a non-identity net: the zero-initialised head would hide a layout error
        net.head.weight.normal_(0, 0.05)
    bundle, images = cells
    batch = canonical(pair_preprocessor(bundle), images[:6])
    path = export_onnx(net, tmp_path / "r.onnx", batch.shape[1])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(uint8)" and sess.get_outputs()[0].type == "tensor(uint8)"
    got, want = sess.run(None, {"images": batch})[0], run_torch(net, batch)
    assert got.shape == batch.shape
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float rounding ties only
    assert not np.array_equal(got, batch)


def test_evaluate_rows_carry_the_gate(tiny, tmp_path):
    from wbc_edge.evaluate import evaluate

    ds = open_dataset(CELLS).filter_classes(tiny.classes)
    data = tmp_path / "cells"
    for i, s in enumerate(ds.samples[::20]):
        dst = data / s.label / Path(s.path).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if i % 2:  # every other cell blurred
            import cv2

            from wbc_edge.data.images import read_image

            bad = degrade.apply(read_image(s.path)[None], "gaussian_blur", 4, np.random.default_rng(i))[0]
            cv2.imwrite(str(dst.with_suffix(".png")), np.ascontiguousarray(bad[..., ::-1]))
        else:
            shutil.copy(s.path, dst)
    report = evaluate(tiny.root, data, tmp_path / "out", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "out/predictions.jsonl").read_text().splitlines()]
    assert all("quality" in r and {"sharpness", "unevenness", "tilt", "restore"} <= set(r["quality"]) for r in rows)
    learned = [r for r in rows if r.get("restored") == "learned"]
    assert learned and all(r["quality"]["restore"] for r in learned)
    assert report["n_restored_learned"] == len(learned)


def test_run_time_needs_no_torch(tiny):
    """The restorer path imports ONNX Runtime only: torch blocked, a blurred cell is still restored."""
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
from wbc_edge.bundle import Bundle
from wbc_edge.data import degrade
from wbc_edge.data.datasets import open_dataset
from wbc_edge.edge.preprocess import Preprocessor
b = Bundle.load({str(tiny.root)!r})
ds = open_dataset({str(CELLS)!r}).filter_classes(b.classes)
imgs, _, _ = ds.subset(range(4)).load(progress=False)
p = Preprocessor.for_bundle(b).crops(list(degrade.apply(np.stack(imgs), "gaussian_blur", 4, np.random.default_rng(0))))
assert p.gate.restored.any(), p.gate.scores
print("ok", int(p.gate.restored.sum()))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("ok")


def test_quality_scores_see_the_degradations(cells):
    bundle, images = cells
    pre = pair_preprocessor(bundle)
    clean = quality_scores(canonical(pre, images))
    x = np.stack(images)
    blur = quality_scores(canonical(pre, degrade.apply(x, "motion_blur", 4, np.random.default_rng(0))))
    light = quality_scores(canonical(pre, degrade.apply(x, "illumination", 1, np.random.default_rng(0))))
    assert np.median(blur[:, 0]) < 0.7 * np.median(clean[:, 0])  # sharpness falls with motion
    assert np.median(light[:, 1]) > 3 * np.median(clean[:, 1])  # a mild ramp already lifts unevenness

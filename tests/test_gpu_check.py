"""scripts/gpu-check without a GPU: every CPU step runs, it stops at the first GPU step saying so, exit 0."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import compare_rows, gpu_present

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_stops_at_the_first_gpu_step(tmp_path):
    if gpu_present()[0]:
        pytest.skip("a GPU is here: scripts/gpu-check runs for real (minutes), not as a dry run")
    run = subprocess.run([str(ROOT / "scripts" / "gpu-check"), "--out", str(tmp_path), "--cells", "24"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "stopping at step 'gpu', the first GPU step: no CUDA GPU here" in run.stdout
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = result["steps"]
    assert [s for s in steps] == ["cpu-reference", "evaluate-cpu", "stream-cpu", "gpu"]
    assert all(steps[s]["status"] == "ok" for s in ("cpu-reference", "evaluate-cpu", "stream-cpu"))
    assert steps["gpu"]["status"] == "stopped" and result["gpu"] is None
    assert steps["cpu-reference"]["result"]["cells"] == 24
    assert steps["evaluate-cpu"]["result"]["n"] > 0 and steps["stream-cpu"]["result"]["cells"] > 0
    assert "| gpu | stopped |" in (tmp_path / "gpu_check.md").read_text()


def test_row_comparison_sees_a_changed_class():
    cpu = {"a": {"pred": "LY", "confidence": 0.9}, "b": {"pred": "MO", "confidence": 0.6}}
    gpu = {"a": {"pred": "LY", "confidence": 0.89}, "b": {"pred": "LY", "confidence": 0.55}}
    r = compare_rows(cpu, gpu)
    assert r["common"] == 2 and r["pred_agreement"] == 0.5 and abs(r["max_conf_diff"] - 0.05) < 1e-9


@pytest.mark.skipif(shutil.which("bash") is None, reason="scripts/gpu-check is a bash script")
def test_help_names_the_options():
    run = subprocess.run([str(ROOT / "scripts" / "gpu-check"), "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "--wheels" in run.stdout and "--budget-s" in run.stdout


def _cuda_runner_here() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(_cuda_runner_here(), reason="ONNX Runtime has CUDA here: --device cuda does not fall back")
@pytest.mark.parametrize("command", ["evaluate", "stream"])
def test_device_cuda_without_a_gpu_falls_back_to_the_cpu_in_one_logged_line(command, tmp_path):
    """evaluate and stream alike: exit 0, one warning line saying the run is on the CPU and why, the same
    rows as --device cpu."""
    data = str(ROOT / "data/sample/cells" if command == "evaluate" else ROOT / "data/sample/frames/JPEGImages")
    rows = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        run = subprocess.run([sys.executable, "-m", "wbc_edge.cli", command, data, "--bundle",
                              str(ROOT / "data/sample/bundle"), "--out", str(out), "--device", device]
                             + (["--no-report"] if command == "stream" else []),
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        said = [line for line in run.stderr.splitlines() if "--device cuda" in line]
        if device == "cuda":
            assert len(said) == 1, run.stderr  # one line for both members, not one per member and runner
            assert "running on ort-cpu" in said[0] and "ort-cuda: ONNX Runtime has no CUDAExecutionProvider" in said[0]
            assert "Traceback" not in run.stderr
        else:
            assert not said
        if command == "stream":  # each timed stage says where it ran: here all on the CPU, the fallback included
            timing = json.loads((out / "summary.json").read_text())["timing"]
            assert {"decode", "localise", "infer"} <= set(timing)
            assert {t["device"] for t in timing.values()} == {"cpu"}, timing
        name = "predictions.jsonl" if command == "evaluate" else "cells.jsonl"
        rows[device] = [(r.get("pred"), r.get("confidence")) for r in map(json.loads, (out / name).read_text().splitlines())]
    assert rows["cpu"] and rows["cpu"] == rows["cuda"]


# ---- the host-to-device boundary ---------------------------------------------------------------------
def test_device_xp_is_numpy_with_a_reason_unless_cupy_can_allocate():
    import numpy as np

    from wbc_edge.xp import device_xp

    assert device_xp("cpu") == (np, None)
    xp, why = device_xp("cuda")
    assert (xp is np) == (why is not None)  # CuPy only with a GPU it could allocate on; else it says why
    if xp is np:
        assert "CuPy" in why


def test_the_stream_crosses_to_the_device_once_per_micro_batch(tmp_path, monkeypatch):
    """The product path: each micro-batch is handed to `upload` once (the colour step, views, runners and
    means then run on what it returns); on CPU that is the host array itself and every stage says cpu."""
    from wbc_edge.edge import classifier as cl
    from wbc_edge.edge.pipeline import run_stream

    calls = []
    real = cl.EnsembleClassifier.upload

    def counted(self, batch):
        calls.append(len(batch))
        return real(self, batch)

    monkeypatch.setattr(cl.EnsembleClassifier, "upload", counted)
    s = run_stream(ROOT / "data/sample/frames/JPEGImages", ROOT / "data/sample/bundle", tmp_path / "out", report=False)
    # the stream's upload, then predict's own (a no-op on the uploaded array): two per batch, never per view
    assert len(calls) == 2 * s.batches["count"] and sum(calls) == 2 * s.cells
    assert s.timing["infer"]["device"] == "cpu"


def test_cuda_classifier_keeps_the_batch_on_the_gpu(sample_dir):
    """On a CUDA machine: the ensemble runs on CuPy arrays between one upload and one answer, and agrees
    with the CPU. Skipped (with the reason) wherever CuPy cannot allocate or ORT has no CUDA provider."""
    import numpy as np

    from wbc_edge.bundle import Bundle
    from wbc_edge.data.datasets import load_bundle_cells
    from wbc_edge.edge.classifier import EnsembleClassifier
    from wbc_edge.xp import device_xp

    xp, why = device_xp("cuda")
    if xp is np:
        pytest.skip(why)
    if not _cuda_runner_here():
        pytest.skip("ONNX Runtime has no CUDAExecutionProvider here (onnxruntime-gpu)")
    b = Bundle.load(ROOT / "data/sample/bundle")
    x = load_bundle_cells(b, sample_dir / "cells")[0][::10]
    with EnsembleClassifier(b, device="cuda") as gpu, EnsembleClassifier(b) as cpu:
        assert gpu.xp is xp and all(r.on_device for r in gpu.runners)
        got = gpu.predict(gpu.upload(x))
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, cpu.predict(x), atol=1e-4)

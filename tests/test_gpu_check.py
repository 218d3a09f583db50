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

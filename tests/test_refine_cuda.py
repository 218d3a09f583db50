"""The CUDA twins of the refine kernels equal the CPU kernels: under the simulator, and on a GPU if any."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "cudasim_refine_check.py"


def test_cuda_kernels_and_the_refiners_cuda_path_equal_the_cpu_under_the_simulator():
    """The kernels one by one, and the product path: Refiner.for_bundle(bundle, True, "cuda") computes phase
    3's features with the CUDA kernels on the device batch and refines exactly as the CPU refiner does."""
    # a fresh process: NUMBA_ENABLE_CUDASIM is read when numba.cuda is first imported
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(CHECK)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("OK ") == 12, run.stdout
    assert "OK   refined classes and changes equal the CPU path" in run.stdout


@pytest.mark.gpu
def test_cuda_kernels_equal_cpu_kernels_on_a_gpu():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("the simulator is on: the test above covers it")
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    sys.path.insert(0, str(ROOT / "tests"))
    import cudasim_refine_check

    assert cudasim_refine_check.main() == 0


def test_refiner_on_cuda_without_a_gpu_computes_features_on_the_cpu_and_says_so(caplog):
    import logging

    from numba import cuda

    if cuda.is_available():
        pytest.skip("numba.cuda has a GPU (or the simulator) here: the CUDA path runs")
    from wbc_edge.edge.refine.refiner import Refiner

    config = {"morphology": {"enabled": True, "pairs": [["SNE", "BNE"]], "close": 0.25, "outliers": {},
                             "model": {"classes": {}, "feature_names": [], "center": [], "scale": []}}}
    with caplog.at_level(logging.WARNING, logger="wbc_edge.refine"):
        refiner = Refiner(config, ["SNE", "BNE"], device="cuda")
    assert refiner.features_device == "cpu"
    assert any("--device cuda: refinement features on the CPU" in r.getMessage() for r in caplog.records)

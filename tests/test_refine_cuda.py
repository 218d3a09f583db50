"""The CUDA twins of the refine kernels equal the CPU kernels: under the simulator, and on a GPU if any."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "cudasim_refine_check.py"


def test_cuda_kernels_equal_cpu_kernels_under_the_simulator():
    # a fresh process: NUMBA_ENABLE_CUDASIM is read when numba.cuda is first imported
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(CHECK)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("OK ") == 9, run.stdout


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

"""Runners: one interface (activate / infer / deactivate, context manager, per-call timing).

Every runner takes the raw uint8 NHWC crop batch and returns float32 class probabilities (B, C);
preprocessing lives inside the graph. `open_runner` walks an explicit, logged fallback order.
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from pathlib import Path

import numpy as np

from ..xp import device_xp, get_xp, to_numpy

log = logging.getLogger("wbc_edge.runners")


class RunnerError(RuntimeError):
    pass


class Runner(ABC):
    name = "runner"

    def __init__(self):
        self.device = "?"
        self.timings: deque[float] = deque(maxlen=4096)  # seconds per infer() call, the most recent
        self.active = False

    @abstractmethod
    def activate(self) -> None: ...

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray: ...

    def deactivate(self) -> None:
        self.active = False

    # a runner that takes a CuPy batch where it lies and answers on the device (TensorRT; ORT CUDA with
    # IO binding); the others are given host arrays
    on_device = False

    def infer(self, batch):
        """Probabilities (B, C) of a uint8 BxHxWx3 batch. A device runner keeps a CuPy batch on the GPU and
        answers with a CuPy array; every other runner takes and returns NumPy (a CuPy batch is copied)."""
        if not self.active:
            raise RunnerError(f"{self.name}: infer() before activate()")
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"{self.name}: expected a uint8 BxHxWx3 batch, got {batch.dtype} {batch.shape}")
        xp = get_xp(batch)
        batch = xp.ascontiguousarray(batch) if self.on_device else np.ascontiguousarray(to_numpy(batch))
        t0 = time.perf_counter()
        out = self._infer(batch)
        self.timings.append(time.perf_counter() - t0)
        return out

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()
        return False


class OrtRunner(Runner):
    """ONNX Runtime on CPU (default) or CUDA."""

    PROVIDERS = {"cpu": ["CPUExecutionProvider"],
                 "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}

    def __init__(self, onnx_path, device: str = "cpu", threads: int | None = None, spin: bool = True):
        super().__init__()
        self.onnx_path, self.device, self.threads, self.spin = Path(onnx_path), device, threads, spin
        self.name = f"ort-{device}:{self.onnx_path.name}"
        self.session = None

    def activate(self) -> None:
        import onnxruntime as ort

        if not self.onnx_path.is_file():
            raise RunnerError(f"{self.onnx_path}: ONNX file not found")
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        # ORT's pool threads spin between ops and after each run, waiting for more work. Back-to-back
        # batches gain (the fused graph at 32 cells x 8 views: 196 against 256 ms a call, 2 cores), but a
        # stream's decode and localiser threads share those cores: there spinning took their time, and
        # turning it off raised 1440x900 frames from 28 to 44 frames/s (spin=False).
        if not self.spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        wanted = self.PROVIDERS[self.device]
        if self.device == "cuda" and hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21: CUDA/cuDNN
            ort.preload_dlls()  # from the nvidia-* wheels of `onnxruntime-gpu[cuda,cudnn]`, not the system
        if wanted[0] not in ort.get_available_providers():
            raise RunnerError(f"ONNX Runtime has no {wanted[0]} here (install 'wbc-edge[gpu]' on a CUDA machine)")
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), opts, providers=wanted)
        except Exception as exc:  # ORT raises its own exception types for bad or truncated graphs
            raise RunnerError(f"{self.onnx_path}: ONNX Runtime cannot load it ({exc})") from exc
        self.input_name = self.session.get_inputs()[0].name
        out = self.session.get_outputs()[0]
        self.output_name, self.num_classes = out.name, out.shape[-1]
        if self.device == "cuda" and self.session.get_providers()[0] == "CUDAExecutionProvider":
            self._cp = device_xp("cuda")[0]
            self.on_device = self._cp is not np  # CuPy batches are bound where they lie (IO binding)
        self.active = True

    def _infer(self, batch):
        if isinstance(batch, np.ndarray):  # host in, host out (as the Runner contract says), on any provider
            return self.session.run(None, {self.input_name: batch})[0]
        return self._infer_bound(batch)  # a CuPy batch, handed over as it is by Runner.infer (on_device)

    def _infer_bound(self, batch):
        """ORT CUDA on device memory: the CuPy batch is bound as the input and a CuPy array as the output
        (IO binding), so nothing crosses to the host; the answer stays on the GPU for the ensemble mean."""
        cp = self._cp
        out = cp.empty((batch.shape[0], self.num_classes), cp.float32)
        dev = batch.device.id
        cp.cuda.get_current_stream().synchronize()  # written on CuPy's stream; ORT reads on its own
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", dev, np.uint8, tuple(batch.shape), batch.data.ptr)
        binding.bind_output(self.output_name, "cuda", dev, np.float32, tuple(out.shape), out.data.ptr)
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out

    def deactivate(self) -> None:
        self.session = None
        super().deactivate()


# (device, precision) -> runner factories tried in order; the first that activates wins.
FALLBACKS = {
    "cpu": ("ort-cpu",),
    "cuda": ("tensorrt", "ort-cuda", "ort-cpu"),
}


def _factory(kind: str, onnx_path, engine_path=None, threads=None, spin: bool = True) -> Runner:
    if kind == "ort-cpu":
        return OrtRunner(onnx_path, "cpu", threads, spin)
    if kind == "ort-cuda":
        return OrtRunner(onnx_path, "cuda", threads, spin)
    if kind == "tensorrt":
        from .trt_runner import TensorRTRunner  # imports tensorrt/cupy only on this path

        if engine_path is None:
            raise RunnerError("no TensorRT engine built for this member (run `wbc-edge build --target trt-fp16`)")
        return TensorRTRunner(engine_path)
    raise ValueError(f"unknown runner kind {kind!r}")


_said: set[str] = set()  # fallback lines already logged: one line per reason, not one per member


def _say_once(text: str) -> None:
    if text not in _said:
        _said.add(text)
        log.warning("%s", text)


def open_runner(onnx_path, device: str = "cpu", engine_path=None, threads: int | None = None,
                spin: bool = True) -> Runner:
    """Activate the first runner that works for `device`. A fallback is logged once per reason: with
    `--device cuda` on a machine without a usable GPU that is one line saying the run is on the CPU and why."""
    errors = []
    for kind in FALLBACKS[device]:
        try:
            runner = _factory(kind, onnx_path, engine_path, threads, spin)
            runner.activate()
        except Exception as exc:  # noqa: BLE001 - each failure is logged and the next runner tried
            errors.append(f"{kind}: {exc}")
            log.info("runner %s unavailable (%s); falling back", kind, exc)
            continue
        if errors:
            _say_once(f"--device {device}: running on {kind} ({'; '.join(errors)})")
        log.info("running %s on %s", Path(onnx_path).name, runner.name)
        return runner
    raise RunnerError("no runner could start:\n  " + "\n  ".join(errors))

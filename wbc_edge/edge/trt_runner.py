"""TensorRT runner: name-based tensor API (TensorRT 10/11), CuPy device buffers and stream (no pycuda).

Takes the uint8 NHWC crop batch like every runner and returns float32 probabilities. A NumPy batch goes
through pinned host and device buffers that grow only when a batch is larger than any seen before; copies
run on the runner's own stream, synchronised before NumPy is returned. A CuPy batch (the classifier's
device path) is bound where it lies and answered with a CuPy array: no host copy either way. Batches
above the engine profile's max are chunked.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .._optional import require
from .runners import Runner, RunnerError


class TensorRTRunner(Runner):
    name = "tensorrt"
    on_device = True  # a CuPy batch is bound where it lies; the probabilities stay on the GPU

    def __init__(self, engine_path, expected_key: str | None = None, device_id: int = 0):
        super().__init__()
        self.engine_path, self.expected_key, self.device_id = Path(engine_path), expected_key, device_id
        self.name = f"tensorrt:{self.engine_path.name}"
        self._loaded = self.context = self.stream = None
        self._d_in = self._d_out = self._h_in = self._h_out = None
        self._capacity = 0

    # ---- lifecycle --------------------------------------------------------------------------------
    def activate(self) -> None:
        from ..build.tensorrt import current_key, device_info, import_tensorrt, load_engine, read_sidecar

        trt, self._cp = import_tensorrt(), require("cupy", "tensorrt")
        self._cupyx = require("cupyx", "tensorrt")
        meta = read_sidecar(self.engine_path)
        with self._cp.cuda.Device(self.device_id):
            # The key for *this* TensorRT and GPU: an engine copied from another machine fails here, clearly.
            key = self.expected_key or current_key(meta["parts"], self.device_id)
            self._loaded = load_engine(self.engine_path, key)
            engine = self._loaded.engine
            self.context = engine.create_execution_context()
            self.stream = self._cp.cuda.Stream(non_blocking=True)
        self._bind_names(trt, engine)
        gpu, cc = device_info(self.device_id)
        precision = meta["parts"]["precision"]
        self.device = f"cuda:{self.device_id} {gpu} (sm {cc}), TensorRT {trt.__version__} {precision}"
        self.name = f"tensorrt-{precision}:{self.engine_path.name}"
        self.active = True

    def _bind_names(self, trt, engine) -> None:
        """Find the one input and one output by mode, check their dtypes, read the profile's max batch."""
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RunnerError(f"{self.engine_path}: expected one input and one output, "
                              f"got {inputs} / {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.input_name)))
        out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.output_name)))
        if in_dtype != np.uint8 or out_dtype != np.float32:
            raise RunnerError(f"{self.engine_path}: engine I/O is {in_dtype} -> {out_dtype}, "
                              "expected uint8 -> float32")
        self.max_batch = int(engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        out_shape = engine.get_tensor_shape(self.output_name)  # (-1, classes); Dims has no negative index
        self.num_classes = int(out_shape[len(out_shape) - 1])

    def deactivate(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()  # nothing in flight may outlive the buffers
        self.context = self._loaded = self.stream = None
        self._d_in = self._d_out = self._h_in = self._h_out = None
        self._capacity = 0
        super().deactivate()

    # ---- inference --------------------------------------------------------------------------------
    def _grow(self, n: int, image_shape: tuple) -> None:
        """(Re)allocate device and pinned host buffers only when the batch outgrows them."""
        if n <= self._capacity and self._d_in.shape[1:] == image_shape:
            return
        cp, cupyx = self._cp, self._cupyx
        with cp.cuda.Device(self.device_id):
            self._d_in = cp.empty((n, *image_shape), dtype=np.uint8)
            self._d_out = cp.empty((n, self.num_classes), dtype=np.float32)
        # pinned host memory makes the copies truly asynchronous on the stream
        self._h_in = cupyx.empty_pinned((n, *image_shape), dtype=np.uint8)
        self._h_out = cupyx.empty_pinned((n, self.num_classes), dtype=np.float32)
        self._capacity = n

    def _run_chunk(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        self._grow(n, batch.shape[1:])
        d_in, d_out, h_in, h_out = self._d_in[:n], self._d_out[:n], self._h_in[:n], self._h_out[:n]
        np.copyto(h_in, batch)
        with self._cp.cuda.Device(self.device_id):
            d_in.set(h_in, stream=self.stream)  # host -> device on our stream
            self._execute(batch.shape, d_in, d_out)
            d_out.get(stream=self.stream, out=h_out, blocking=False)  # device -> host on the same stream
            self.stream.synchronize()
        return h_out.copy()  # the pinned buffer is reused by the next call

    def _run_device_chunk(self, batch):
        """A CuPy chunk: its own memory is the engine's input and a new device array its output; the
        engine's stream waits for the work that made the batch, and CuPy's stream for the engine."""
        cp = self._cp
        out = cp.empty((batch.shape[0], self.num_classes), cp.float32)
        with cp.cuda.Device(self.device_id):
            self.stream.wait_event(cp.cuda.get_current_stream().record())
            self._execute(batch.shape, batch, out)
            cp.cuda.get_current_stream().wait_event(self.stream.record())
        return out

    def _execute(self, shape, d_in, d_out) -> None:
        """Enqueue the engine on our stream with these device arrays as its input and output."""
        if not self.context.set_input_shape(self.input_name, tuple(shape)):
            raise RunnerError(f"{self.name}: input shape {tuple(shape)} is outside the engine's profile")
        self.context.set_tensor_address(self.input_name, d_in.data.ptr)
        self.context.set_tensor_address(self.output_name, d_out.data.ptr)
        if not self.context.execute_async_v3(self.stream.ptr):
            raise RunnerError(f"{self.name}: execute_async_v3 failed")

    def _infer(self, batch):
        on_gpu = not isinstance(batch, np.ndarray)  # Runner.infer hands a CuPy batch over as it is
        if len(batch) == 0:
            return (self._cp if on_gpu else np).empty((0, self.num_classes), np.float32)
        run = self._run_device_chunk if on_gpu else self._run_chunk
        chunks = [run(batch[i:i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        return (self._cp if on_gpu else np).concatenate(chunks)

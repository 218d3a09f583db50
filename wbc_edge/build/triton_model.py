"""Triton Python-backend model (copied into a repository as `1/model.py` by `--triton-backend python`):
the repository's `1/model.onnx` run by ONNX Runtime on CPU inside the server.

For servers without the onnxruntime backend (the `tritonserver` that the nvidia-pytriton wheel ships has
only the Python backend); the graph and its I/O are the same as the onnxruntime_onnx model's. The requests
the dynamic batcher hands over together run as one ONNX Runtime call.
"""
import json
import os
import sys
from pathlib import Path

# The backend's stub starts an isolated interpreter that ignores PYTHONPATH; honour it here, so a server
# started from a virtual environment (the tests' and the benchmark's) finds numpy and onnxruntime there.
sys.path += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402 - provided by the server's Python backend


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        opts = ort.SessionOptions()
        threads = config.get("parameters", {}).get("ort_threads", {}).get("string_value")
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input, self.output = config["input"][0]["name"], config["output"][0]["name"]

    def execute(self, requests):
        try:
            # DLPack both ways, not as_numpy()/Tensor(name, array): stubs built against NumPy 1's C layout
            # (nvidia-pytriton 0.7.0's) read NumPy 2 arrays wrongly and answer with empty tensors
            batches = [np.from_dlpack(pb_utils.get_input_tensor_by_name(r, self.input)) for r in requests]
            probs = self.session.run(None, {self.input: np.concatenate(batches)})[0]
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error, the server lives on
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"wbc_edge model: {exc}"))
                    for _ in requests]
        parts = np.split(probs, np.cumsum([len(b) for b in batches])[:-1])
        tensors = [pb_utils.Tensor.from_dlpack(self.output, np.ascontiguousarray(p, np.float32)) for p in parts]
        return [pb_utils.InferenceResponse([t]) for t in tensors]

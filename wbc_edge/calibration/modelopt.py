"""INT8 with NVIDIA ModelOpt (extra: `modelopt`): Q/DQ graphs placed by TensorRT's own rules.

ModelOpt's ONNX PTQ (`modelopt.onnx.quantization.quantize`, checked against nvidia-modelopt 0.47.0)
calibrates with ONNX Runtime and places symmetric INT8 Q/DQ where TensorRT fuses them. As with the ORT
quantiser, the raw member graph is quantised and the bundle's IO surgery goes around it afterwards, so
the CPU check against FP32 and the refusal threshold apply unchanged.

`high_precision="fp32"` is the default because the FP32 check runs on ORT CPU: ModelOpt's FP16 mix
(`"fp16"`) is meant for TensorRT, and ORT CPU's FP16 ReduceMean (the squeeze-excite blocks) drifts far
enough to flip most top-1 predictions on the sample bundle, so such a graph would be refused here.
"""
from __future__ import annotations

import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .._optional import require
from ..bundle import Bundle
from ..build.surgery import build_bundle_member_graph, raw_graph_path
from .reader import FloatBatchReader

EXTRA = "modelopt"
# wbc-edge --calib-method -> ModelOpt's INT8 calibration_method; ModelOpt has no percentile for INT8
# (it would silently fall back to max), so that one is refused, not mapped.
METHODS = {"minmax": "max", "entropy": "entropy"}
CALIB_BATCH = 32


def require_modelopt():
    """ModelOpt's ONNX quantisation module, or MissingExtraError naming the extra."""
    return require("modelopt.onnx.quantization", EXTRA)


def modelopt_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"--quantizer modelopt has no {method!r} calibration for INT8; use "
                         f"{' or '.join(METHODS)}, or --quantizer ort")
    return METHODS[method]


@contextmanager
def _ort_quantization_restored():
    """ModelOpt monkey-patches ONNX Runtime's calibrators and quantisers for the whole process (0.47:
    `patch_ort_modules`), after which ORT's own `quantize_static` fails on our graphs; put every patched
    function back so `--quantizer ort` still works later in the same process (tests, notebooks)."""
    modules = [m for n, m in list(sys.modules.items()) if n.startswith("onnxruntime.quantization") and m]
    classes = [v for m in modules for v in vars(m).values()
               if isinstance(v, type) and v.__module__.startswith("onnxruntime.quantization")]
    saved = [(owner, {k: v for k, v in vars(owner).items() if callable(v)}) for owner in modules + classes]
    try:
        yield
    finally:
        for owner, before in saved:
            for key, value in before.items():
                if vars(owner).get(key) is not value:
                    setattr(owner, key, value)


def quantize_member(bundle: Bundle, member, images: np.ndarray, out_name: str, method: str = "minmax",
                    scheme: str = "s8s8", high_precision: str = "fp32") -> Path:
    """Quantise one member's raw graph with ModelOpt on `images` (uint8 NHWC), then build its deployable
    INT8 graph (uint8 in, normalisation and softmax inside, metadata). Same call as the ORT quantiser's."""
    if scheme != "s8s8":
        raise ValueError(f"ModelOpt makes symmetric S8S8 Q/DQ (for TensorRT) only, not {scheme!r}")
    calib_method = modelopt_method(method)
    mq = require_modelopt()
    # the reader's normalised batches, as one array: ModelOpt splits it by `calibration_shapes`
    data = np.concatenate(FloatBatchReader(images, bundle).batches)
    batch = min(CALIB_BATCH, len(data))
    # ModelOpt writes its intermediate files beside the graph it is given
    with tempfile.TemporaryDirectory() as tmp, _ort_quantization_restored():
        raw = raw_graph_path(bundle, member, tmp)
        qdq = Path(tmp) / "qdq.onnx"
        mq.quantize(str(raw), quantize_mode="int8", calibration_data=data, calibration_method=calib_method,
                    calibration_shapes=f"input:{batch}x{'x'.join(map(str, data.shape[1:]))}",
                    calibration_eps=["cpu"],  # calibrate where it will be checked; no CUDA/TensorRT needed
                    high_precision_dtype=high_precision, output_path=str(qdq), log_level="WARNING")
        if not qdq.is_file():
            raise RuntimeError(f"ModelOpt wrote no quantised graph for member {member.name!r}")
        return build_bundle_member_graph(bundle, member, qdq, out_name, precision="int8-modelopt",
                                         calibration=method, quantizer="modelopt", high_precision=high_precision)

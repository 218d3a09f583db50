"""INT8 with ONNX Runtime's quantiser: Q/DQ graphs calibrated on real cells.

The raw member graph (float NCHW) is quantised, then the same IO surgery as the FP32 graph puts the
uint8 input, normalisation and softmax around it, so the normalisation itself stays in float.
U8S8 (uint8 activations, int8 weights) suits CPUs with VNNI; S8S8 symmetric is what TensorRT wants.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from ..bundle import Bundle
from ..build.surgery import build_bundle_member_graph, raw_graph_path
from .reader import FloatBatchReader

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
SCHEMES = {
    "u8s8": dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, extra_options={}),
    "s8s8": dict(activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                 # TensorRT dequantises only 8-bit (and FP8/4-bit) tensors: biases stay float, not INT32
                 extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}),
}


def quantize_member(bundle: Bundle, member, images, out_name: str, method: str = "minmax",
                    scheme: str = "u8s8") -> Path:
    """Quantise one member's raw graph with `images` (uint8 NHWC) and build its deployable INT8 graph."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    with tempfile.TemporaryDirectory() as tmp:
        raw = raw_graph_path(bundle, member, tmp)
        prepped, qdq = Path(tmp) / "prepped.onnx", Path(tmp) / "qdq.onnx"
        quant_pre_process(str(raw), str(prepped), skip_symbolic_shape=True)  # BN fold + shapes
        opts = dict(SCHEMES[scheme])
        extra = {**opts.pop("extra_options"), "CalibMovingAverage": method == "minmax"}
        reader = FloatBatchReader(images, bundle, equal_batches=method != "minmax")
        quantize_static(str(prepped), str(qdq), reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, calibrate_method=METHODS[method], extra_options=extra, **opts)
        return build_bundle_member_graph(bundle, member, qdq, out_name, precision=f"int8-{scheme}",
                                         calibration=method)

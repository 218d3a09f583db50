"""Export targets, one table read by the CLI help, the builder and the benchmarks (ultralytics-style)."""
from __future__ import annotations

from dataclasses import dataclass

# INT8 quantisers: name -> the extra that provides it ("core": always installed)
QUANTIZERS: dict[str, str] = {"ort": "core", "modelopt": "modelopt"}


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str  # which runner executes it
    precision: str
    device: str
    needs: str  # the extra to install
    description: str
    quantizers: tuple[str, ...] = ()  # INT8 targets: who may make its Q/DQ graph; the first is the default
    calibration: str | None = None  # INT8 targets: the Q/DQ graph's artifact key, also its calibration record
    writes_out: bool = False  # writes into `build --out` (the bundle is read, not changed)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("onnx", "onnxruntime", "fp32", "cpu/cuda", "core", "FP32 ONNX, uint8 NHWC input, softmax output"),
    Target("ort-int8", "onnxruntime", "int8", "cpu", "core",
           "U8S8 QDQ ONNX calibrated on real cells (VNNI CPUs)", ("ort",), "ort-int8"),
    Target("trt-fp16", "tensorrt", "fp16", "cuda", "tensorrt", "TensorRT engine, strongly typed FP16"),
    Target("trt-int8", "tensorrt", "int8", "cuda", "tensorrt",
           "TensorRT engine from S8S8 Q/DQ ONNX (--quantizer ort|modelopt)", ("ort", "modelopt"), "trt-int8-onnx"),
    Target("triton", "triton", "fp32", "cpu/cuda", "core",
           "Triton model repository in --out: the ensemble with its TTA views as one onnxruntime_onnx "
           "model (or python backend), a tensorrt_plan per built engine", writes_out=True),
)}


def quantizer_for(target: str, quantizer: str | None) -> str:
    """The quantiser to use for `target` (its default when None); a clear error where it has none."""
    allowed = TARGETS[target].quantizers
    if quantizer is None and allowed:
        return allowed[0]
    if quantizer not in allowed:
        raise ValueError(f"target {target!r} takes quantizer(s) {', '.join(allowed) or 'none'}, "
                         f"not {quantizer!r}")
    return quantizer


def targets_help() -> str:
    return "\n".join(f"{t.name:9s} {t.runtime:12s} {t.precision:5s} {t.device:9s} {t.description}"
                     for t in TARGETS.values())

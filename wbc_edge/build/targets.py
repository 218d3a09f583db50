"""Export targets, one table read by the CLI help, the builder and the benchmarks (ultralytics-style)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str  # which runner executes it
    precision: str
    device: str
    needs: str  # the extra to install
    description: str


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("onnx", "onnxruntime", "fp32", "cpu/cuda", "core", "FP32 ONNX, uint8 NHWC input, softmax output"),
    Target("ort-int8", "onnxruntime", "int8", "cpu", "core", "U8S8 QDQ ONNX calibrated on real cells (VNNI CPUs)"),
    Target("trt-fp16", "tensorrt", "fp16", "cuda", "tensorrt", "TensorRT engine, strongly typed FP16"),
    Target("trt-int8", "tensorrt", "int8", "cuda", "tensorrt", "TensorRT engine from S8S8 Q/DQ ONNX"),
)}


def targets_help() -> str:
    return "\n".join(f"{t.name:9s} {t.runtime:12s} {t.precision:5s} {t.device:9s} {t.description}"
                     for t in TARGETS.values())

"""`wbc-edge build`: turn a bundle's members into the artifacts of a target (no torch needed)."""
from __future__ import annotations

import logging
import tempfile

from ..bundle import Bundle
from .surgery import build_bundle_member_graph, raw_graph_path
from .targets import TARGETS, quantizer_for

log = logging.getLogger("wbc_edge.build")


def build_onnx(bundle: Bundle, fuse: bool = False) -> Bundle:
    """Re-run graph surgery from each member's raw export (uint8 in, softmax out, metadata); with
    `fuse`, also one graph for the whole ensemble."""
    bundle.validate()  # member names become file names: none may point outside the bundle
    for m in bundle.members:
        with tempfile.TemporaryDirectory() as tmp:
            raw = raw_graph_path(bundle, m, tmp)
            m.onnx = f"{m.name}.onnx"
            build_bundle_member_graph(bundle, m, raw, m.onnx, arch=m.arch, ensemble_weight=m.weight)
    if fuse:
        from .fuse import fuse_bundle

        fuse_bundle(bundle)
    return bundle


def _quantizer(name: str, method: str):
    """The `quantize_member` of quantiser `name`, resolved before any calibration work: a missing extra
    or a method the quantiser lacks fails at once, with the fix named."""
    if name == "modelopt":
        from ..calibration import modelopt

        modelopt.modelopt_method(method)
        modelopt.require_modelopt()
        return modelopt.quantize_member
    from ..calibration.quantize import quantize_member

    return quantize_member


def calibrate_int8(bundle: Bundle, key: str, scheme: str, calib=None, val=None, calib_method: str = "minmax",
                   n_calib: int = 256, max_f1_drop: float = 0.01, quantizer: str = "ort") -> Bundle:
    """Calibrate Q/DQ graphs on real cells, check them against FP32 on ORT CPU, register them as `key`."""
    from ..calibration.check import compare_to_fp32, enforce
    from ..calibration.reader import calibration_images

    bundle.validate()  # member names become file names: none may point outside the bundle
    quantize_member = _quantizer(quantizer, calib_method)
    if calib is None:
        raise ValueError(f"{key} needs --calib DIR: real cells to calibrate on")
    images = calibration_images(bundle, calib, n_calib)
    tag = scheme if quantizer == "ort" else quantizer
    # a fused graph of the previous `key` graphs is stale now (`build --target onnx --fuse` remakes it)
    stale = bundle.extra.get("fused", {}).get("artifacts", {}).pop(key, None)
    if stale:
        bundle.path(stale).unlink(missing_ok=True)
    for m in bundle.members:
        m.artifacts[key] = f"{m.name}.int8-{tag}.onnx"
        quantize_member(bundle, m, images, m.artifacts[key], calib_method, scheme)
    result = compare_to_fp32(bundle, val or calib, key)
    result.update({"calib_data": str(calib), "val_data": str(val or calib), "n_calib": int(len(images)),
                   "method": calib_method, "scheme": scheme, "quantizer": quantizer})
    bundle.extra.setdefault("calibration", {})[key] = result
    try:
        enforce(result, max_f1_drop, str(bundle.root))
    except ValueError:
        for m in bundle.members:
            bundle.path(m.artifacts.pop(key)).unlink(missing_ok=True)
        bundle.save()  # the failed check stays on record in the manifest
        raise
    return bundle


def build_ort_int8(bundle: Bundle, quantizer: str | None = None, **calib_options) -> Bundle:
    """U8S8 Q/DQ for ONNX Runtime on CPUs (fast with VNNI)."""
    return calibrate_int8(bundle, TARGETS["ort-int8"].calibration, "u8s8",
                          quantizer=quantizer_for("ort-int8", quantizer), **calib_options)


def build_trt_int8(bundle: Bundle, quantizer: str | None = None, **calib_options) -> Bundle:
    """Symmetric S8S8 Q/DQ (what TensorRT accepts; ORT's quantiser or ModelOpt's), checked on ORT CPU, then
    the engine on this GPU."""
    from .tensorrt import build_trt_int8 as engines

    key = TARGETS["trt-int8"].calibration
    bundle = calibrate_int8(bundle, key, "s8s8", quantizer=quantizer_for("trt-int8", quantizer), **calib_options)
    bundle.save()  # the calibrated graph is kept even where no GPU can build the engine
    return engines(bundle, qdq_artifact=key)


def build_trt_fp16(bundle: Bundle) -> Bundle:
    from .tensorrt import build_trt_fp16 as engines

    return engines(bundle)


def build_triton(bundle: Bundle, out=None, **options) -> Bundle:
    """A Triton model repository in `out` from the bundle (which is not changed)."""
    from .triton import write_repository

    if out is None:
        raise ValueError("target triton needs --out REPO: the model repository to write")
    write_repository(bundle, out, **options)
    return bundle


BUILDERS = {"onnx": build_onnx, "ort-int8": build_ort_int8, "trt-fp16": build_trt_fp16, "trt-int8": build_trt_int8,
            "triton": build_triton}


def check(bundle: Bundle, data, n: int = 64) -> list[dict]:
    """Parity on real cells: PyTorch vs ORT FP32 per member (if torch is installed), fused vs members."""
    from .._optional import available
    from ..calibration.reader import calibration_images
    from .parity import fused_vs_members, torch_vs_ort

    images = calibration_images(bundle, data, n)
    results = torch_vs_ort(bundle, images) if available("torch") else []
    if "fused" in bundle.extra:
        results.append(fused_vs_members(bundle, images))
    bundle.extra["parity"] = results
    return results


def build(bundle_dir, target: str, **options) -> Bundle:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    bundle = Bundle.load(bundle_dir)
    check_data = options.pop("check", None)
    if TARGETS[target].writes_out:  # the bundle stays as signed: a repository is checked against its digest
        BUILDERS[target](bundle, **options)
        log.info("built %s from %s", target, bundle.root)
        return bundle
    bundle = BUILDERS[target](bundle, **options)
    if check_data:
        failed = [r for r in check(bundle, check_data) if not r["ok"]]
        bundle.save()
        if failed:
            raise ValueError(f"{bundle.root}: parity check failed: {failed}")
    bundle.save()
    log.info("built %s for %s", target, bundle.root)
    return bundle

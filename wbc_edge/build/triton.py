"""`wbc-edge build BUNDLE --target triton --out REPO`: a Triton Inference Server model repository.

    REPO/wbc_edge/config.pbtxt          onnxruntime_onnx (or python: ONNX Runtime inside the Python
    REPO/wbc_edge/1/model.onnx          backend), the whole classifier as one graph: uint8 NHWC cells
                                        in, probabilities out, members and TTA views inside
    REPO/wbc_edge/manifest.json         the bundle's manifest, as signed
    REPO/wbc_edge/checksums.json        the model checksum the client checks, what it covers, file sha256s
    REPO/wbc_edge_<member>_trt_<prec>/  per TensorRT engine the bundle holds: a tensorrt_plan variant
                                        (that member alone, no TTA; tied to the GPU it was built on)

config.pbtxt is written from the graph's own input/output names and dims; its `parameters` carry the
model checksum (`edge.triton_runner.model_sha256`) that a client's `--server` run compares with its
bundle's before sending a cell. The test suite parses every config with Triton's model-config protobuf.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx

from ..bundle import Bundle, sha256
from ..edge.triton_runner import (
    MODEL,
    PARAM_BUNDLE,
    PARAM_CLASSES,
    PARAM_INPUT_SIZE,
    PARAM_SHA,
    PARAM_VIEWS,
    bundle_digest,
    model_identity,
    model_sha256,
)
from .fuse import fuse_graphs
from .surgery import set_metadata

BACKENDS = ("onnxruntime", "python")
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
DTYPES = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32",
          onnx.TensorProto.FLOAT16: "TYPE_FP16"}
PYTHON_MODEL = Path(__file__).with_name("triton_model.py")  # the Python backend's model.py


def ensemble_graph(bundle: Bundle, views: list[str]) -> onnx.ModelProto:
    """The whole classifier as one graph (`fuse.fuse_graphs`: the views, every member, both means inside);
    built in memory, the bundle is not changed (its digest is what the server's model is checked by)."""
    models = [onnx.load(str(bundle.path(m.onnx))) for m in bundle.members]
    weights = [m.weight for m in bundle.members]
    meta = {"classes": bundle.classes, "preprocess": bundle.preprocess.to_dict(),
            "members": [m.name for m in bundle.members], "ensemble_weights": weights, "views": views}
    return set_metadata(fuse_graphs(models, weights, views), meta)


# ---- config.pbtxt -------------------------------------------------------------------------------------
def _pbtxt_value(value, indent: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value if value.startswith(("TYPE_", "KIND_")) else json.dumps(value)
    inner = _pbtxt(value, indent + "  ")
    return "{\n" + inner + indent + "}"


def _pbtxt(fields: dict, indent: str = "") -> str:
    """Protobuf text format for a nested dict (lists: repeated fields). Written by hand, a dozen lines,
    so that building a repository needs no tritonclient; the tests parse the result with Triton's own
    `model_config_pb2`, which catches any field or type this gets wrong."""
    lines = []
    for key, value in fields.items():
        for item in value if isinstance(value, list) and (not value or not isinstance(value[0], int)) else [value]:
            if isinstance(item, list):  # repeated scalars: dims, preferred batch sizes
                lines.append(f"{indent}{key}: [{', '.join(str(v) for v in item)}]\n")
            elif isinstance(item, dict):
                lines.append(f"{indent}{key} {_pbtxt_value(item, indent)}\n")
            else:
                lines.append(f"{indent}{key}: {_pbtxt_value(item, indent)}\n")
    return "".join(lines)


def _io(value_info: onnx.ValueInfoProto) -> dict:
    """A graph input/output as a config tensor: name, type and dims without the batch axis."""
    t = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim][1:]
    if t.elem_type not in DTYPES:
        raise ValueError(f"graph tensor {value_info.name!r} has ONNX type {t.elem_type}, which Triton's config "
                         "here does not map")
    return {"name": value_info.name, "data_type": DTYPES[t.elem_type], "dims": dims}


def model_config(name: str, graph: onnx.ModelProto, backend: str, kind: str, max_batch: int,
                 queue_delay_us: int, instances: int, params: dict) -> dict:
    if backend not in BACKENDS:
        raise ValueError(f"Triton backend must be one of {BACKENDS}, got {backend!r}")
    if kind not in KINDS:
        raise ValueError(f"instance kind must be one of {list(KINDS)}, got {kind!r}")
    if max_batch < 1 or instances < 1 or queue_delay_us < 0:
        raise ValueError(f"max batch {max_batch} and instances {instances} must be >= 1, queue delay >= 0")
    engine = {"platform": "onnxruntime_onnx"} if backend == "onnxruntime" else {"backend": "python"}
    preferred = sorted({max(1, max_batch // 4), max(1, max_batch // 2), max_batch})
    group = {"count": instances, "kind": KINDS[kind], **({"gpus": [0]} if kind == "gpu" else {})}
    return {"name": name, **engine, "max_batch_size": max_batch,
            "input": [_io(graph.graph.input[0])], "output": [_io(graph.graph.output[0])],
            "dynamic_batching": {"preferred_batch_size": preferred, "max_queue_delay_microseconds": queue_delay_us},
            "instance_group": [group],
            "parameters": [{"key": k, "value": {"string_value": str(v)}} for k, v in params.items()]}


# ---- the repository -----------------------------------------------------------------------------------
def write_repository(bundle: Bundle, out, views=None, backend: str = "onnxruntime", kind: str = "cpu",
                     max_batch: int = 64, queue_delay_us: int = 2000, instances: int = 1,
                     name: str = MODEL) -> Path:
    """Write (or replace) model `name` in the repository `out`, plus a variant per TensorRT engine."""
    views = list(views or bundle.views)
    identity = model_identity(bundle, views)
    graph = ensemble_graph(bundle, views)
    model_dir = Path(out) / name
    if model_dir.exists():
        shutil.rmtree(model_dir)  # a repository entry is rewritten whole: no stale version or engine
    (model_dir / "1").mkdir(parents=True)
    onnx.save(graph, str(model_dir / "1" / "model.onnx"))
    if backend == "python":
        shutil.copyfile(PYTHON_MODEL, model_dir / "1" / "model.py")
    params = _params(bundle, identity)
    config = model_config(name, graph, backend, kind, max_batch, queue_delay_us, instances, params)
    (model_dir / "config.pbtxt").write_text(_pbtxt(config))
    _write_provenance(bundle, model_dir, identity)
    for member in bundle.members:
        for precision in ("fp16", "int8"):
            if f"trt-{precision}" in member.artifacts:
                _write_engine_variant(bundle, member, precision, Path(out), queue_delay_us, instances)
    return Path(out)


def _params(bundle: Bundle, identity: dict) -> dict:
    return {PARAM_SHA: model_sha256(identity), PARAM_BUNDLE: bundle_digest(bundle) or "",
            PARAM_CLASSES: json.dumps(identity["classes"]), PARAM_VIEWS: json.dumps(identity["views"]),
            PARAM_INPUT_SIZE: identity["input_size"]}


def _write_provenance(bundle: Bundle, model_dir: Path, identity: dict) -> None:
    """The bundle's manifest and the checksums a client (or an auditor) compares, beside the model."""
    shutil.copyfile(bundle.manifest_path, model_dir / "manifest.json")
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name != "checksums.json")
    record = {"model_sha256": model_sha256(identity), "covers": identity, "bundle": str(bundle.root),
              "bundle_digest": bundle_digest(bundle),
              "files": {str(p.relative_to(model_dir)): sha256(p) for p in files}}
    (model_dir / "checksums.json").write_text(json.dumps(record, indent=2) + "\n")


def _write_engine_variant(bundle: Bundle, member, precision: str, out: Path, queue_delay_us: int,
                          instances: int) -> Path:
    """A member's TensorRT engine as a `tensorrt_plan` model: that member alone (weight 1), no TTA views,
    batch limit from the engine's optimisation profile. Engines only load on the TensorRT version and GPU
    they were built for (the sidecar's key says which)."""
    from .tensorrt import read_sidecar

    engine = bundle.path(member.artifacts[f"trt-{precision}"])
    meta = read_sidecar(engine)
    name = f"{MODEL}_{member.name}_trt_{precision}"
    model_dir = out / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    shutil.copyfile(engine, model_dir / "1" / "model.plan")
    graph = onnx.load(str(bundle.path(member.onnx)), load_external_data=False)
    identity = {**model_identity(bundle, ["id"]), "members": [{"name": member.name,
                                                               "onnx_sha256": sha256(bundle.path(member.onnx)),
                                                               "weight": 1.0}]}
    max_batch = int(meta["parts"]["profile"][graph.graph.input[0].name][2][0])
    params = {**_params(bundle, identity), "wbc_edge_engine_key": meta["key"],
              "wbc_edge_engine_built_for": f"TensorRT {meta['parts']['trt_version']}, {meta['parts']['gpu_name']}"}
    config = model_config(name, graph, "onnxruntime", "gpu", max_batch, queue_delay_us, instances, params)
    config.pop("platform")
    config = {"name": name, "platform": "tensorrt_plan", **{k: v for k, v in config.items() if k != "name"}}
    (model_dir / "config.pbtxt").write_text(_pbtxt(config))
    _write_provenance(bundle, model_dir, identity)
    return model_dir

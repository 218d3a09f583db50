"""TensorRT engines for TensorRT 10.3+ (JetPack 6) and 11.x, written to today's API.

Precision is carried by the ONNX graph, not by builder flags: FP16 casts (`convert_fp16`) or Q/DQ
nodes (INT8), built as a strongly typed network. TensorRT 11 removed `BuilderFlag.FP16/INT8` and
builds FP32 when FP16 is asked the old way, so every build is checked afterwards with the engine
inspector. Engines are tied to the TensorRT version and the GPU: they live in a cache whose file
names carry a key over (TensorRT version, GPU name, compute capability, precision, profile, ONNX
sha256), with a JSON sidecar that is checked before TensorRT ever deserialises the file.

Everything that needs `tensorrt`/`cupy` imports it inside the function (extra: `tensorrt`), so this
module, the cache key, the sidecar checks and the FP16 conversion work on any machine.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .._optional import MissingExtraError, require
from ..bundle import sha256
from .surgery import INPUT, OUTPUT
from .trt_lint import check_trt_compatible

log = logging.getLogger("wbc_edge.build.tensorrt")

PRECISIONS = ("fp32", "fp16", "int8")
SIDECAR_FORMAT = "wbc-edge-trt-engine"
KEY_SCHEMA = 1  # bump when the key's parts or the engine build recipe change incompatibly
FP16_MAX = float(np.finfo(np.float16).max)


class EngineError(RuntimeError):
    """An engine that cannot be built or used; the message names the file and the fix."""


class EngineMismatchError(EngineError):
    """The engine was built for another TensorRT, GPU, precision, profile or ONNX graph."""


class EngineCorruptError(EngineError):
    """The engine file or its sidecar is missing, truncated or modified."""


class EnginePrecisionError(EngineError):
    """The built engine does not run in the precision (or I/O dtypes) that was asked."""


# ---- FP16 graph (no TensorRT needed) -----------------------------------------------------------------
# Why hand-written: onnxconverter-common is not a dependency, and ORT's `transformers.float16` is an
# internal helper of its transformer optimiser. A strongly typed build needs exact control: which
# tensors stay FP32, `probs` kept float32 under its own name, every tensor's type fixed by the graph.
# One pass over initializers plus Cast insertion at the FP32/FP16 borders does that.
KEEP_FP32 = ("Softmax",)  # probabilities are averaged over views/members: normalise them in FP32
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})  # where the FP16 network starts
FP32_SLOTS = {"Resize": (1, 2), "Upsample": (1,)}  # roi/scales inputs are float32 by the ONNX schema


def _to_fp16(array: np.ndarray, name: str) -> np.ndarray:
    if np.any(np.abs(array[np.isfinite(array)]) > FP16_MAX):
        log.warning("%s: values beyond FP16 range clipped to +-%g", name, FP16_MAX)
    return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)


def _cast(src: str, dst: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [src], [dst], name=f"{dst}_cast", to=to)


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Constant nodes holding a tensor become initializers, so one pass converts both."""
    keep = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None:
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value), node.output[0]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _refuse_unsupported(graph: onnx.GraphProto) -> None:
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            raise ValueError(f"node {node.name!r}: convert_fp16 takes an FP32 graph, not a Q/DQ (INT8) one")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"node {node.name!r} ({node.op_type}) has subgraphs; only flat graphs convert")


def _fp32_nodes(graph: onnx.GraphProto, keep: tuple, stem: int) -> set[int]:
    """Indices of nodes that stay FP32: `keep` ops, the input preprocessing (everything between the
    graph input and the first weight op) and the first `stem` weight ops.

    Why: the normalisation's per-channel constants rounded to FP16 shift every pixel of a channel
    alike (a bias, not noise), and the stem conv's weights were the next largest error source. On a
    briefly trained mobilenetv3_small_050 member, FP16 everywhere moved probabilities by up to 0.020;
    FP32 preprocessing + stem brought that to 0.0076 (1e-2 allowed). The 3-channel stem is a small
    share of the FLOPs and a poor fit for tensor cores anyway."""
    inits = {i.name for i in graph.initializer}
    frontier = {i.name for i in graph.input}
    nodes = {k for k, n in enumerate(graph.node) if n.op_type in keep}
    stems = 0
    for k, node in enumerate(graph.node):  # nodes are in topological order
        live = [n for n in node.input if n and n not in inits]
        if not live or not all(n in frontier for n in live):
            continue
        if node.op_type in WEIGHT_OPS:
            if stems >= stem:
                continue
            stems += 1
            nodes.add(k)  # the stem: its outputs start the FP16 network
            continue
        nodes.add(k)
        frontier |= set(node.output)
    return nodes


def _convert_initializers(graph: onnx.GraphProto, fp32_slots: set[tuple[int, int]]) -> None:
    """FLOAT initializers -> FLOAT16; one used both as FP32 and FP16 is duplicated for the FP16 users."""
    uses: dict[str, list[tuple[int, int]]] = {}
    for k, node in enumerate(graph.node):
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((k, i))
    for init in list(graph.initializer):
        users = uses.get(init.name, [])
        n_fp32 = sum(slot in fp32_slots for slot in users)
        if init.data_type != TensorProto.FLOAT or n_fp32 == len(users) > 0:
            continue
        half = numpy_helper.from_array(_to_fp16(numpy_helper.to_array(init), init.name), init.name)
        if not n_fp32:
            init.CopyFrom(half)
            continue
        half.name = f"{init.name}_fp16"
        graph.initializer.append(half)
        for k, i in users:
            if (k, i) not in fp32_slots:
                graph.node[k].input[i] = half.name


def _retype_attributes(node: onnx.NodeProto) -> None:
    """Cast(to=FLOAT) -> FLOAT16; float-valued ConstantOfShape fills -> FLOAT16."""
    for a in node.attribute:
        if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
            a.i = TensorProto.FLOAT16
        if node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == TensorProto.FLOAT:
            a.t.CopyFrom(numpy_helper.from_array(_to_fp16(numpy_helper.to_array(a.t), node.name), a.t.name))


class _Borders:
    """Cast insertion where FP16 and FP32 tensors meet; each cast is made once and reused."""

    def __init__(self, graph, fp32_nodes: set[int], float_values: set, fp32_outputs: set):
        self.float_values, self.fp32_outputs = float_values, fp32_outputs
        self.fp32_tensors = {o for k in fp32_nodes for o in graph.node[k].output}
        self.fp32_tensors |= {i.name for i in graph.input} & float_values  # graph I/O keeps its types
        self.nodes: list = []
        self.copies: dict[str, str] = {}  # tensor -> its cast copy in the other precision

    def _copy(self, name: str, to: int) -> str:
        if name not in self.copies:
            suffix = "_fp32" if to == TensorProto.FLOAT else "_fp16"
            self.nodes.append(_cast(name, name + suffix, to))
            self.copies[name] = name + suffix
        return self.copies[name]

    def fp32_node(self, node) -> None:
        for i, name in enumerate(node.input):
            if name in self.float_values and name not in self.fp32_tensors:  # FP16 activation in
                node.input[i] = self._copy(name, TensorProto.FLOAT)
        self.nodes.append(node)

    def fp16_node(self, node) -> None:
        # FP32 tensors (graph inputs, outputs of FP32 nodes) are read through an FP16 cast copy
        half = TensorProto.FLOAT16
        node.input[:] = [self._copy(n, half) if n in self.fp32_tensors else n for n in node.input]
        _retype_attributes(node)
        outs = [o for o in node.output if o in self.fp32_outputs]
        for out in outs:  # an FP16 producer of a float32 graph output writes a copy, cast back
            node.output[list(node.output).index(out)] = out + "_fp16"
        self.nodes.append(node)
        for out in outs:
            self.nodes.append(_cast(out + "_fp16", out, TensorProto.FLOAT))
            self.copies[out] = out + "_fp16"
            self.fp32_tensors.add(out)  # later FP16 readers take the _fp16 copy


def convert_fp16(onnx_in, onnx_out, keep_fp32: tuple = KEEP_FP32, fp32_stem: int = 1) -> Path:
    """FP32 deployable graph -> FP16 graph for a strongly typed TensorRT build (and ORT CUDA).

    Weights and activations become FP16 from the first weight op on; the input preprocessing and the
    `keep_fp32` ops run in FP32; float32 graph outputs (`probs`) stay float32 under their own names.
    """
    model = onnx.load(str(onnx_in))
    graph = model.graph
    _refuse_unsupported(graph)
    _constants_to_initializers(graph)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    float_values = {v.name for v in (*inferred.value_info, *inferred.output, *inferred.input)
                    if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    fp32 = _fp32_nodes(graph, keep_fp32, fp32_stem)
    slots = {(k, i) for k in fp32 for i in range(len(graph.node[k].input))}
    slots |= {(k, i) for k, n in enumerate(graph.node) for i in FP32_SLOTS.get(n.op_type, ())}
    _convert_initializers(graph, slots)
    borders = _Borders(graph, fp32, float_values, {o.name for o in graph.output} & float_values)
    for k, node in enumerate(graph.node):
        if k in fp32:
            borders.fp32_node(node)
        else:
            borders.fp16_node(node)
    del graph.node[:]
    graph.node.extend(borders.nodes)
    del graph.value_info[:]  # stale float32 annotations; shape inference below recomputes them
    _set_meta(model, "precision", "fp16")
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(onnx_out))
    return Path(onnx_out)


def _set_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    for entry in model.metadata_props:
        if entry.key == key:
            entry.value = value
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value


def graph_precision(model: onnx.ModelProto) -> str:
    """What precision the graph itself carries: 'int8' (Q/DQ), 'fp16' (FP16 weights) or 'fp32'."""
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "int8"
    types = Counter(i.data_type for i in model.graph.initializer)
    return "fp16" if types[TensorProto.FLOAT16] > types[TensorProto.FLOAT] else "fp32"


# ---- engine cache key (pure) -------------------------------------------------------------------------
def _profile(input_shape, batch) -> dict:
    """{input: [min, opt, max]} for a dynamic-batch NHWC input of shape [?, S, S, 3]."""
    lo, opt, hi = (int(b) for b in batch)
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {batch}")
    rest = [int(d) for d in input_shape[1:]]
    return {INPUT: [[lo, *rest], [opt, *rest], [hi, *rest]]}


def _cc(compute_capability) -> str:
    if isinstance(compute_capability, (tuple, list)):
        return f"{int(compute_capability[0])}.{int(compute_capability[1])}"
    if not re.fullmatch(r"\d+\.\d+", str(compute_capability)):
        raise ValueError(f"compute capability must be 'major.minor' or (major, minor), "
                         f"got {compute_capability!r}")
    return str(compute_capability)


def engine_key_parts(trt_version: str, gpu_name: str, compute_capability, precision: str, profile: dict,
                     onnx_sha256: str) -> dict:
    """The facts an engine is tied to, normalised (so equal facts give equal keys)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return {"schema": KEY_SCHEMA, "trt_version": str(trt_version),
            "gpu_name": " ".join(str(gpu_name).split()), "compute_capability": _cc(compute_capability),
            "precision": precision,
            "profile": {k: [[int(d) for d in s] for s in v] for k, v in sorted(profile.items())},
            "onnx_sha256": str(onnx_sha256).lower()}


def engine_cache_key(trt_version: str, gpu_name: str, compute_capability, precision: str, profile: dict,
                     onnx_sha256: str) -> str:
    """20 hex digits of sha256 over the normalised parts; any change in any part changes the key."""
    parts = engine_key_parts(trt_version, gpu_name, compute_capability, precision, profile, onnx_sha256)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def engine_file_name(onnx_path, precision: str, key: str) -> str:
    return f"{Path(onnx_path).stem}.{precision}.{key}.engine"


def sidecar_path(engine_path) -> Path:
    return Path(f"{engine_path}.json")


# ---- sidecar checks (no TensorRT needed) ---------------------------------------------------------------
def read_sidecar(engine_path) -> dict:
    """The JSON written beside an engine; EngineCorruptError if it is missing or not ours."""
    engine_path, side = Path(engine_path), sidecar_path(engine_path)
    if not engine_path.is_file():
        raise EngineCorruptError(f"{engine_path}: engine file not found "
                                 "(run `wbc-edge build --target trt-fp16`)")
    if not side.is_file():
        raise EngineCorruptError(f"{engine_path}: no sidecar {side.name}; the build did not finish, "
                                 "rebuild it")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineCorruptError(f"{side}: corrupt sidecar ({exc}); rebuild the engine") from exc
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT or "key" not in meta:
        raise EngineCorruptError(f"{side}: not a wbc-edge engine sidecar; rebuild the engine")
    return meta


def verify_engine_file(engine_path, expected_key: str) -> dict:
    """Check the sidecar's key and the engine's size and sha256 before TensorRT sees the bytes."""
    meta = read_sidecar(engine_path)
    if meta["key"] != expected_key:
        parts = meta.get("parts", {})
        raise EngineMismatchError(
            f"{engine_path}: built for TensorRT {parts.get('trt_version')} on {parts.get('gpu_name')} "
            f"(sm {parts.get('compute_capability')}), {parts.get('precision')}, key {meta['key']}; "
            f"expected key {expected_key}. Engines do not move between TensorRT versions or GPUs: rebuild")
    size = Path(engine_path).stat().st_size
    if size != meta.get("engine_bytes") or sha256(Path(engine_path)) != meta.get("engine_sha256"):
        raise EngineCorruptError(f"{engine_path}: {size} bytes that do not match the sidecar "
                                 f"({meta.get('engine_bytes')} bytes and a sha256): truncated or modified")
    return meta


# ---- engine inspector: layer precisions (pure) ---------------------------------------------------------
_MOVEMENT = {"reformat", "noop", "shuffle", "constant", "cast", "slice", "concatenation", "identity"}


def format_precision(fmt: str) -> str | None:
    """'Row major linear FP16 format' / 'Half' / 'Thirty-two wide ... Int8 format.' -> 'FP16' / 'INT8'."""
    f = fmt.lower()
    for needle, name in (("uint8", "UINT8"), ("int8", "INT8"), ("int32", "INT32"), ("int64", "INT64"),
                         ("fp8", "FP8"), ("bf16", "BF16"), ("fp16", "FP16"), ("half", "FP16"),
                         ("fp32", "FP32"), ("float", "FP32"), ("bool", "BOOL")):
        if needle in f:
            return name
    return None  # e.g. 'N/A due to dynamic shapes'


def _tensor_precision(tensor: dict) -> str | None:
    """10.x writes one "Format/Datatype" string per tensor; 11.x splits it into "DataType" and "Format"."""
    for key in ("DataType", "Format/Datatype", "Format/DataType", "Format"):
        precision = format_precision(str(tensor.get(key, "")))
        if precision:
            return precision
    return None


def layer_precisions(info_json: str) -> list[dict]:
    """Engine inspector JSON (ProfilingVerbosity.DETAILED) -> [{name, type, precisions}] per layer."""
    info = json.loads(info_json)
    layers = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # LAYER_NAMES_ONLY verbosity: names, no formats
            layers.append({"name": layer, "type": "?", "precisions": set()})
            continue
        tensors = [*layer.get("Inputs", []), *layer.get("Outputs", [])]
        precisions = {_tensor_precision(t) for t in tensors} - {None}
        layers.append({"name": layer.get("Name", "?"), "type": str(layer.get("LayerType", "?")),
                       "precisions": precisions})
    return layers


def _is_compute(layer: dict) -> bool:
    return layer["type"].lower() not in _MOVEMENT and "reformat" not in layer["name"].lower()


def _is_matmul_like(layer: dict) -> bool:
    kind = layer["type"].lower()
    return any(k in kind for k in ("conv", "gemm", "matrixmultiply", "matmul"))


def check_precision(layers: list[dict], precision: str) -> dict:
    """The engine must really run in `precision`: the majority of its convolution/GEMM layers (or of its
    compute layers where none are reported as such) touch that type. Returns a summary for the sidecar."""
    wanted = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}[precision]
    compute = [layer for layer in layers if _is_compute(layer)]
    pool = [layer for layer in compute if _is_matmul_like(layer)] or compute
    if not any(layer["precisions"] for layer in pool):
        raise EnginePrecisionError("the engine inspector reports no layer formats, so the precision cannot "
                                   "be verified (was the engine built with ProfilingVerbosity.DETAILED?)")
    hits = sum(wanted in layer["precisions"] for layer in pool)
    seen = Counter(p for layer in pool for p in layer["precisions"])
    summary = {"checked_layers": len(pool), f"{wanted}_layers": hits, "types_seen": dict(seen)}
    if hits * 2 < len(pool):
        raise EnginePrecisionError(
            f"asked for {precision} but only {hits} of {len(pool)} layers run in {wanted} "
            f"(seen: {dict(seen)}). "
            "TensorRT 11 builds FP32 when FP16 is requested through the removed builder flag: build from "
            "the FP16 (or Q/DQ) ONNX as a strongly typed network")
    return summary


# ---- TensorRT proper ---------------------------------------------------------------------------------
def import_tensorrt():
    """The real TensorRT module; the type stubs alone make `import tensorrt` an empty namespace."""
    trt = require("tensorrt", "tensorrt")
    if not hasattr(trt, "Builder"):
        raise MissingExtraError("only TensorRT type stubs are installed here (no runtime): install "
                                "'wbc-edge[tensorrt]' on a machine with an NVIDIA GPU")
    return trt


def device_info(device_id: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') from CuPy."""
    cp = require("cupy", "tensorrt")
    props = cp.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return name, f"{props['major']}.{props['minor']}"


def current_key(meta_parts: dict, device_id: int = 0) -> str:
    """The key the engine described by `meta_parts` would have if built here, now."""
    gpu, cc = device_info(device_id)
    return engine_cache_key(import_tensorrt().__version__, gpu, cc, meta_parts["precision"],
                            meta_parts["profile"], meta_parts["onnx_sha256"])


def _logger(trt):
    """A TensorRT logger that keeps errors so exceptions can quote them."""
    class _Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.WARNING:
                log.warning("TensorRT: %s", msg)
    return _Log()


def _parse(trt, network, logger, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        lines.append(f"  node {e.node()} {e.node_name()!r} ({e.node_operator()}): {e.desc()} [{e.code()}]")
    raise EngineError(f"{onnx_path}: TensorRT's ONNX parser rejected the graph:\n" + "\n".join(lines))


def _config(trt, builder, precision: str, strongly_typed: bool, profile: dict, workspace_mb: int):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer formats for the precision check
    if not strongly_typed and precision != "fp32":
        # The 10.x weakly typed path; the flags are gone in 11.x, and check_precision catches a silent FP32.
        flag = getattr(trt.BuilderFlag, precision.upper(), None)
        if flag is None:
            raise EngineError(f"this TensorRT ({trt.__version__}) has no BuilderFlag.{precision.upper()}: "
                              "build strongly typed from the FP16/Q-DQ ONNX")
        config.set_flag(flag)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    return config


def _load_timing_cache(config, path: Path | None):
    """Reuse tactic timings across builds (minutes saved on a Jetson); a stale cache is just ignored."""
    data = path.read_bytes() if path and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        log.warning("timing cache %s does not match this TensorRT/GPU; starting a fresh one", path)
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config, path: Path | None) -> None:
    if path:
        _atomic_write(path, bytes(memoryview(config.get_timing_cache().serialize())))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # readers never see half a file


def _network_flags(trt, strongly_typed: bool) -> int:
    """10.x: ask for strong typing; 11.x networks are always strongly typed (no weak mode left to ask off)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None and not strongly_typed:
        raise EngineError(f"TensorRT {trt.__version__} has no weakly typed networks; build strongly typed")
    return 1 << int(flag) if strongly_typed and flag is not None else 0


def _serialize(trt, onnx_path: Path, precision: str, profile: dict, workspace_mb: int,
               timing_cache: Path | None, strongly_typed: bool) -> bytes:
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, strongly_typed))
    _parse(trt, network, logger, onnx_path)
    config = _config(trt, builder, precision, strongly_typed, profile, workspace_mb)
    _load_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT could not build the engine:\n  "
                          + "\n  ".join(logger.errors))
    _save_timing_cache(config, timing_cache)
    return bytes(memoryview(serialized))


def _check_io(trt, engine) -> dict:
    """uint8 `images` in, float32 `probs` out: what every runner feeds and expects."""
    io = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        io[name] = (engine.get_tensor_mode(name), engine.get_tensor_dtype(name))
    expected = {INPUT: (trt.TensorIOMode.INPUT, trt.DataType.UINT8),
                OUTPUT: (trt.TensorIOMode.OUTPUT, trt.DataType.FLOAT)}
    if io != expected:
        raise EnginePrecisionError(f"engine I/O is {io}; expected {expected} "
                                   "(uint8 images in, float32 probs out)")
    return {name: str(dtype) for name, (_, dtype) in io.items()}


def _inspect(trt, engine, profile: dict) -> list[dict]:
    """Layer formats at the profile's opt shape (with dynamic shapes they are 'N/A' otherwise)."""
    context = engine.create_execution_context()
    for name, (_, opt, _) in profile.items():
        context.set_input_shape(name, opt)
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    return layer_precisions(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def record_engine(path, data: bytes, parts: dict, key: str, **extra) -> Path:
    """Write the engine, then its sidecar (last: a sidecar marks a complete, verified build)."""
    path = Path(path)
    _atomic_write(path, data)
    meta = {"format": SIDECAR_FORMAT, "key": key, "parts": parts, "engine_bytes": len(data),
            "engine_sha256": hashlib.sha256(data).hexdigest(),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
    _atomic_write(sidecar_path(path), (json.dumps(meta, indent=2) + "\n").encode())
    return path


@dataclass
class LoadedEngine:
    engine: object
    runtime: object  # the runtime and its logger are kept alive as long as the engine
    meta: dict
    logger: object = None


def load_engine(path, expected_key: str) -> LoadedEngine:
    """Sidecar, key and checksum first (clear errors, no TensorRT needed), then deserialise."""
    meta = verify_engine_file(path, expected_key)
    trt = import_tensorrt()
    if meta["parts"]["trt_version"] != trt.__version__:
        raise EngineMismatchError(f"{path}: built with TensorRT {meta['parts']['trt_version']}, this is "
                                  f"{trt.__version__}: rebuild")
    logger = _logger(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise EngineCorruptError(f"{path}: TensorRT could not deserialise it: " + "; ".join(logger.errors))
    return LoadedEngine(engine, runtime, meta, logger)


def _onnx_input_shape(model: onnx.ModelProto) -> list:
    (inp,) = [i for i in model.graph.input if i.name == INPUT] or [None]
    if inp is None:
        raise ValueError(f"the graph has no '{INPUT}' input; build from the deployable ONNX (surgery.py)")
    return [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]


def _graph_for(onnx_path: Path, precision: str, work_dir: Path) -> Path:
    """The ONNX whose types say `precision`: FP16 is derived here; INT8 must arrive with Q/DQ nodes."""
    have = graph_precision(onnx.load(str(onnx_path), load_external_data=False))
    if have == precision:
        return onnx_path
    if precision == "fp16" and have == "fp32":
        return convert_fp16(onnx_path, work_dir / f"{onnx_path.stem}.fp16.onnx")
    raise EngineError(f"{onnx_path} carries {have}, cannot build {precision} from it"
                      + (" (INT8 needs the S8S8 Q/DQ graph from calibration)" if precision == "int8" else ""))


def _timing_cache_path(engine_dir: Path, timing_cache, trt_version: str, gpu: str) -> Path | None:
    if timing_cache is False:
        return None
    if timing_cache:
        return Path(timing_cache)
    return engine_dir / f"timing.{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}.trt{trt_version}.cache"


def build_engine(onnx_path, engine_dir, precision: str, batch=(1, 32, 256), workspace_mb: int = 1024,
                 timing_cache=None, strongly_typed: bool = True, device_id: int = 0,
                 force: bool = False) -> Path:
    """Build (or reuse from the cache) a TensorRT engine for this GPU; returns the engine's path.

    `timing_cache`: None = one per GPU/TensorRT in `engine_dir`, a path, or False to disable.
    """
    onnx_path, engine_dir = Path(onnx_path), Path(engine_dir)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = import_tensorrt()
    gpu, cc = device_info(device_id)
    profile = _profile(_onnx_input_shape(onnx.load(str(onnx_path), load_external_data=False)), batch)
    parts = engine_key_parts(trt.__version__, gpu, cc, precision, profile, sha256(onnx_path))
    key = engine_cache_key(**{k: v for k, v in parts.items() if k != "schema"})
    path = engine_dir / engine_file_name(onnx_path, precision, key)
    if path.exists() and not force:
        try:
            verify_engine_file(path, key)
            log.info("engine cache hit: %s", path)
            return path
        except EngineError as exc:
            log.warning("rebuilding %s: %s", path.name, exc)
    engine_dir.mkdir(parents=True, exist_ok=True)
    cache = _timing_cache_path(engine_dir, timing_cache, trt.__version__, gpu)
    return _build_and_record(trt, onnx_path, path, parts, key, workspace_mb, cache, strongly_typed)


def _build_and_record(trt, onnx_path: Path, path: Path, parts: dict, key: str, workspace_mb: int,
                      timing_cache: Path | None, strongly_typed: bool) -> Path:
    precision, profile = parts["precision"], parts["profile"]
    graph = _graph_for(onnx_path, precision, path.parent)
    warnings = check_trt_compatible(graph, trt.__version__)
    t0 = time.perf_counter()
    data = _serialize(trt, graph, precision, profile, workspace_mb, timing_cache, strongly_typed)
    logger = _logger(trt)
    runtime = trt.Runtime(logger)  # must outlive the engine it deserialises
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise EngineError(f"{path.name}: the freshly built engine does not deserialise: "
                          + "; ".join(logger.errors))
    io = _check_io(trt, engine)
    summary = check_precision(_inspect(trt, engine, profile), precision)
    model = onnx.load(str(onnx_path), load_external_data=False)
    record_engine(path, data, parts, key, onnx=onnx_path.name, graph=graph.name, io=io,
                  precision_check=summary, strongly_typed=strongly_typed, workspace_mb=workspace_mb,
                  lint_warnings=[w.reason for w in warnings],
                  build_seconds=round(time.perf_counter() - t0, 1),
                  metadata={p.key: p.value for p in model.metadata_props})  # classes, preprocess, member
    log.info("built %s (%s, %.1f s)", path, precision, time.perf_counter() - t0)
    return path


# ---- bundle builders (the lead wires these into builder.BUILDERS) ----------------------------------------
def _build_bundle(bundle, precision: str, source_key: str | None, **options):
    for m in bundle.members:
        source = m.artifacts.get(source_key) if source_key else m.onnx
        if not source:
            raise ValueError(f"{bundle.root}: member {m.name!r} has no {source_key or 'onnx'} graph to build "
                             f"{precision} from" + (" (run `wbc-edge build --target ort-int8`/calibration "
                                                    "first)" if precision == "int8" else ""))
        path = build_engine(bundle.path(source), bundle.path("engines"), precision, **options)
        m.artifacts[f"trt-{precision}"] = str(path.relative_to(bundle.root))
    return bundle


def build_trt_fp16(bundle, **options):
    """Every member's deployable ONNX -> FP16 graph -> strongly typed FP16 engine for this GPU."""
    return _build_bundle(bundle, "fp16", None, **options)


def build_trt_int8(bundle, qdq_artifact: str = "trt-int8-onnx", **options):
    """Every member's S8S8 Q/DQ ONNX (artifact `qdq_artifact`) -> strongly typed INT8 engine."""
    return _build_bundle(bundle, "int8", qdq_artifact, **options)

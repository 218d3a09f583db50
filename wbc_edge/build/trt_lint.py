"""TensorRT-compatibility lint for ONNX graphs: fail at `wbc-edge build` time, on any machine, with the
node named, instead of deep inside the ONNX parser on the Jetson.

The operator table below restates facts (not text) from onnx-tensorrt's `docs/operators.md` as shipped
with TensorRT 10.15 ("opset 9 to opset 24"), plus the parser changelog (`docs/Changelog.md`, 10.0 ..
10.15) for what arrived after TensorRT 10.3, the oldest release we deploy to (JetPack 6). The 10.0
operators.md states "opset 9 to opset 20"; no release between 10.0 and 10.15 was checked for its own
opset ceiling, so those are held to 20. TensorRT 11.x is assumed to accept the 10.15 list (not
verified: no 11.x operators.md was available).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

MIN_TRT = (10, 3)  # JetPack 6; the default target, so a graph that lints clean deploys everywhere we ship
MIN_OPSET = 9


class LintIssue(NamedTuple):
    node_name: str
    op_type: str
    reason: str
    severity: str = "error"  # "warning": builds, but not as written (e.g. DOUBLE cast down to FLOAT)


class TrtCompatibilityError(ValueError):
    """An ONNX graph that TensorRT's ONNX parser will reject; the message names each offending node."""


# ---- the operator table (data) -----------------------------------------------------------------------
# op -> (types TensorRT accepts for the op's data input, TensorRT (major, minor) the op arrived in).
# Type names are the doc's: FP32 FP16 BF16 FP8 FP4 INT4 INT8 INT32 INT64 UINT8 BOOL.
_F = "FP32 FP16 BF16"
_N = _F + " INT32 INT64"
_A = _N + " BOOL"
_C = "FP32 FP16 BF16 FP8 FP4 INT4 INT32 INT64 BOOL"  # Constant / ConstantOfShape
_W = "FP32 FP16"
_V0 = (10, 0)
SUPPORTED: dict[str, tuple[str, tuple[int, int]]] = {
    "Abs": (_N, _V0), "Acos": (_F, _V0), "Acosh": (_F, _V0), "Add": (_N, _V0), "And": ("BOOL", _V0),
    "ArgMax": (_N, _V0), "ArgMin": (_N, _V0), "Asin": (_F, _V0), "Asinh": (_F, _V0), "Atan": (_F, _V0),
    "Atanh": (_F, _V0), "Attention": (_F + " INT8 FP8", (10, 14)), "AveragePool": (_F, _V0),
    "BatchNormalization": (_F, _V0), "BlackmanWindow": (_W, (10, 4)), "Cast": (_N + " UINT8 BOOL", _V0),
    "CastLike": (_N + " UINT8 BOOL", _V0), "Ceil": (_F, _V0), "Celu": (_F, _V0), "Clip": (_F, _V0),
    "Concat": (_A, _V0), "Constant": (_C, _V0), "ConstantOfShape": (_C, _V0), "Conv": (_F, _V0),
    "ConvTranspose": (_F, _V0), "Cos": (_F, _V0), "Cosh": (_F, _V0), "CumSum": (_F, _V0),
    "DeformConv": (_W, (10, 1)), "DepthToSpace": (_N, _V0), "DequantizeLinear": ("INT8 FP8 FP4 INT4", _V0),
    "Div": (_N, _V0), "Dropout": (_F, _V0), "Einsum": (_F, _V0), "Elu": (_F, _V0), "Equal": (_N, _V0),
    "Erf": (_F, _V0), "Exp": (_F, _V0), "Expand": (_A, _V0), "EyeLike": (_A, _V0), "Flatten": (_A, _V0),
    "Floor": (_F, _V0), "Gather": (_A, _V0), "GatherElements": (_A, _V0), "GatherND": (_A, _V0),
    "Gelu": (_F + " INT8 INT32 INT64", _V0), "Gemm": (_F, _V0), "GlobalAveragePool": (_F, _V0),
    "GlobalLpPool": (_F, _V0), "GlobalMaxPool": (_F, _V0), "Greater": (_N, _V0),
    "GreaterOrEqual": (_N, _V0), "GridSample": (_W, _V0), "GroupNormalization": (_F, _V0),
    "GRU": (_F, _V0), "HammingWindow": (_W, (10, 4)), "HannWindow": (_W, (10, 4)),
    "HardSigmoid": (_F, _V0), "HardSwish": (_F, _V0), "Hardmax": (_F, _V0), "Identity": (_A, _V0),
    "If": (_A, _V0), "ImageScaler": (_F, _V0), "InstanceNormalization": (_F, _V0), "IsInf": (_F, _V0),
    "IsNaN": (_N, _V0), "LayerNormalization": (_F, _V0), "LeakyRelu": (_F, _V0), "Less": (_N, _V0),
    "LessOrEqual": (_N, _V0), "Log": (_F, _V0), "LogSoftmax": (_F, _V0), "Loop": (_A, _V0),
    "LRN": (_F, _V0), "LSTM": (_F, _V0), "LpNormalization": (_F, _V0), "LpPool": (_F, _V0),
    "MatMul": (_F, _V0), "Max": (_N, _V0), "MaxPool": (_F, _V0), "Mean": (_F + " FP8 INT32 INT64", _V0),
    "MeanVarianceNormalization": (_F, _V0), "Min": (_N, _V0), "Mish": (_W, _V0), "Mod": (_N, _V0),
    "Mul": (_N, _V0), "Neg": (_N, _V0), "NonMaxSuppression": (_W, _V0), "NonZero": (_W, _V0),
    "Not": ("BOOL", _V0), "OneHot": (_A, _V0), "Or": ("BOOL", _V0), "Pad": (_N, _V0),
    "ParametricSoftplus": (_F, _V0), "Pow": (_N, _V0), "PRelu": (_F, _V0), "QuantizeLinear": (_F, _V0),
    "RandomNormal": (_F, _V0), "RandomNormalLike": (_F, _V0), "RandomUniform": (_F, _V0),
    "RandomUniformLike": (_F, _V0), "Range": (_N, _V0), "Reciprocal": (_F, _V0),
    **{f"Reduce{r}": (_N, _V0) for r in ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod",
                                          "Sum", "SumSquare")},
    "Relu": (_N, _V0), "Reshape": (_A, _V0), "Resize": (_F, _V0), "ReverseSequence": (_A, _V0),
    "RMSNormalization": (_F, (10, 15)), "RNN": (_F, _V0), "RoiAlign": (_W, _V0),
    "RotaryEmbedding": (_F, (10, 15)), "Round": (_F, _V0), "STFT": ("FP32", (10, 5)),
    "ScaledTanh": (_F, _V0), "Scan": (_F, _V0), "Scatter": (_N, _V0), "ScatterElements": (_N, _V0),
    "ScatterND": (_N, _V0), "Selu": (_F, _V0), "Shape": (_A, _V0), "Shrink": (_N, _V0),
    "Sigmoid": (_F, _V0), "Sign": (_N, _V0), "Sin": (_F, _V0), "Sinh": (_F, _V0), "Size": (_A, _V0),
    "Slice": (_A, _V0), "Softmax": (_F, _V0), "Softplus": (_F, _V0), "Softsign": (_F, _V0),
    "SpaceToDepth": (_N, _V0), "Split": (_A, _V0), "Sqrt": (_F, _V0), "Squeeze": (_A, _V0),
    "Sub": (_N, _V0), "Sum": (_N, _V0), "Tan": (_F, _V0), "Tanh": (_F, _V0),
    "TensorScatter": (_F + " INT32", (10, 15)), "ThresholdedRelu": (_F, _V0), "Tile": (_A, _V0),
    "TopK": (_N, _V0), "Transpose": (_A, _V0), "Trilu": (_A, _V0), "Unsqueeze": (_A, _V0),
    "Upsample": (_F, _V0), "Where": (_A, _V0), "Xor": ("BOOL", _V0),
}
# Listed with "N" in operators.md (TensorRT 10.15): the parser rejects these without a plugin.
NOT_SUPPORTED = frozenset("""
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress
    ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool
    MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement
    OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty
    SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence
    StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique""".split())
# (op, ONNX since_version of the schema the graph resolves to) -> first TensorRT that parses it (changelog).
OPSET_SINCE = {("GroupNormalization", 21): (10, 9), ("ScatterND", 18): (10, 9)}
# Which input carries the "data" type the table speaks of (default 0).
DATA_INPUT = {"Where": 1}
QUANTIZED_OUT = frozenset("INT8 FP8 FP4 INT4".split())

_DTYPES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
           TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
           TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL", TensorProto.INT4: "INT4",
           TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.FLOAT4E2M1: "FP4", TensorProto.DOUBLE: "DOUBLE"}


def max_opset(trt_version: tuple[int, int]) -> int:
    """Highest default-domain opset the parser is documented to accept (see the module docstring)."""
    return 24 if tuple(trt_version) >= (10, 15) else 20


def parse_trt_version(version) -> tuple[int, int]:
    """'10.13.0.35' / (10, 13) / None (the deployment minimum) -> (10, 13)."""
    if version is None:
        return MIN_TRT
    if isinstance(version, str):
        version = [int(p) for p in version.split(".")[:2]]
    return int(version[0]), int(version[1])


# ---- graph facts the checks need ---------------------------------------------------------------------
class _Facts:
    """Element types, constants and consumers of one (sub)graph, from ONNX shape inference."""

    def __init__(self, graph: onnx.GraphProto, outer: "_Facts | None" = None):
        self.types = dict(outer.types) if outer else {}
        self.consts = dict(outer.consts) if outer else {}
        for vi in (*graph.input, *graph.output, *graph.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self.types[vi.name] = vi.type.tensor_type.elem_type
        for init in graph.initializer:
            self.types[init.name] = init.data_type
            self.consts[init.name] = init
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.consts[node.output[0]] = value
                    self.types[node.output[0]] = value.data_type
        self.graph_io = {v.name for v in (*graph.input, *graph.output)}
        self.used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}

    def dtype(self, name: str) -> str | None:
        return _DTYPES.get(self.types.get(name), None) if name else None

    def const(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.consts[name]) if name in self.consts else None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _input(node, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


# ---- restrictions that matter (operators.md "Restrictions" column + changelog) --------------------------
def _pooling(node, facts, v):
    kernel = _attr(node, "kernel_shape", [])
    if len(kernel) not in (2, 3):
        yield f"{node.op_type} must be 2D or 3D pooling (kernel_shape={list(kernel)})"
    if any(d != 1 for d in _attr(node, "dilations", [])):
        yield f"{node.op_type} dilations must be empty or all ones"
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1] in facts.used:
        yield "MaxPool's Indices output is unsupported"


def _resize(node, facts, v):
    allowed = {"mode": ("nearest", {"nearest", "linear"}),
               "coordinate_transformation_mode": ("half_pixel", {"half_pixel", "pytorch_half_pixel",
                                                                 "tf_half_pixel_for_nn", "asymmetric",
                                                                 "align_corners"}),
               "nearest_mode": ("round_prefer_floor", {"floor", "ceil", "round_prefer_floor",
                                                       "round_prefer_ceil"}),
               "keep_aspect_ratio_policy": ("stretch", {"stretch"})}
    for name, (default, ok) in allowed.items():
        value = _text(_attr(node, name, default))
        if value not in ok:
            yield f"Resize {name}={value!r} is unsupported (TensorRT supports {', '.join(sorted(ok))})"
    if _attr(node, "antialias", 0):
        yield "Resize antialiasing is unsupported"


def _zero_point(node, facts, v):
    # Q/DQ must be symmetric: TensorRT's quantization has no zero points (so ORT's U8S8 QDQ graph is
    # not a TensorRT graph; trt-int8 needs S8S8 with zero points of 0).
    zp = _input(node, 2)
    if zp:
        values = facts.const(zp)
        if values is None:
            yield f"{node.op_type} zero point {zp!r} must be a constant"
        elif np.any(values.astype(np.float64) != 0):
            yield f"{node.op_type} zero point must be 0 (symmetric quantization); {zp!r} is not"
    if node.op_type == "QuantizeLinear":
        out = facts.dtype(node.output[0]) or ("UINT8" if not zp else facts.dtype(zp))
        if out and out not in QUANTIZED_OUT:
            yield f"QuantizeLinear must quantize to INT8/FP8/INT4/FP4, not {out} (UINT8 is I/O-only)"


def _must_be_const(index: int, what: str, before: tuple[int, int] | None = None):
    def check(node, facts, v):
        name = _input(node, index)
        if name and name not in facts.consts and (before is None or v < before):
            yield f"{node.op_type} {what} input {name!r} must be a build-time constant" + (
                f" before TensorRT {before[0]}.{before[1]}" if before else "")
    return check


def _topk(node, facts, v):
    if _attr(node, "sorted", 1) != 1:
        yield "TopK requires sorted=1"
    k = facts.const(_input(node, 1))
    if k is not None and int(np.max(k)) >= 3840:
        yield f"TopK K={int(np.max(k))} must be less than 3840"


def _dropout(node, facts, v):
    training = _input(node, 2)
    if training:
        value = facts.const(training)
        if value is None or bool(value):
            yield "Dropout is_training must be a constant False"


def _first_output_only(node, facts, v):
    if any(name in facts.used for name in node.output[1:]):
        yield f"{node.op_type}: only the first output is supported"


def _attr_is(name: str, ok, default):
    def check(node, facts, v):
        value = _text(_attr(node, name, default))
        if value != ok:
            yield f"{node.op_type} {name}={value!r} is unsupported (must be {ok!r})"
    return check


def _constant(node, facts, v):
    for name in ("sparse_value", "value_string", "value_strings"):
        if _attr(node, name) is not None:
            yield f"Constant attribute {name!r} is unsupported"


def _einsum(node, facts, v):
    # ellipsis, diagonal and broadcasting arrived in 10.12
    eq = _text(_attr(node, "equation", ""))
    terms = eq.split("->")[0].split(",")
    if v < (10, 12) and ("..." in eq or any(len(set(t.strip())) != len(t.strip()) for t in terms)):
        yield f"Einsum {eq!r}: ellipsis and diagonal terms need TensorRT 10.12+"


def _pow(node, facts, v):
    if v < (10, 12) and any(facts.dtype(n) in ("INT32", "INT64") for n in node.input[:2]):
        yield "Pow with integer base or exponent needs TensorRT 10.12+"


def _lstm(node, facts, v):
    if _attr(node, "input_forget", 0) != 0 or _attr(node, "layout", 0) != 0:
        yield "LSTM input_forget and layout must be 0"


_REDUCE = [f"Reduce{r}" for r in ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum",
                                   "SumSquare")]
RESTRICTIONS: dict[str, list[Callable]] = {
    **{op: [_pooling] for op in ("AveragePool", "MaxPool", "LpPool")},
    "Resize": [_resize], "QuantizeLinear": [_zero_point], "DequantizeLinear": [_zero_point],
    "TopK": [_topk], "Dropout": [_dropout], "LayerNormalization": [_first_output_only],
    "ScatterND": [_attr_is("reduction", "none", "none")], "LSTM": [_lstm], "Constant": [_constant],
    "Einsum": [_einsum], "Pow": [_pow], "OneHot": [_must_be_const(1, "depth")],
    **{op: [_must_be_const(1, "axes")] for op in _REDUCE},
    **{op: [_must_be_const(1, "axes", before=(10, 7))] for op in ("Squeeze", "Unsqueeze")},
    "Pad": [_must_be_const(3, "axes", before=(10, 4))], "CumSum": [_must_be_const(1, "axis", before=(10, 8))],
}


# ---- the lint -----------------------------------------------------------------------------------------
def _check_types(node, facts) -> list[LintIssue]:
    name = node.name or node.output[0]
    allowed = SUPPORTED[node.op_type][0].split()
    issues = []
    data = facts.dtype(_input(node, DATA_INPUT.get(node.op_type, 0)))
    checked = [data] + ([_DTYPES.get(_attr(node, "to"))] if node.op_type == "Cast" else [])
    for dtype in filter(None, checked):
        if dtype == "DOUBLE":  # documented: cast down to FLOAT, clamped to +-FLT_MAX
            issues.append(LintIssue(name, node.op_type, "DOUBLE is cast down to FLOAT by TensorRT",
                                    "warning"))
        elif dtype == "UINT8" and node.op_type not in ("Cast", "CastLike"):
            issues.append(LintIssue(name, node.op_type, "UINT8 is supported only as a network input/output "
                                                         "type: Cast it to a float type first"))
        elif dtype not in allowed:
            issues.append(LintIssue(name, node.op_type, f"TensorRT runs {node.op_type} on "
                                                         f"{', '.join(allowed)}, not {dtype}"))
    return issues


def _check_node(node, facts, opset: int, v) -> list[LintIssue]:
    name, op = node.name or (node.output[0] if node.output else "?"), node.op_type
    if node.domain not in ("", "ai.onnx"):
        return [LintIssue(name, op, f"custom-domain op {node.domain}::{op} needs a TensorRT plugin")]
    if op in NOT_SUPPORTED:
        return [LintIssue(name, op, f"{op} is listed as not supported by TensorRT's ONNX parser")]
    if op not in SUPPORTED:
        return [LintIssue(name, op, f"{op} is not in TensorRT's supported ONNX operator list")]
    since = SUPPORTED[op][1]
    if v < since:
        return [LintIssue(name, op, f"{op} needs TensorRT {since[0]}.{since[1]}+ (target {v[0]}.{v[1]})")]
    issues = []
    schema_since = onnx.defs.get_schema(op, opset).since_version
    needed = OPSET_SINCE.get((op, schema_since))
    if needed and v < needed:
        issues.append(LintIssue(name, op, f"{op}-{schema_since} (opset {opset}) needs TensorRT "
                                          f"{needed[0]}.{needed[1]}+"))
    issues += _check_types(node, facts)
    for check in RESTRICTIONS.get(op, ()):
        issues += [LintIssue(name, op, reason) for reason in check(node, facts, v)]
    return issues


def _lint(graph: onnx.GraphProto, facts: _Facts, opset: int, v) -> list[LintIssue]:
    issues = []
    for node in graph.node:
        issues += _check_node(node, facts, opset, v)
        for a in node.attribute:  # If/Loop/Scan bodies are parsed by the same rules
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                issues += _lint(sub, _Facts(sub, facts), opset, v)
    return issues


def _io_issues(graph: onnx.GraphProto) -> list[LintIssue]:
    issues = []
    for vi in (*graph.input, *graph.output):
        dtype = _DTYPES.get(vi.type.tensor_type.elem_type)
        if dtype not in (None, "FP32", "FP16", "BF16", "INT32", "INT64", "INT8", "UINT8", "BOOL", "DOUBLE"):
            issues.append(LintIssue(vi.name, "<graph io>", f"{dtype} is not a TensorRT network I/O type"))
    return issues


def lint_graph(model_or_path, trt_version=None) -> list[LintIssue]:
    """Every way `model` falls outside TensorRT's ONNX support (target release `trt_version`, default
    10.3 = JetPack 6). Empty list: the parser should accept it."""
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))
    v = parse_trt_version(trt_version)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    issues = []
    if opset is None or not MIN_OPSET <= opset <= max_opset(v):
        reason = (f"default-domain opset {opset} is outside [{MIN_OPSET}, {max_opset(v)}] "
                  f"for TensorRT {v[0]}.{v[1]}")
        issues.append(LintIssue("<model>", "<opset>", reason))
        opset = min(max(opset or MIN_OPSET, MIN_OPSET), onnx.defs.onnx_opset_version())
    inferred = onnx.shape_inference.infer_shapes(model)  # element types of intermediates
    return issues + _io_issues(inferred.graph) + _lint(inferred.graph, _Facts(inferred.graph), opset, v)


def format_issues(issues: list[LintIssue]) -> str:
    return "\n".join(f"  node {i.node_name!r} ({i.op_type}): {i.reason}" for i in issues)


def check_trt_compatible(path, trt_version=None) -> list[LintIssue]:
    """Raise TrtCompatibilityError naming every offending node; return the warnings otherwise."""
    issues = lint_graph(path, trt_version)
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        v = parse_trt_version(trt_version)
        name = "the model" if isinstance(path, onnx.ModelProto) else Path(path).name
        raise TrtCompatibilityError(f"{name} will not build with TensorRT {v[0]}.{v[1]}:\n"
                                    f"{format_issues(errors)}")
    return issues

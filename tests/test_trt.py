"""TensorRT path: compatibility lint, FP16 graph, engine cache key and sidecar checks (all on CPU), and the
engine build/run (skipped without TensorRT and a GPU). The `trt.*` API used is checked against the
`tensorrt-stubs` type stubs where those are installed."""
import ast
import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from wbc_edge.edge.preprocess import Preprocessor
from wbc_edge._optional import MissingExtraError
from wbc_edge.bundle import Bundle
from wbc_edge.build import tensorrt as trtb
from wbc_edge.build.trt_lint import TrtCompatibilityError, check_trt_compatible, lint_graph
from wbc_edge.data.datasets import from_image_folder

PKG = Path(trtb.__file__).resolve().parents[1]  # the wbc_edge package
KEY_ARGS = dict(trt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7", precision="fp16",
                profile={"images": [[1, 224, 224, 3], [32, 224, 224, 3], [256, 224, 224, 3]]},
                onnx_sha256="ab" * 32)


def _trt_usable() -> bool:
    try:
        trtb.import_tensorrt()
        trtb.device_info()
    except Exception:  # noqa: BLE001 - no TensorRT runtime, no CuPy, or no CUDA device
        return False
    return True


needs_trt = pytest.mark.skipif(not _trt_usable(), reason="TensorRT not installed / no GPU")


# ---- engine cache key ---------------------------------------------------------------------------------
def test_cache_key_is_stable_and_normalised():
    key = trtb.engine_cache_key(**KEY_ARGS)
    assert key == trtb.engine_cache_key(**KEY_ARGS) and len(key) == 20
    same = {**KEY_ARGS, "compute_capability": (8, 7), "gpu_name": " Orin ", "onnx_sha256": "AB" * 32}
    assert trtb.engine_cache_key(**same) == key


@pytest.mark.parametrize("part,value", [
    ("trt_version", "10.3.0.26"), ("trt_version", "11.0.0.1"), ("gpu_name", "NVIDIA H100 80GB HBM3"),
    ("compute_capability", "9.0"), ("precision", "int8"), ("onnx_sha256", "ac" * 32),
    ("profile", {"images": [[1, 224, 224, 3], [16, 224, 224, 3], [256, 224, 224, 3]]}),
    ("profile", {"images": [[1, 128, 128, 3], [32, 128, 128, 3], [256, 128, 128, 3]]}),
])
def test_cache_key_changes_with_each_part(part, value):
    assert trtb.engine_cache_key(**{**KEY_ARGS, part: value}) != trtb.engine_cache_key(**KEY_ARGS)


def test_cache_key_rejects_bad_parts():
    with pytest.raises(ValueError, match="precision"):
        trtb.engine_cache_key(**{**KEY_ARGS, "precision": "int4"})
    with pytest.raises(ValueError, match="compute capability"):
        trtb.engine_cache_key(**{**KEY_ARGS, "compute_capability": "87"})
    with pytest.raises(ValueError, match="min <= opt <= max"):
        trtb._profile([None, 224, 224, 3], (32, 1, 256))


# ---- sidecar / corrupt and mismatched engine files (checked before TensorRT is needed) -----------------
@pytest.fixture
def engine_file(tmp_path):
    parts = trtb.engine_key_parts(**KEY_ARGS)
    key = trtb.engine_cache_key(**KEY_ARGS)
    path = tmp_path / trtb.engine_file_name("m0.onnx", "fp16", key)
    trtb.record_engine(path, bytes(range(256)) * 64, parts, key, onnx="m0.onnx")
    return path, key


def test_engine_file_verifies(engine_file):
    path, key = engine_file
    meta = trtb.verify_engine_file(path, key)
    assert meta["parts"]["gpu_name"] == "Orin" and meta["engine_bytes"] == 256 * 64


def test_mismatched_engine_names_what_it_was_built_for(engine_file):
    path, _ = engine_file
    other = trtb.engine_cache_key(**{**KEY_ARGS, "gpu_name": "NVIDIA H100"})
    with pytest.raises(trtb.EngineMismatchError, match=r"TensorRT 10\.3\.0\.30 on Orin .*rebuild"):
        trtb.verify_engine_file(path, other)
    with pytest.raises(trtb.EngineMismatchError):  # before TensorRT is imported: works here without it
        trtb.load_engine(path, other)


def test_truncated_or_modified_engine_is_corrupt(engine_file):
    path, key = engine_file
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(trtb.EngineCorruptError, match="truncated or modified"):
        trtb.load_engine(path, key)
    path.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])  # same size, one bit flipped
    with pytest.raises(trtb.EngineCorruptError, match="truncated or modified"):
        trtb.verify_engine_file(path, key)


def test_missing_or_garbage_sidecar_is_corrupt(engine_file):
    path, key = engine_file
    side = trtb.sidecar_path(path)
    side.write_text("{not json")
    with pytest.raises(trtb.EngineCorruptError, match="corrupt sidecar"):
        trtb.load_engine(path, key)
    side.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(trtb.EngineCorruptError, match="not a wbc-edge engine sidecar"):
        trtb.load_engine(path, key)
    side.unlink()
    with pytest.raises(trtb.EngineCorruptError, match="no sidecar"):
        trtb.load_engine(path, key)
    with pytest.raises(trtb.EngineCorruptError, match="not found"):
        trtb.load_engine(path.with_name("absent.engine"), key)


@pytest.mark.skipif(_trt_usable(), reason="checks the message given where TensorRT is missing")
def test_valid_engine_without_tensorrt_names_the_extra(engine_file):
    path, key = engine_file
    with pytest.raises(MissingExtraError, match=r"wbc-edge\[tensorrt\]"):
        trtb.load_engine(path, key)


# ---- engine inspector JSON -> precision check -----------------------------------------------------------
def _inspector(*layers):
    return json.dumps({"Layers": [{"Name": n, "LayerType": t, "Inputs": [{"Format/Datatype": i}],
                                   "Outputs": [{"Format/Datatype": o}]} for n, t, i, o in layers],
                       "Bindings": ["images", "probs"]})


def test_format_strings_map_to_precisions():
    f = trtb.format_precision
    assert f("Row major linear FP16 format") == f("Half") == "FP16"
    assert f("Thirty-two wide channel vectorized row major Int8 format.") == "INT8"
    assert f("Row major linear FP32") == f("Float") == "FP32"
    assert f("Row major linear UInt8 format") == "UINT8" and f("N/A due to dynamic shapes") is None


def test_precision_check_accepts_fp16_and_int8_engines():
    fp16 = trtb.layer_precisions(_inspector(
        ("images cast", "Cast", "Row major linear UInt8 format", "Row major linear FP16 format"),
        ("conv1 + relu", "CaskConvolution", "Channel major FP16 format", "Channel major FP16 format"),
        ("fc", "CaskGemmConvolution", "Channel major FP16 format", "Row major linear FP16 format"),
        ("softmax", "SoftMax", "Row major linear FP32", "Row major linear FP32")))
    assert trtb.check_precision(fp16, "fp16")["FP16_layers"] == 2
    int8 = trtb.layer_precisions(_inspector(
        ("conv1", "CaskConvolution", "Thirty-two wide channel vectorized row major Int8 format.", "Half"),
        ("conv2", "CaskConvolution", "Thirty-two wide channel vectorized row major Int8 format.", "Float")))
    assert trtb.check_precision(int8, "int8")["INT8_layers"] == 2


def test_precision_check_reads_the_tensorrt_11_inspector_schema():
    # 11.x splits 10.x's "Format/Datatype" into "DataType" and "Format" (TensorRT 11 migration guide)
    half = {"DataType": "Half", "Format": "Channel major format (kHWC8)"}
    info = json.dumps({"Layers": [{"Name": f"conv{i}", "LayerType": "CaskConvolution", "Inputs": [half],
                                   "Outputs": [half]} for i in range(3)],
                       "I/O Tensors": [{"Name": "images", "IOMode": "Input", "DataType": "UInt8"}]})
    assert trtb.check_precision(trtb.layer_precisions(info), "fp16")["FP16_layers"] == 3


def test_precision_check_catches_a_silent_fp32_build():
    fp32 = trtb.layer_precisions(_inspector(
        ("conv1", "CaskConvolution", "Row major linear FP32", "Row major linear FP32"),
        ("fc", "CaskGemmConvolution", "Float", "Float")))
    with pytest.raises(trtb.EnginePrecisionError, match="only 0 of 2 layers run in FP16.*TensorRT 11"):
        trtb.check_precision(fp32, "fp16")
    unknown = trtb.layer_precisions(_inspector(("conv1", "CaskConvolution", "N/A due to dynamic shapes",
                                                "N/A due to dynamic shapes")))
    with pytest.raises(trtb.EnginePrecisionError, match="cannot be verified"):
        trtb.check_precision(unknown, "fp16")


# ---- TensorRT-compatibility lint -----------------------------------------------------------------------
def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_lint_passes_on_the_shipped_model(sample_bundle):
    b = Bundle.load(sample_bundle)
    for member in b.members:
        for version in (None, "10.3.0.30", "10.15.1", (11, 0)):
            assert lint_graph(b.path(member.onnx), version) == []
        assert check_trt_compatible(b.path(member.onnx)) == []


def test_lint_names_a_planted_unsupported_op():
    model = _model([helper.make_node("Relu", ["x"], ["r"], name="ok_relu"),
                    helper.make_node("Det", ["r"], ["y"], name="planted_det")],
                   [_vi("x", TensorProto.FLOAT, [2, 3, 3])], [_vi("y", TensorProto.FLOAT, [2])])
    issues = lint_graph(model)
    assert [(i.node_name, i.op_type) for i in issues] == [("planted_det", "Det")]
    with pytest.raises(TrtCompatibilityError, match=r"node 'planted_det' \(Det\).*not supported"):
        check_trt_compatible(model)


def test_lint_catches_planted_problems_in_the_real_graph(sample_bundle):
    b = Bundle.load(sample_bundle)
    model = onnx.load(str(b.path(b.members[0].onnx)))
    probs = model.graph.output[0]
    # an op the parser lacks, fed by the real graph: caught and named among ~100 good nodes
    model.graph.node.append(helper.make_node("Unique", [probs.name], ["uniq"], name="planted_unique"))
    model.graph.output.append(_vi("uniq", TensorProto.FLOAT, ["n"]))
    issues = lint_graph(model)
    assert [i.node_name for i in issues] == ["planted_unique"]


def test_lint_encodes_restrictions_that_matter_here():
    u8 = [_vi("images", TensorProto.UINT8, [1, 8, 8, 3])]
    # UINT8 is a network I/O type only: it must go through a Cast first
    transpose = helper.make_node("Transpose", ["images"], ["t"], name="u8_transpose", perm=[0, 3, 1, 2])
    direct = _model([transpose], u8, [_vi("t", TensorProto.UINT8, [1, 3, 8, 8])])
    assert [i.node_name for i in lint_graph(direct)] == ["u8_transpose"]
    # ORT's U8S8 QDQ (uint8 activations, non-zero zero point) is not a TensorRT graph; S8S8 with zp 0 is
    scale = numpy_helper.from_array(np.array(0.02, np.float32), "s")
    for zp_dtype, zp_value, bad in ((np.uint8, 128, True), (np.int8, 0, False)):
        zp = numpy_helper.from_array(np.array(zp_value, zp_dtype), "zp")
        qdq = _model([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
                      helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq")],
                     [_vi("x", TensorProto.FLOAT, [1, 4])], [_vi("y", TensorProto.FLOAT, [1, 4])],
                     [scale, zp])
        assert bool(lint_graph(qdq)) is bad, lint_graph(qdq)
    # Resize: cubic is not among TensorRT's modes
    roi = numpy_helper.from_array(np.array([], np.float32), "roi")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    cubic = _model([helper.make_node("Resize", ["x", "roi", "scales"], ["y"], name="cubic", mode="cubic")],
                   [_vi("x", TensorProto.FLOAT, [1, 3, 4, 4])], [_vi("y", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [roi, scales])
    assert "mode='cubic'" in lint_graph(cubic)[0].reason


def test_lint_knows_which_release_an_op_arrived_in():
    step = numpy_helper.from_array(np.array(16, np.int64), "step")
    length = numpy_helper.from_array(np.array(32, np.int64), "len")
    stft = _model([helper.make_node("STFT", ["x", "step", "", "len"], ["y"], name="stft", onesided=1)],
                  [_vi("x", TensorProto.FLOAT, [1, 128, 1])], [_vi("y", TensorProto.FLOAT, [1, 7, 17, 2])],
                  [step, length])
    assert "needs TensorRT 10.5+" in lint_graph(stft, "10.3.0.30")[0].reason  # JetPack 6 cannot
    assert lint_graph(stft, "10.13.0.35") == []
    relu21 = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", TensorProto.FLOAT, [1])],
                    [_vi("y", TensorProto.FLOAT, [1])], opset=21)
    assert "opset 21" in lint_graph(relu21)[0].reason  # above the documented 10.3 ceiling (20)
    assert lint_graph(relu21, "10.15.1") == []


# ---- FP16 graph ---------------------------------------------------------------------------------------
def test_fp16_graph_matches_fp32_on_real_cells(sample_bundle, sample_dir, tmp_path):
    """ORT CPU runs the FP16 graph; note it inserts FP32 casts around ops it has no FP16 kernel for, so
    this checks the graph (types, FP16 weights, casts, names) and its accuracy, not FP16 arithmetic."""
    b = Bundle.load(sample_bundle)
    src = b.path(b.members[0].onnx)
    out = trtb.convert_fp16(src, tmp_path / "m0.fp16.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert (inp.name, inp.type.tensor_type.elem_type) == ("images", TensorProto.UINT8)
    assert (outp.name, outp.type.tensor_type.elem_type) == ("probs", TensorProto.FLOAT)
    assert trtb.graph_precision(model) == "fp16" and lint_graph(model) == []
    # FP32 stays only where convert_fp16 keeps it: the normalisation constants and the stem conv
    floats = [i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT]
    assert len(floats) <= 4 and len(model.graph.initializer) > 10 * len(floats)
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert set(floats) <= {*first_conv.input, *(i for n in model.graph.node[:6] for i in n.input)}
    pp = b.preprocess
    cells = from_image_folder(sample_dir / "cells")
    images, _, errors, _ = Preprocessor.for_bundle(b).load(cells)
    assert not errors and len(images) == 330
    runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]
            for p in (src, out)]
    assert runs[1].dtype == np.float32 and runs[1].shape == runs[0].shape
    assert np.abs(runs[1] - runs[0]).max() <= 1e-2  # DESIGN.md: FP16 ~1e-2
    assert (runs[1].argmax(1) == runs[0].argmax(1)).mean() >= 0.99
    assert np.allclose(runs[1].sum(1), 1, atol=1e-5)  # FP32 softmax kept


def test_fp16_conversion_refuses_graphs_it_cannot_type():
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    qdq = _model([helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q"),
                  helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq")],
                 [_vi("x", TensorProto.FLOAT, [1])], [_vi("y", TensorProto.FLOAT, [1])], [scale])
    with pytest.raises(ValueError, match="Q/DQ"):
        _convert(qdq)


def _convert(model):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        onnx.save(model, f"{d}/in.onnx")
        return trtb.convert_fp16(f"{d}/in.onnx", f"{d}/out.onnx")


# ---- TensorRT build and run (GPU only) --------------------------------------------------------------------
@needs_trt
def test_fp16_engine_builds_caches_and_runs(sample_bundle, sample_dir, tmp_path):
    from wbc_edge.edge.runners import OrtRunner
    from wbc_edge.edge.trt_runner import TensorRTRunner

    b = Bundle.load(sample_bundle)
    src = b.path(b.members[0].onnx)
    path = trtb.build_engine(src, tmp_path, "fp16", batch=(1, 8, 64), workspace_mb=512)
    assert trtb.build_engine(src, tmp_path, "fp16", batch=(1, 8, 64)) == path  # cache hit
    meta = trtb.read_sidecar(path)
    assert meta["io"] and meta["precision_check"]["FP16_layers"] > 0
    pp = b.preprocess
    cells = from_image_folder(sample_dir / "cells")
    images = Preprocessor.for_bundle(b).load(cells)[0]
    with TensorRTRunner(path) as trt_run, OrtRunner(src) as ort_run:
        # batches of 100 exceed the profile's max of 64: the runner chunks them
        got = np.concatenate([trt_run.infer(images[i:i + 100]) for i in range(0, len(images), 100)])
        expected = ort_run.infer(images)
    assert np.abs(got - expected).max() <= 1e-2
    with pytest.raises(trtb.EngineMismatchError):
        trtb.load_engine(path, trtb.engine_cache_key(**KEY_ARGS))


# ---- static check of the TensorRT API against its type stubs ---------------------------------------------
def _stub_files():
    spec = importlib.util.find_spec("tensorrt_bindings")
    locations = list(spec.submodule_search_locations or []) if spec else []
    found = [Path(loc) / "tensorrt.pyi" for loc in locations if (Path(loc) / "tensorrt.pyi").is_file()]
    if not found:
        pytest.skip("tensorrt-stubs is not installed")
    top = Path(importlib.util.find_spec("tensorrt").submodule_search_locations[0]) / "__init__.pyi"
    return found[0], top


def _stub_index(bindings: Path, top: Path) -> tuple[set, dict]:
    """Module-level names of `tensorrt` and each class's members (with inherited ones). Read by regex,
    not `ast`: the generated stubs are not all valid Python (e.g. a non-default argument after defaults)."""
    classes, bases, current = {}, {}, None
    for line in bindings.read_text().splitlines():
        top_class = re.match(r"class (\w+)(?:\((.*)\))?:", line)
        if top_class:
            current = top_class.group(1)
            classes[current] = set()
            bases[current] = re.findall(r"\w+", top_class.group(2) or "")
            continue
        member = re.match(r"    (?:def |class )?(\w+)\s*[(:=]", line)
        if current and member:
            classes[current].add(member.group(1))
        elif line and not line[0].isspace():
            current = None
    for name in list(classes):
        todo = list(bases[name])
        while todo:
            base = todo.pop()
            classes[name] |= classes.get(base, set())
            todo += bases.get(base, [])
    text = top.read_text()
    module = set(classes) | set(re.findall(r"^from \S+ import (\w+)", text, re.M))
    module |= set(re.findall(r"^(?:def |class )?(\w+)\s*[(:=]", text, re.M))
    return module, classes


# variable name in our code -> the TensorRT class it holds
OBJECTS = {"builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser",
           "config": "IBuilderConfig", "opt_profile": "IOptimizationProfile", "engine": "ICudaEngine",
           "context": "IExecutionContext", "inspector": "EngineInspector", "runtime": "Runtime",
           "e": "ParserError"}


def _uses(source: str):
    """('module', X, None) for trt.X, ('class', X, Y) for trt.X.Y and for obj.Y on a known TensorRT object."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id == "trt":
            yield "module", node.attr, None
        elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id == "trt":
            yield "class", base.attr, node.attr
        else:
            name = base.id if isinstance(base, ast.Name) else None
            is_self = isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name)
            if is_self and base.value.id == "self":
                name = base.attr  # self.context
            if name in OBJECTS:
                yield "class", OBJECTS[name], node.attr


def test_tensorrt_api_used_exists_in_the_type_stubs():
    module, classes = _stub_index(*_stub_files())
    version = importlib.metadata.version("tensorrt-stubs")
    checked, missing = 0, []
    for rel in ("build/tensorrt.py", "edge/trt_runner.py"):
        for kind, owner, attr in _uses((PKG / rel).read_text()):
            checked += 1
            ok = owner in module if kind == "module" else attr in classes.get(owner, ())
            if not ok:
                missing.append(f"{rel}: trt.{owner}" + (f".{attr}" if attr else ""))
    assert checked >= 40, f"only {checked} TensorRT references found: the scan is not seeing the code"
    assert not missing, f"not in tensorrt-stubs {version}: {missing}"


def test_classifier_on_cuda_asks_for_the_members_engine_and_falls_back_cleanly(bundle_copy, sample_dir, caplog):
    """`--device cuda --precision fp16` hands each member's built engine to the runner chain; on a machine
    without TensorRT/CUDA (here) it falls back to ORT on the FP32 graph and gives the FP32 result."""
    import logging

    import numpy as np

    from wbc_edge.bundle import Bundle
    from wbc_edge.data.datasets import load_bundle_cells
    from wbc_edge.edge.classifier import EnsembleClassifier

    b = Bundle.load(bundle_copy)
    (bundle_copy / "engines").mkdir()
    for m in b.members:  # every member has its engine to try
        (bundle_copy / "engines" / f"{m.name}.fp16.engine").write_bytes(b"not run here")
        m.artifacts["trt-fp16"] = f"engines/{m.name}.fp16.engine"
    b.save()
    b = Bundle.load(bundle_copy)
    x = load_bundle_cells(b, sample_dir / "cells")[0][::15]
    with caplog.at_level(logging.WARNING, logger="wbc_edge.runners"), \
            EnsembleClassifier(b, device="cuda", precision="fp16") as gpu:
        assert gpu._engine(b.members[0]) == bundle_copy / "engines" / "m0.fp16.engine"
        assert gpu._graph(b.members[0]) == b.members[0].onnx
        got = gpu.predict(x)
    tried = [r.getMessage() for r in caplog.records if "--device cuda: running on" in r.getMessage()
             and "tensorrt:" in r.getMessage()]  # the one fallback line names each runner that failed
    assert tried and not any("no TensorRT engine built" in m for m in tried)  # it had the engine to try
    with EnsembleClassifier(b) as cpu:
        np.testing.assert_allclose(got, cpu.predict(x), atol=1e-6)
    assert EnsembleClassifier(b, device="cpu", precision="fp16")._engine(b.members[0]) is None

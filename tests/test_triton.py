"""Triton: the model repository `build --target triton` writes (every config parsed with Triton's own
model-config protobuf), and a real `tritonserver` on loopback (the binary the nvidia-pytriton wheel ships,
serving the repository's graph through its Python backend) for `--server` runs: same classes and
probabilities as in-process, a model that is not the bundle's refused, and a server killed and restarted
mid-stream with every cell accounted for exactly once."""
import json
import threading
import time

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from wbc_edge.bundle import Bundle
from wbc_edge.cli import main
from wbc_edge.data.datasets import from_image_folder
from wbc_edge.edge.classifier import EnsembleClassifier
from wbc_edge.edge.preprocess import Preprocessor
from wbc_edge.edge.runners import OrtRunner, RunnerError

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient is not installed (extra `triton`)")
text_format = pytest.importorskip("google.protobuf.text_format")


def _build(bundle, out, *extra) -> None:
    res = CliRunner().invoke(main, ["build", str(bundle), "--target", "triton", "--out", str(out), *extra])
    assert res.exit_code == 0, res.output


def _parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def cells(sample_dir, sample_bundle):
    """Model-input cells of every sample cell, through the bundle's own preprocessor."""
    return Preprocessor.for_bundle(Bundle.load(sample_bundle)).load(from_image_folder(sample_dir / "cells"))[0]


# ---- the repository -------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--instance-kind", "gpu", "--instances", "2", "--max-batch", "32"],
                                   ["--triton-backend", "python"]])
def test_configs_pass_tritons_schema(tmp_path, sample_bundle, extra):
    """Every config.pbtxt parses as Triton's ModelConfig; its I/O is the graph's own; the checksum is there."""
    _build(sample_bundle, tmp_path / "repo", *extra)
    configs = sorted((tmp_path / "repo").glob("*/config.pbtxt"))
    assert [c.parent.name for c in configs] == ["wbc_edge"]  # the shipped bundle has no TensorRT engines
    cfg = _parse(configs[0])
    graph = onnx.load(str(tmp_path / "repo" / "wbc_edge" / "1" / "model.onnx"))
    b = Bundle.load(sample_bundle)
    (inp,), (out,) = cfg.input, cfg.output
    assert inp.name == graph.graph.input[0].name and out.name == graph.graph.output[0].name
    assert list(inp.dims) == [b.preprocess.input_size] * 2 + [3] and list(out.dims) == [len(b.classes)]
    assert inp.data_type == model_config_pb2.TYPE_UINT8 and out.data_type == model_config_pb2.TYPE_FP32
    max_batch = 32 if "32" in extra else 64
    assert cfg.max_batch_size == max_batch and max(cfg.dynamic_batching.preferred_batch_size) == max_batch
    assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
    kind = model_config_pb2.ModelInstanceGroup.KIND_GPU if "gpu" in extra else \
        model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert cfg.instance_group[0].kind == kind and cfg.instance_group[0].count == (2 if "2" in extra else 1)
    assert (cfg.backend, cfg.platform) == (("python", "") if "python" in extra else ("", "onnxruntime_onnx"))
    record = json.loads((tmp_path / "repo" / "wbc_edge" / "checksums.json").read_text())
    assert cfg.parameters["wbc_edge_model_sha256"].string_value == record["model_sha256"]
    assert json.loads(cfg.parameters["wbc_edge_views"].string_value) == b.views
    assert (tmp_path / "repo" / "wbc_edge" / "manifest.json").read_bytes() == b.manifest_path.read_bytes()


def test_engine_variant_config(tmp_path, bundle_copy):
    """A bundle with a TensorRT engine (its recorded sidecar; the bytes are not parsed on this path) gets a
    tensorrt_plan model: GPU instances, the profile's max batch, what the engine was built for."""
    from wbc_edge.build import tensorrt as trtb

    b = Bundle.load(bundle_copy)
    size = b.preprocess.input_size
    profile = {"images": [[1, size, size, 3], [16, size, size, 3], [32, size, size, 3]]}
    args = {"trt_version": "10.3.0.30", "gpu_name": "Orin", "compute_capability": (8, 7), "precision": "fp16",
            "profile": profile, "onnx_sha256": "0" * 64}
    key = trtb.engine_cache_key(**args)
    rel = f"engines/{trtb.engine_file_name('m0.onnx', 'fp16', key)}"
    (bundle_copy / "engines").mkdir()
    trtb.record_engine(bundle_copy / rel, bytes(range(256)) * 8, trtb.engine_key_parts(**args), key, onnx="m0.onnx")
    b.members[0].artifacts["trt-fp16"] = rel
    b.save()
    _build(bundle_copy, tmp_path / "repo")
    variant = tmp_path / "repo" / "wbc_edge_m0_trt_fp16"
    cfg = _parse(variant / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 32
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert cfg.parameters["wbc_edge_engine_key"].string_value == key
    assert "Orin" in cfg.parameters["wbc_edge_engine_built_for"].string_value
    assert json.loads(cfg.parameters["wbc_edge_views"].string_value) == ["id"]
    assert (variant / "1" / "model.plan").read_bytes() == (bundle_copy / rel).read_bytes()


def test_schema_check_can_fail(tmp_path, sample_bundle):
    """The schema test is a real check: a misspelt field or a wrong enum is refused by the protobuf."""
    _build(sample_bundle, tmp_path / "repo")
    path = tmp_path / "repo" / "wbc_edge" / "config.pbtxt"
    text = path.read_text()
    for bad in (text.replace("max_batch_size", "max_batch"), text.replace("KIND_CPU", "KIND_TPU")):
        path.write_text(bad)
        with pytest.raises(text_format.ParseError):
            _parse(path)


def test_build_needs_out_and_leaves_the_bundle(tmp_path, sample_bundle):
    before = (sample_bundle / "manifest.json").read_bytes()
    res = CliRunner().invoke(main, ["build", str(sample_bundle), "--target", "triton"])
    assert res.exit_code == 2 and "needs --out" in res.output
    _build(sample_bundle, tmp_path / "repo")
    assert (sample_bundle / "manifest.json").read_bytes() == before


def test_repository_graph_is_the_classifier(tmp_path, sample_bundle, cells):
    """The served graph (views and members inside) gives the in-process ensemble's probabilities."""
    _build(sample_bundle, tmp_path / "repo")
    b = Bundle.load(sample_bundle)
    with OrtRunner(tmp_path / "repo" / "wbc_edge" / "1" / "model.onnx") as r:
        served = r.infer(cells)
    with EnsembleClassifier(b, calibrated=False, fused=False) as clf:
        local = clf.predict(cells)
    assert np.abs(served - local).max() < 1e-5
    assert (served.argmax(1) == local.argmax(1)).all()


# ---- a real server --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, sample_bundle):
    from wbc_edge.build.triton_server import LocalServer, ServerUnavailable

    repo = tmp_path_factory.mktemp("triton") / "repo"
    _build(sample_bundle, repo, "--triton-backend", "python")
    try:
        srv = LocalServer(repo).start()
    except ServerUnavailable as exc:
        pytest.skip(f"tritonserver cannot start here: {exc}")
    yield srv
    srv.close()


def test_classifier_via_server_equals_in_process(server, sample_bundle, cells):
    b = Bundle.load(sample_bundle)
    with EnsembleClassifier(b, server=server.url) as remote:
        got = remote.predict(cells)
        report = remote.server_report
    with EnsembleClassifier(b) as local:
        want = local.predict(cells)
    assert np.abs(got - want).max() < 1e-5 and (got.argmax(1) == want.argmax(1)).all()
    assert report["outages"] == [] and report["requests"] >= len(cells) // report["max_batch_size"]
    assert report["bundle_digest_served"] == report["bundle_digest"]


def _rows(path):
    return {(r["source"], r["frame"], r["cell"]): r for r in map(json.loads, path.read_text().splitlines())}


def test_stream_and_evaluate_via_server(server, tmp_path, sample_dir, sample_bundle):
    """`stream --server` and `evaluate --server` (the real CLI) give the in-process classes."""
    runs = {}
    for where in ("local", "server"):
        extra = ["--server", server.url] if where == "server" else []
        res = CliRunner().invoke(main, ["stream", str(sample_dir / "frames"), "--bundle", str(sample_bundle),
                                        "--out", str(tmp_path / where), "--no-report", *extra])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(main, ["evaluate", str(sample_dir / "cells"), "--bundle", str(sample_bundle),
                                        "--out", str(tmp_path / f"eval-{where}"), *extra])
        assert res.exit_code == 0, res.output
        runs[where] = _rows(tmp_path / where / "cells.jsonl")
    assert runs["local"] and runs["local"].keys() == runs["server"].keys()
    for key, row in runs["local"].items():
        assert runs["server"][key]["pred"] == row["pred"], key
        assert abs(runs["server"][key]["confidence"] - row["confidence"]) <= 1e-4  # rows round to 4 places
    summary = json.loads((tmp_path / "server" / "summary.json").read_text())
    assert summary["runner"].startswith("triton:") and summary["server"]["outages"] == []
    preds = {w: [json.loads(line)["pred"] for line in (tmp_path / f"eval-{w}" / "predictions.jsonl").open()]
             for w in ("local", "server")}
    assert preds["local"] == preds["server"]
    metrics = json.loads((tmp_path / "eval-server" / "metrics.json").read_text())
    assert metrics["server"]["model"] == "wbc_edge"


def test_other_model_refused(server, sample_bundle, tmp_path, sample_dir):
    """Other TTA views than the served model's: refused before any output, with the reason."""
    b = Bundle.load(sample_bundle)
    with pytest.raises(RunnerError, match="TTA views"):
        EnsembleClassifier(b, views=["id"], server=server.url).activate()
    res = CliRunner().invoke(main, ["stream", str(sample_dir / "frames"), "--bundle", str(sample_bundle),
                                    "--out", str(tmp_path / "out"), "--views", "id", "--server", server.url])
    assert res.exit_code == 1 and "not this bundle's" in res.output and not (tmp_path / "out").exists()
    with pytest.raises(RunnerError, match="not ready|unknown model|not found"):
        EnsembleClassifier(b, server=server.url + "/other_model").activate()


def test_server_killed_and_restarted_mid_stream(server, tmp_path, sample_dir, sample_bundle):
    """A microscope writes frames into a watched folder; after the first frames are written the server is
    SIGKILLed, the next frames arrive while it is down, and it comes back 2 s later on the same port. The
    stream retries: every cell of every frame is in cells.jsonl exactly once with the in-process class, and
    the outage is in summary.json."""
    import os
    import shutil

    from wbc_edge.edge.pipeline import run_stream

    frames = sorted((sample_dir / "frames" / "JPEGImages").glob("*.jpg"))
    names = [(f, f"{k}_{f.name}") for k in range(3) for f in frames]
    every = tmp_path / "every"
    every.mkdir()
    for src, name in names:
        shutil.copyfile(src, every / name)
    opts = {"report": False, "max_batch": 8, "scale_per": "image"}
    local = run_stream(str(every), sample_bundle, tmp_path / "local", **opts)
    incoming, staging = tmp_path / "incoming", tmp_path / "staging"
    incoming.mkdir()
    staging.mkdir()
    killed, restarted = threading.Event(), threading.Event()

    def microscope():  # a frame at a time, each appearing whole (rename), the rest while the server is down
        for i, (_, name) in enumerate(names):
            if i == len(frames):
                killed.wait(60)
            shutil.copyfile(every / name, staging / name)
            os.replace(staging / name, incoming / name)
            time.sleep(0.05)

    def restart():
        time.sleep(2.0)
        server.start()
        restarted.set()

    def on_progress(p):
        if p["frames"] >= 3 and not killed.is_set():
            server.kill()
            killed.set()
            threading.Thread(target=restart, daemon=True).start()

    threading.Thread(target=microscope, daemon=True).start()
    try:
        remote = run_stream(str(incoming), sample_bundle, tmp_path / "remote", mode="watch", watch_idle_s=8.0,
                            server=server.url, on_progress=on_progress, **opts)
    finally:
        restarted.wait(60)  # the module's server is up again for any later test
    assert killed.is_set() and remote.status == "completed", remote.error
    assert remote.frames == len(names)
    outages = remote.server["outages"]
    assert len(outages) >= 1 and all(o["recovered"] for o in outages) and outages[0]["seconds"] >= 1.0
    rows = [json.loads(line) for line in (tmp_path / "remote" / "cells.jsonl").read_text().splitlines()]
    keys = [(os.path.basename(r["source"]), r["cell"]) for r in rows]
    assert len(keys) == len(set(keys)) == local.cells == remote.cells > 0  # none lost, none twice
    want = {(os.path.basename(r["source"]), r["cell"]): r["pred"]
            for r in map(json.loads, (tmp_path / "local" / "cells.jsonl").read_text().splitlines())}
    assert want == {k: r["pred"] for k, r in zip(keys, rows)}
    assert json.loads((tmp_path / "remote" / "summary.json").read_text())["server"]["outages"] == outages


def test_serve_benchmark_runs(tmp_path):
    """benchmarks/serve.py end to end on one stream for a second (no timing asserts: speed is in the results)."""
    from benchmarks import serve
    from wbc_edge.build.triton_server import ServerUnavailable

    try:
        serve.main(["--allow-load", "--quiet-load", "1000", "--seconds", "1", "--streams", "1", "--out", str(tmp_path)])
    except ServerUnavailable as exc:
        pytest.skip(f"tritonserver cannot start here: {exc}")
    rows = json.loads((tmp_path / "serve.json").read_text())["rows"]
    assert [(r["mode"], r["streams"]) for r in rows] == [("in-process", 1), ("triton", 1)]
    assert all(r["cells"] > 0 and r["lost"] == 0 and r["max_abs_diff"] < 1e-5 for r in rows)
    assert rows[1]["server_batches"] and (tmp_path / "serve.png").stat().st_size > 0

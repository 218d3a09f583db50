"""Refinement phase 2: embedders cut from real graphs, prototypes, and the veto of unbacked switches."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from wbc_edge.edge.preprocess import Preprocessor
from wbc_edge.build.surgery import embedding_graph
from wbc_edge.bundle import Bundle, BundleError
from wbc_edge.data.datasets import from_image_folder, load_labelled
from wbc_edge.edge.classifier import EnsembleClassifier
from wbc_edge.edge.refine.embed import (EmbedderError, Embedder, class_rank, class_similarity, fit_prototypes,
                                        l2_normalise, make_embedder)
from wbc_edge.edge.refine.refiner import Refiner, fit_verification


@pytest.fixture
def bundle(bundle_copy):
    return Bundle.load(bundle_copy)


@pytest.fixture(scope="module")
def sample_crops(sample_dir):
    b = Bundle.load(sample_dir / "bundle")
    return Preprocessor.for_bundle(b).load(from_image_folder(sample_dir / "cells", b.classes))[0][::5]


def test_embedding_graph_is_the_classifier_input(sample_bundle, sample_crops):
    """Embedding -> the graph's own Gemm -> softmax gives back the bundle's probabilities exactly."""
    b = Bundle.load(sample_bundle)
    model = onnx.load(str(b.path(b.members[0].onnx)))
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w, bias = init[gemm.input[1]], init[gemm.input[2]]
    cut = embedding_graph(model)
    onnx.checker.check_model(cut, full_check=True)
    emb = ort.InferenceSession(cut.SerializeToString()).run(None, {"images": sample_crops})[0]
    transb = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
    logits = emb @ (w.T if transb else w) + bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    ref = ort.InferenceSession(str(b.path(b.members[0].onnx))).run(None, {"images": sample_crops})[0]
    assert emb.shape == (len(sample_crops), w.shape[1] if transb else w.shape[0])
    np.testing.assert_allclose(probs, ref, atol=1e-5)


def test_embedding_graph_refuses_graphs_without_a_classifier(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    with pytest.raises(ValueError, match="not a wbc-edge deployable graph"):
        embedding_graph(helper.make_model(graph))
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(EmbedderError, match="other.onnx is not a wbc-edge graph"):
        make_embedder(None, f"onnx:{path}", tmp_path / "e.onnx", tmp_path)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(EmbedderError, match="junk.onnx is not a readable ONNX"):
        make_embedder(None, f"onnx:{tmp_path / 'junk.onnx'}", tmp_path / "e.onnx", tmp_path)
    with pytest.raises(EmbedderError, match="unknown embedding source 'clip:x'"):
        make_embedder(None, "clip:x", tmp_path / "e.onnx", tmp_path)
    with pytest.raises(EmbedderError, match="given by its index"):
        make_embedder(None, "member:m0", tmp_path / "e.onnx", tmp_path)
    with pytest.raises(EmbedderError, match="needs its argument"):
        make_embedder(None, "timm:", tmp_path / "e.onnx", tmp_path)


def test_prototypes_similarity_and_rank():
    rng = np.random.default_rng(0)
    centres = l2_normalise(rng.normal(size=(3, 16)))
    labels = np.repeat(np.arange(3), 40)
    emb = l2_normalise(centres[labels] + 0.05 * rng.normal(size=(120, 16)))
    protos, owners = fit_prototypes(emb, labels, n_classes=4, per_class=2)  # class 3 has no cells
    assert sorted(set(owners.tolist())) == [0, 1, 2] and len(protos) == 6
    np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1, atol=1e-5)
    sim = class_similarity(emb, protos, owners, 4)
    brute = np.array([[max([float(e @ p) for p, o in zip(protos, owners) if o == c], default=-np.inf)
                       for c in range(4)] for e in emb])
    np.testing.assert_allclose(sim, brute, rtol=1e-5)
    assert (sim.argmax(1) == labels).all()
    ranks = class_rank(sim, (labels + 1) % 3)
    order = np.argsort(-sim, axis=1)
    expect = [1 + list(order[i]).index((labels[i] + 1) % 3) for i in range(len(emb))]
    assert ranks.tolist() == expect and (class_rank(sim, labels) == 1).all()


def _verify_config(b, crops, backed: bool, rare: str, common: str, tmp_name="v"):
    """A phase-2 config whose prototypes are each cell's own embedding, for `rare` (backed: rank 1)
    or for `common` (not backed: `rare` ranks 2), and their opposites for the other class."""
    spec = make_embedder(b, "member", b.path(f"{tmp_name}/embed.onnx"), b.root)
    with Embedder(b.path(f"{tmp_name}/embed.onnx"), spec) as e:
        emb = e(crops)
    ir, ic = b.classes.index(rare), b.classes.index(common)
    protos = np.concatenate([emb, -emb])
    owners = np.array([ir if backed else ic] * len(emb) + [ic if backed else ir] * len(emb))
    np.savez(b.path(f"{tmp_name}/protos.npz"), prototypes=l2_normalise(protos), owners=owners)
    priors = [0.5 if c == common else 0.01 for c in b.classes]
    return {"enabled": True, "onnx": f"{tmp_name}/embed.onnx", "prototypes": f"{tmp_name}/protos.npz",
            "spec": spec.to_dict(), "rank": 1, "direction": "rarer", "priors": priors}


@pytest.mark.parametrize("backed", [True, False])
def test_verify_keeps_backed_switches_and_undoes_the_others(bundle, sample_crops, backed):
    b, n = bundle, len(sample_crops)
    rare, common = "PMY", "SNE"
    offsets = np.zeros(len(b.classes))
    offsets[b.classes.index(rare)] = 50.0  # phase 1 proposes `rare` for every cell
    cfg = {"boost": {"enabled": True, "offsets": offsets.tolist()},
           "verify": _verify_config(b, sample_crops, backed, rare, common)}
    probs = np.full((n, len(b.classes)), 0.01)
    probs[:, b.classes.index(common)] = 0.9
    refiner = Refiner(cfg, b.classes, b.root)
    pred, changes = refiner(probs, sample_crops)
    refiner.close()
    assert all(c[0]["phase"] == "boost" and c[0]["to"] == rare for c in changes)
    if backed:
        assert (pred == b.classes.index(rare)).all()
        assert all(len(c) == 1 and c[0]["embedding_rank"] == 1 for c in changes)
    else:
        assert (pred == b.classes.index(common)).all()
        assert all(c[1] == {"phase": "verify", "from": rare, "to": common, "embedding_rank": 2} for c in changes)
    # a switch towards the more common class is not phase 2's business
    probs[:, b.classes.index(common)], probs[:, b.classes.index(rare)] = 0.01, 0.9
    offsets[:] = 0
    offsets[b.classes.index(common)] = 50.0
    cfg["boost"]["offsets"] = offsets.tolist()
    pred, changes = Refiner(cfg, b.classes, b.root)(probs, sample_crops)
    assert (pred == b.classes.index(common)).all() and all(len(c) == 1 for c in changes)


def test_verify_needs_its_bundle_and_the_crops(bundle, sample_crops):
    b = bundle
    cfg = {"boost": {"enabled": True, "offsets": [0, 0, 0, 0, 0, 0, 0, 50.0, 0]},
           "verify": _verify_config(b, sample_crops, True, "PMY", "SNE")}
    with pytest.raises(ValueError, match="needs the bundle directory"):
        Refiner(cfg, b.classes)
    probs = np.full((2, 9), 0.1)
    probs[:, 8] = 0.5
    with pytest.raises(ValueError, match="needs the cell crops"):
        Refiner(cfg, b.classes, b.root)(probs)


def test_fit_verification_stores_a_checksummed_embedder(bundle, sample_dir):
    b = bundle
    res = fit_verification(b, sample_dir / "cells", sample_dir / "cells", "member", per_class=2, ranks=(1, 2))
    saved = json.loads(b.manifest_path.read_text())["refine"]["verify"]
    assert saved["enabled"] == res["enabled"] == (res["val_macro_f1_after"] > res["val_macro_f1_before"])
    assert res["rank"] in (1, 2) and res["n_prototypes"] == 2 * len(b.classes)
    assert {saved["onnx"], saved["prototypes"]} <= set(json.loads(b.manifest_path.read_text())["checksums"])
    loaded = Bundle.load(b.root)  # the embedder and prototypes travel with the bundle, checked
    with EnsembleClassifier(loaded) as clf, Embedder(loaded.path(saved["onnx"]), make_spec(saved)) as e:
        x, y, _ = load_labelled(sample_dir / "cells", b.classes, Preprocessor.for_bundle(loaded))
        with np.load(loaded.path(saved["prototypes"])) as z:
            sim = class_similarity(e(x), z["prototypes"], z["owners"], len(b.classes))
        # prototypes from these very cells: the nearest prototype's class mostly is the label
        assert (sim.argmax(1) == y).mean() > 0.7  # nearest prototype class (chance: 0.11)
        assert clf.predict(x[:2]).shape == (2, len(b.classes))
    with open(b.path(saved["prototypes"]), "ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError, match="prototypes.npz does not match its checksum"):
        Bundle.load(b.root)


def make_spec(saved):
    from wbc_edge.edge.refine.embed import EmbedSpec

    return EmbedSpec(**saved["spec"])


def test_cli_refine_verify_needs_training_cells(sample_bundle, sample_dir):
    from wbc_edge.cli import main

    res = CliRunner().invoke(main, ["refine", str(sample_bundle), "--val", str(sample_dir / "cells"),
                                    "--verify", "member"])
    assert res.exit_code == 2 and "--verify needs --morph" in res.output
    res = CliRunner().invoke(main, ["refine", str(sample_bundle), "--val", str(sample_dir / "cells"),
                                    "--morph", str(sample_dir / "cells"), "--verify", "bundle:/no/such/dir"])
    assert res.exit_code == 2 and "/no/such/dir does not exist" in res.output  # refused before any fitting


def test_timm_embedder_matches_torch(tmp_path, sample_crops):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0).eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))  # local weights: no hub here
    spec = make_embedder(None, f"timm:mobilenetv3_small_050@{tmp_path / 'w.safetensors'}", tmp_path / "e.onnx",
                         tmp_path)
    cfg = model.pretrained_cfg
    assert spec.input_size == cfg["input_size"][-1]
    with Embedder(tmp_path / "e.onnx", spec) as e:
        got = e(sample_crops[:4])
    from wbc_edge.edge.preprocess import resize_batch

    x = resize_batch(sample_crops[:4], spec.input_size, "area").astype(np.float32) / 255.0
    x = (x - np.asarray(cfg["mean"], np.float32)) / np.asarray(cfg["std"], np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(got, l2_normalise(ref), atol=1e-4)


def test_hf_siglip_embedder_matches_torch(tmp_path, sample_crops):
    """A MedSigLIP-style image encoder saved with transformers, loaded from a local directory."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers", reason="the embed-hf extra is not installed")
    torch.manual_seed(0)
    cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=64, patch_size=16)
    model = transformers.SiglipVisionModel(cfg).eval()
    model.save_pretrained(tmp_path / "siglip")
    (tmp_path / "siglip" / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 64, "width": 64}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    spec = make_embedder(None, f"hf:{tmp_path / 'siglip'}", tmp_path / "e.onnx", tmp_path)
    assert spec.input_size == 64
    with Embedder(tmp_path / "e.onnx", spec) as e:
        got = e(sample_crops[:3])
    from wbc_edge.edge.preprocess import resize_batch

    x = (resize_batch(sample_crops[:3], 64, "area").astype(np.float32) / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).pooler_output.numpy()
    np.testing.assert_allclose(got, l2_normalise(ref), atol=1e-4)
    with pytest.raises(EmbedderError, match="no config.json"):
        make_embedder(None, f"hf:{tmp_path}", tmp_path / "e2.onnx", tmp_path)


def test_evaluate_and_stream_record_vetoes(bundle, sample_dir, tmp_path):
    """Phase 2 in the two real paths: offline evaluation and the stream (crops mode)."""
    from wbc_edge.edge.pipeline import run_stream
    from wbc_edge.evaluate import evaluate

    b = bundle
    x = load_labelled(sample_dir / "cells", b.classes, Preprocessor.for_bundle(b))[0]
    offsets = [0.0] * len(b.classes)
    offsets[b.classes.index("PMY")] = 50.0  # phase 1 calls everything PMY; phase 2 backs none of it
    b.extra["refine"] = {"boost": {"enabled": True, "offsets": offsets},
                         "verify": _verify_config(b, x, False, "PMY", "SNE")}
    b.extra["refine"]["verify"]["priors"] = [0.5] * len(b.classes)
    b.extra["refine"]["verify"]["priors"][b.classes.index("PMY")] = 0.01
    b.save()
    rep = evaluate(b.root, sample_dir / "cells", tmp_path / "ev", progress=False)
    raw = evaluate(b.root, sample_dir / "cells", tmp_path / "ev0", progress=False, refine=False)
    rows = [json.loads(r) for r in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    raw_rows = [json.loads(r) for r in (tmp_path / "ev0" / "predictions.jsonl").read_text().splitlines()]
    # the prototypes are the labelled cells' own embeddings: for those cells every switch is undone...
    own = [i for i, r in enumerate(raw_rows) if r["label"] in b.classes]
    assert [rows[i]["pred"] for i in own] == [raw_rows[i]["pred"] for i in own]
    moved = [rows[i] for i in own if rows[i].get("refine")]
    assert len(moved) == sum(raw_rows[i]["pred"] != "PMY" for i in own if raw_rows[i].get("pred"))
    assert all([c["phase"] for c in r["refine"]] == ["boost", "verify"] for r in moved)  # ...and recorded
    assert rep["n_refined"] == 0 and rep["macro_f1"] == raw["macro_f1"]
    summary = run_stream(sample_dir / "cells" / "PMY", b.root, tmp_path / "st", mode="crops")
    cells = [json.loads(r) for r in (tmp_path / "st" / "cells.jsonl").read_text().splitlines()]
    assert summary.to_dict()["cells"] == len(cells) > 0
    assert all(c["pred"] != "PMY" or not c.get("refine") for c in cells)
    assert any(c.get("refine", [{}])[-1].get("phase") == "verify" for c in cells)


def test_select_phases_enables_the_best_subset(bundle, sample_dir):
    from wbc_edge.edge.refine.refiner import fit_morphology, fit_refinement, select_phases

    b, cells = bundle, sample_dir / "cells"
    fit_refinement(b, cells)
    fit_morphology(b, cells, cells, close=0.5)
    fit_verification(b, cells, cells, "member", per_class=1, ranks=(1,))
    sel = select_phases(b, cells)
    assert "verify" not in sel["macro_f1"] and {"none", "boost", "boost+verify+morphology"} <= set(sel["macro_f1"])
    best = max(sel["macro_f1"].values())
    assert sel["macro_f1"][sel["chosen"]] == best
    refine = json.loads(b.manifest_path.read_text())["refine"]
    chosen = set() if sel["chosen"] == "none" else set(sel["chosen"].split("+"))
    assert {p for p in ("boost", "verify", "morphology") if refine[p]["enabled"]} == chosen

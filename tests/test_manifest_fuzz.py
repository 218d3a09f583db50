"""Seeded random mutations of the shipped bundle's manifest.json: each one either loads and classifies
real cells to finite probabilities, or is refused with a BundleError; never another exception, never NaN."""
import copy
import json
import math
import random
import shutil

import numpy as np
import pytest

from wbc_edge.bundle import SELF, TRUST_ENV, Bundle, BundleError, manifest_digest

N_MUTATIONS = 200  # per bundle kind
# where the loader and the classifier read; the rest of the tree (drift, training...) is mutated too, less often
HOT = ["format", "format_version", "classes", "preprocess", "members", "tta", "confidence", "checksums", "fused"]
VALUES = [None, True, False, 0, -1, 1, 2, 0.5, 1e-9, 1e308, -1e308, float("nan"), float("inf"), -float("inf"),
          10 ** 30, 2 ** 63, "", "1", "id", "LY", "m0", "m0.onnx", "../escaped", "../m0.onnx", "/etc/passwd", "..",
          "sub/../../x", "C:\\x.onnx", "a\\b", [], {}, ["id"], ["id", "foo"], [1, 2], [0.5, 0.5, 0.5],
          {"a": 1}, {"onnx": "../x.onnx"}, {"views": []}, {"temperature": 0}, "\u00e9\u0000"]


def _paths(node, prefix=()):
    """Every (key or index) path in the manifest tree."""
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in children:
        yield from _paths(v, prefix + (k,))


def _pick_path(rng, manifest):
    paths = [p for p in _paths(manifest) if p]
    hot = [p for p in paths if p[0] in HOT]
    return rng.choice(hot if hot and rng.random() < 0.85 else paths)


def _mutate(rng, manifest):
    """One random edit in place -> its description."""
    path = _pick_path(rng, manifest)
    parent = manifest
    for k in path[:-1]:
        parent = parent[k]
    key, old = path[-1], parent[path[-1]]
    op = rng.choice(["delete", "replace", "replace", "replace", "swap", "duplicate", "add_key", "scale"])
    if op == "delete":
        del parent[key]
    elif op == "swap" and isinstance(old, list) and len(old) > 1:
        i, j = rng.sample(range(len(old)), 2)
        old[i], old[j] = old[j], old[i]
    elif op == "duplicate" and isinstance(old, list) and old:
        old.append(copy.deepcopy(rng.choice(old)))
    elif op == "add_key" and isinstance(old, dict):
        old[rng.choice(["extra", "../x", "name", "onnx"])] = rng.choice(VALUES)
    elif op == "scale" and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[key] = old * rng.choice([-1, 0, 1e-300, 1e300, 1000])
    else:
        op, parent[key] = "replace", copy.deepcopy(rng.choice(VALUES))
    return f"{op} {'.'.join(map(str, path))}"


@pytest.fixture(scope="module")
def fuzz_home(tmp_path_factory, sample_bundle, sample_dir):
    """Two copies of the shipped bundle: as shipped ("plain"), and with a fused graph ("fused", whose
    manifest section names the members, weights and views built into it); a couple of real cells."""
    from wbc_edge.build.builder import build_onnx
    from wbc_edge.data.datasets import from_folder
    from wbc_edge.edge.preprocess import Preprocessor

    home = tmp_path_factory.mktemp("fuzz")
    bundles = {}
    for kind in ("plain", "fused"):
        work = home / kind
        shutil.copytree(sample_bundle, work, ignore=shutil.ignore_patterns("*.int8*", "*.png", "*.jsonl"))
        if kind == "fused":
            build_onnx(Bundle.load(work), fuse=True).save()
        bundles[kind] = (work, json.loads((work / "manifest.json").read_text()))
    two = home / "cells"  # a couple of real cells is enough to see probabilities come out
    two.mkdir()
    for p in sorted((sample_dir / "cells" / "LY").glob("*.jpg"))[:2]:
        shutil.copy(p, two / p.name)
    cells = Preprocessor.for_bundle(Bundle.load(sample_bundle)).load(from_folder(two))[0]
    return bundles, cells


def _outcome(work, cells) -> str:
    """'refused: ...' or 'loaded'; raises on anything else (another exception type, NaN)."""
    from wbc_edge.edge.classifier import EnsembleClassifier

    try:
        b = Bundle.load(work)
    except BundleError as exc:
        assert str(work) in str(exc), f"the refusal does not name the bundle: {exc}"
        return f"refused: {exc}"
    with EnsembleClassifier(b, threads=1) as clf:
        probs = clf.predict(cells)
    assert probs.shape == (len(cells), len(b.classes)) and np.isfinite(probs).all(), probs
    assert np.allclose(probs.sum(1), 1, atol=1e-4), probs.sum(1)
    return "loaded"


@pytest.mark.parametrize("kind", ["plain", "fused"])
def test_manifest_mutations_load_cleanly_or_are_refused(fuzz_home, kind, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    (work, original), cells = fuzz_home[0][kind], fuzz_home[1]
    rng, outcomes, failures = random.Random(f"issue14-{kind}"), [], []
    for i in range(N_MUTATIONS):
        manifest = copy.deepcopy(original)
        what = [_mutate(rng, manifest) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        # most are re-signed as Bundle.save would, so the checks behind the digest are reached too
        if rng.random() < 0.85 and isinstance(manifest.get("checksums"), dict):
            manifest["checksums"][SELF] = manifest_digest(manifest)
        (work / "manifest.json").write_text(json.dumps(manifest))
        try:
            outcomes.append(_outcome(work, cells))
        except Exception as exc:  # noqa: BLE001 - every other failure is collected and reported below
            failures.append(f"#{i} {what}: {type(exc).__name__}: {exc}"[:300])
    (work / "manifest.json").write_text(json.dumps(original))
    assert not failures, "\n".join(failures)
    n_loaded = outcomes.count("loaded")
    assert 10 < n_loaded < N_MUTATIONS - 50, n_loaded  # both outcomes well exercised


@pytest.mark.parametrize("content", [b"[]", b"null", b"NaN", b'{"format": "wbc-edge-bundle"}', b'"x"', b"",
                                     b"\xff\xfe{}"])
def test_manifests_that_are_barely_json_are_refused(fuzz_home, content):
    work, original = fuzz_home[0]["plain"]
    (work / "manifest.json").write_bytes(content)
    try:
        with pytest.raises(BundleError):
            Bundle.load(work)
    finally:
        (work / "manifest.json").write_text(json.dumps(original))
    assert not math.isnan(Bundle.load(work).temperature)

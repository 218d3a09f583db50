import json
import shutil

import pytest

from wbc_edge.bundle import Bundle, BundleError, Member, Preprocess


def _tiny_bundle(tmp_path):
    root = tmp_path / "b"
    root.mkdir()
    (root / "m0.onnx").write_bytes(b"graph bytes")
    b = Bundle(root, ["LY", "MO"], Preprocess(64, [0.5] * 3, [0.25] * 3), [Member("m0", "resnet18", onnx="m0.onnx")],
               {"tta": {"views": ["id"]}})
    b.save()
    return root


def test_roundtrip_keeps_everything(tmp_path):
    root = _tiny_bundle(tmp_path)
    b = Bundle.load(root)
    assert b.classes == ["LY", "MO"] and b.preprocess.input_size == 64 and b.members[0].onnx == "m0.onnx"
    assert b.extra["tta"] == {"views": ["id"]}
    assert json.loads((root / "manifest.json").read_text())["checksums"]["m0.onnx"]


def test_corrupt_missing_and_newer_bundles_are_refused(tmp_path):
    root = _tiny_bundle(tmp_path)
    (root / "m0.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="checksum"):
        Bundle.load(root)
    (root / "m0.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format_version"] = 99
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="newer"):
        Bundle.load(root)
    with pytest.raises(BundleError, match="no manifest"):
        Bundle.load(tmp_path)


def test_shipped_bundle_loads_and_names_its_preprocessing(sample_bundle, tmp_path):
    b = Bundle.load(sample_bundle)
    assert b.preprocess.input_size > 0 and len(b.preprocess.mean) == 3
    assert set(b.classes) <= {"SNE", "BNE", "LY", "MO", "EO", "BA", "MMY", "MY", "PMY"}
    copy = tmp_path / "copy"
    shutil.copytree(sample_bundle, copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="invalid JSON"):
        Bundle.load(copy)

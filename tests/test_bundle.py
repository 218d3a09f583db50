import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import copy_sample_cells

from wbc_edge.bundle import SELF, TRUST_ENV, Bundle, BundleError, Member, manifest_digest


@pytest.fixture(autouse=True)
def _untrusted(monkeypatch):
    """Each test starts without WBC_EDGE_TRUST_UNSIGNED (the CLI flag sets it for the process)."""
    monkeypatch.delenv(TRUST_ENV, raising=False)


def _tiny_bundle(tmp_path, sample_bundle):
    """A bundle written by Bundle.save around the shipped graph (its metadata: 9 classes, 128 px)."""
    shipped = Bundle.load(sample_bundle)
    root = tmp_path / "b"
    root.mkdir()
    shutil.copy(sample_bundle / "m0.onnx", root / "m0.onnx")
    b = Bundle(root, shipped.classes, shipped.preprocess, [Member("m0", "mobilenetv3_small_100", onnx="m0.onnx")],
               {"tta": {"views": ["id"]}})
    b.save()
    return root


def _edit(root, change, sign: bool = True):
    """Apply `change` to the parsed manifest.json in place and write it back,
    re-signed as Bundle.save would (sign=False: as a hand edit leaves it)."""
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if sign and isinstance(manifest.get("checksums"), dict):
        manifest["checksums"][SELF] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def test_roundtrip_keeps_everything(tmp_path, sample_bundle):
    root = _tiny_bundle(tmp_path, sample_bundle)
    b = Bundle.load(root)
    assert b.classes[3] == "LY" and b.preprocess.input_size == 128 and b.members[0].onnx == "m0.onnx"
    assert b.extra["tta"] == {"views": ["id"]} and b.views == ["id"] and b.temperature == 1.0
    checksums = json.loads((root / "manifest.json").read_text())["checksums"]
    assert checksums["m0.onnx"] and checksums[SELF]


def test_corrupt_missing_and_newer_bundles_are_refused(tmp_path, sample_bundle):
    root = _tiny_bundle(tmp_path, sample_bundle)
    (root / "m0.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="checksum"):
        Bundle.load(root)
    (root / "m0.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(root)
    _edit(root, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="newer"):
        Bundle.load(root)
    with pytest.raises(BundleError, match="no manifest"):
        Bundle.load(tmp_path)


def test_shipped_bundle_is_signed_and_names_its_preprocessing(sample_bundle, tmp_path):
    b = Bundle.load(sample_bundle)  # no --trust-unsigned needed: the shipped manifest carries its digest
    assert b.preprocess.input_size > 0 and len(b.preprocess.mean) == 3
    assert set(b.classes) <= {"SNE", "BNE", "LY", "MO", "EO", "BA", "MMY", "MY", "PMY"}
    copy = tmp_path / "copy"
    shutil.copytree(sample_bundle, copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="invalid JSON"):
        Bundle.load(copy)


# ---- defect 2: edits to manifest.json go undetected ---------------------------------------------------
def _swap_ly_eo(m):
    c = m["classes"]
    i, j = c.index("LY"), c.index("EO")
    c[i], c[j] = c[j], c[i]


def test_a_hand_edit_breaks_the_manifest_digest(bundle_copy):
    _edit(bundle_copy, _swap_ly_eo, sign=False)
    with pytest.raises(BundleError, match="manifest.json was changed after it was saved"):
        Bundle.load(bundle_copy)
    with pytest.raises(BundleError, match="changed after it was saved"):  # trusting unsigned is no way round it
        Bundle.load(bundle_copy, trust_unsigned=True)


def test_swapped_classes_are_refused_by_the_graphs_own_class_list(bundle_copy):
    _edit(bundle_copy, _swap_ly_eo)  # even re-signed: the graph knows its outputs' order
    with pytest.raises(BundleError, match=r"m0.onnx was trained on classes .*'EO', 'LY'.*\(order matters"):
        Bundle.load(bundle_copy)


def test_a_bundle_without_checksums_is_refused_unless_trusted(bundle_copy, monkeypatch):
    _edit(bundle_copy, lambda m: m.pop("checksums"))
    with pytest.raises(BundleError, match="unsigned bundle.*--trust-unsigned"):
        Bundle.load(bundle_copy)
    assert Bundle.load(bundle_copy, trust_unsigned=True).classes
    monkeypatch.setenv(TRUST_ENV, "1")
    assert Bundle.load(bundle_copy).classes


def test_a_dropped_file_checksum_is_refused(bundle_copy):
    _edit(bundle_copy, lambda m: m["checksums"].pop("m0.onnx"))
    with pytest.raises(BundleError, match="m0.onnx has no checksum"):
        Bundle.load(bundle_copy)


@pytest.mark.parametrize("temperature", [0, -1.0, 1e-9, "1"])
def test_temperature_must_be_positive_and_finite(bundle_copy, temperature):
    _edit(bundle_copy, lambda m: m["confidence"].update(temperature=temperature))
    with pytest.raises(BundleError, match="'confidence.temperature' must be a finite number"):
        Bundle.load(bundle_copy)


def test_member_weights_must_not_all_be_zero_or_negative(bundle_copy):
    _edit(bundle_copy, lambda m: [x.update(weight=0) for x in m["members"]])
    with pytest.raises(BundleError, match=r"'members\[\]\.weight' must not all be 0"):
        Bundle.load(bundle_copy)
    _edit(bundle_copy, lambda m: m["members"][0].update(weight=-1))
    with pytest.raises(BundleError, match=r"'members\[0\]\.weight' must be a finite number >= 0"):
        Bundle.load(bundle_copy)


# ---- defect 9: names that leave the bundle directory --------------------------------------------------
def test_member_names_and_files_stay_inside_the_bundle(bundle_copy):
    _edit(bundle_copy, lambda m: m["members"][0].update(name="../escaped_member"))
    with pytest.raises(BundleError, match=r"'members\[0\]\.name' must be letters.*'\.\./escaped_member'"):
        Bundle.load(bundle_copy)
    for bad in ("/etc/passwd", "../m0.onnx", "sub/../../m0.onnx", "C:\\m0.onnx"):
        _edit(bundle_copy, lambda m: m["members"][0].update(name="m0", onnx=bad))
        with pytest.raises(BundleError, match=r"'members\[0\]\.onnx' must"):
            Bundle.load(bundle_copy)
    _edit(bundle_copy, lambda m: m["members"][0].update(onnx="m0.onnx", artifacts={"ort-int8": "/tmp/x.onnx"}))
    with pytest.raises(BundleError, match=r"'members\[0\]\.artifacts\.ort-int8' must stay inside"):
        Bundle.load(bundle_copy)


def test_build_writes_nothing_outside_the_bundle(bundle_copy):
    from wbc_edge.build.builder import build_onnx

    b = Bundle.load(bundle_copy)
    b.members[0].name = "../escaped_member"  # as an edited manifest would name it
    with pytest.raises(BundleError, match="members"):
        build_onnx(b)
    with pytest.raises(BundleError, match="inside the bundle"):
        b.path("../escaped_member.onnx")
    with pytest.raises(BundleError, match=r"members\[0\]\.name"):
        b.save()  # refused before writing
    assert not (bundle_copy.parent / "escaped_member.onnx").exists()


# ---- defect 11: the manifest disagrees with its graphs or names nothing runnable -----------------------
def test_fewer_classes_than_the_graph_are_refused(bundle_copy):
    _edit(bundle_copy, lambda m: m["classes"].pop())
    with pytest.raises(BundleError, match="m0.onnx was trained on classes"):
        Bundle.load(bundle_copy)


def test_an_input_size_the_graph_does_not_take_is_refused(bundle_copy):
    _edit(bundle_copy, lambda m: m["preprocess"].update(input_size=96))
    with pytest.raises(BundleError, match="m0.onnx expects preprocess.input_size 128, the manifest says 96"):
        Bundle.load(bundle_copy)
    _edit(bundle_copy, lambda m: m["preprocess"].update(input_size=0))
    with pytest.raises(BundleError, match="'preprocess.input_size' must be a positive integer"):
        Bundle.load(bundle_copy)


def test_no_members_is_refused(bundle_copy):
    _edit(bundle_copy, lambda m: m.update(members=[]))
    with pytest.raises(BundleError, match="'members' must name at least one model"):
        Bundle.load(bundle_copy)


def test_a_member_graph_exported_as_another_member_is_named(bundle_copy, caplog):
    shutil.copy(bundle_copy / "m0.onnx", bundle_copy / "m9.onnx")
    _edit(bundle_copy, lambda m: m["members"][0].update(name="m9", onnx="m9.onnx"))
    with caplog.at_level("WARNING", logger="wbc_edge.bundle"):
        Bundle.load(bundle_copy, trust_unsigned=True)  # m9.onnx has no checksum: its own copy
    assert "m9.onnx was exported as member 'm0', the manifest runs it as 'm9'" in caplog.text


def test_a_fused_graph_that_disagrees_with_the_members_is_refused(bundle_copy):
    from wbc_edge.build.builder import build_onnx

    build_onnx(Bundle.load(bundle_copy), fuse=True).save()
    _edit(bundle_copy, lambda m: m["members"][0].update(weight=2.0))
    with pytest.raises(BundleError, match="'fused.weights' .* differ from the members' weights"):
        Bundle.load(bundle_copy)
    n = len(json.loads((bundle_copy / "manifest.json").read_text())["members"])
    _edit(bundle_copy, lambda m: m["fused"].update(weights=[2.0] + [1.0] * (n - 1)))  # the graph has 1.0 built in
    with pytest.raises(BundleError, match=r"ensemble.onnx has weights \[1.0(, 1.0)+\] built in"):
        Bundle.load(bundle_copy)
    _edit(bundle_copy, lambda m: (m["members"][0].update(weight=1.0), m["fused"].update(members=["m9"])))
    with pytest.raises(BundleError, match="'fused.members' .* differs from the members"):
        Bundle.load(bundle_copy)


def test_unknown_views_are_refused_in_the_manifest_and_at_run_time(bundle_copy):
    from wbc_edge.edge.classifier import EnsembleClassifier
    from wbc_edge.edge.tta import parse_views

    _edit(bundle_copy, lambda m: m["tta"].update(views=["id", "foo"]))
    with pytest.raises(BundleError, match="'tta.views' must be a non-empty list of views"):
        Bundle.load(bundle_copy)
    _edit(bundle_copy, lambda m: m["tta"].update(views=["id"]))
    b = Bundle.load(bundle_copy)
    with pytest.raises(ValueError, match=r"unknown TTA views \['foo'\]"):
        EnsembleClassifier(b, views=["id", "foo"])  # before any runner starts
    with pytest.raises(ValueError, match=r"unknown TTA views \['foo'\]"):
        parse_views("id,foo")
    assert parse_views(" id , flip ") == ["id", "flip"] and parse_views(None) is None


# ---- defect 12: manifests that are no object; a version that is no number -----------------------------
@pytest.mark.parametrize("content", ["[]", "null", "[1, 2]", "\"bundle\"", "3"])
def test_a_manifest_that_is_no_object_is_refused(bundle_copy, content):
    (bundle_copy / "manifest.json").write_text(content)
    with pytest.raises(BundleError, match="manifest.json: must be a JSON object"):
        Bundle.load(bundle_copy)


@pytest.mark.parametrize("version", ["1", 1.0, True, None, 0])
def test_format_version_must_be_an_integer(bundle_copy, version):
    _edit(bundle_copy, lambda m: m.update(format_version=version))
    with pytest.raises(BundleError, match="'format_version' must be an integer") as err:
        Bundle.load(bundle_copy)
    assert "newer" not in str(err.value)


def test_other_field_types_are_named(bundle_copy):
    cases = [(lambda m: m.update(classes="LY"), "'classes' must be a non-empty list"),
             (lambda m: m["classes"].append(m["classes"][0]), "'classes' must not repeat"),
             (lambda m: m["preprocess"].update(std=[0.2, 0, 0.2]), "'preprocess.std' must be > 0"),
             (lambda m: m["preprocess"].update(mean=[0.5, 0.5]), "'preprocess.mean' must be 3 finite numbers"),
             (lambda m: m["preprocess"].update(interpolation="lanczos"), "'preprocess.interpolation' must be one of"),
             (lambda m: m.update(preprocess=None), "'preprocess' must be an object"),
             (lambda m: m.update(members={"m0": {}}), "'members' must be a list"),
             (lambda m: m["members"][0].pop("arch"), r"'members\[0\]' lacks \['arch'\]"),
             (lambda m: m["members"][0].update(colour="red"), r"'members\[0\]' has unknown keys \['colour'\]"),
             (lambda m: m.update(tta=None), "'tta' must be an object"),
             (lambda m: m["checksums"].update({"../x": "00"}), r"'checksums\.\.\./x' must stay inside")]
    for change, message in cases:
        work = bundle_copy.parent / "case"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(bundle_copy, work)
        _edit(work, change)
        with pytest.raises(BundleError, match=message):
            Bundle.load(work)


def test_save_signs_what_load_reads(bundle_copy):
    b = Bundle.load(bundle_copy)
    b.extra["note"] = ("a tuple", 1)  # written as a JSON list: the digest covers what is read back
    b.save()
    assert Bundle.load(bundle_copy).extra["note"] == ["a tuple", 1]
    b.extra["confidence"]["temperature"] = 0.0
    with pytest.raises(BundleError, match="confidence.temperature"):
        b.save()  # a bundle load() would refuse is never written
    assert Bundle.load(bundle_copy).temperature > 0


# ---- the command line: one line, no traceback, no output folder ---------------------------------------
def _cells(tmp_path, sample_dir):
    return copy_sample_cells(tmp_path / "cells")


def test_cli_refuses_an_edited_bundle_in_one_line(bundle_copy, sample_dir, tmp_path):
    from wbc_edge.cli import main

    data, out = _cells(tmp_path, sample_dir), tmp_path / "out"
    _edit(bundle_copy, _swap_ly_eo)
    r = CliRunner().invoke(main, ["evaluate", str(data), "--bundle", str(bundle_copy), "--out", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output and r.exception is not None
    line, = [ln for ln in r.output.splitlines() if ln.strip()]
    assert line.startswith("Error: ") and "was trained on classes" in line
    assert not out.exists()
    r = CliRunner().invoke(main, ["evaluate", str(data), "--bundle", str(bundle_copy), "--out", str(out),
                                  "--views", "id,foo"])
    assert r.exit_code == 2 and "unknown TTA views ['foo']" in r.output and not out.exists()


def test_cli_trust_unsigned_runs_a_bundle_without_checksums(bundle_copy, sample_dir, tmp_path):
    from wbc_edge.cli import main

    data, out = _cells(tmp_path, sample_dir), tmp_path / "out"
    _edit(bundle_copy, lambda m: m.pop("checksums"))
    args = ["evaluate", str(data), "--bundle", str(bundle_copy), "--out", str(out), "--no-refine"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "unsigned bundle" in r.output and not out.exists()
    r = CliRunner().invoke(main, ["--trust-unsigned", *args])
    assert r.exit_code == 0, r.output
    assert (out / "metrics.json").is_file()

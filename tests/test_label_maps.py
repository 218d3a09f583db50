"""Label maps: 5-part (coarse) labels load, unknown label folders are skipped and listed, and evaluate
scores a fine model on 5-part data with the mapped macro-F1 checked against scikit-learn."""
import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from wbc_edge import taxonomy as tx
from wbc_edge.data import datasets
from wbc_edge.evaluate import choose_label_map, evaluate

PARTS = ["NE", "LY", "MO", "EO", "BA"]
# the test's own 5-part reading of the sample bundle's classes (independent of taxonomy.LABEL_MAPS)
FIVE = {"SNE": "NE", "BNE": "NE", "MMY": "NE", "MY": "NE", "PMY": "NE",
        "LY": "LY", "MO": "MO", "EO": "EO", "BA": "BA"}
# site-check's reading: an immature granulocyte call for a (mature) NE cell is a miss
FIVE_STRICT = {**FIVE, "MMY": "OTHER", "MY": "OTHER", "PMY": "OTHER"}


@pytest.mark.parametrize("label, code", [
    ("NE", "NE"), ("neutrophil", "NE"), ("Neutrophils", "NE"), ("NEU", "NE"), ("Lymphocyte", "LY"),
    ("LYM", "LY"), ("monocyte", "MO"), ("MON", "MO"), ("eosinophils", "EO"), ("EOS", "EO"),
    ("basophil", "BA"), ("BAS", "BA"), ("segmented neutrophil", "SNE"), ("band", "BNE"), ("sne", "SNE"),
])
def test_coarse_and_fine_spellings_normalise(label, code):
    assert tx.normalise_code(label) == code


def test_5part_map_covers_fine_and_coarse_codes():
    m = tx.load_label_map("5part")
    assert m.parts == PARTS
    assert {c: m.label_part(c) for c in PARTS} == {c: c for c in PARTS}
    for code in tx.WBC_CODES:
        assert code in m.table
    assert m.label_part("BL") is None and m.pred_part("BL") == tx.OTHER  # a blast is no part: a miss
    assert m.label_part("ERB") is None and m.pred_part("ERB") == tx.OTHER
    strict = tx.load_label_map("5part-strict")
    assert strict.parts == PARTS and strict.pred_part("PMY") == tx.OTHER and strict.pred_part("BNE") == "NE"


def test_yaml_label_map_normalises_its_keys(tmp_path):
    path = tmp_path / "gran.yaml"
    path.write_text("neutrophil: granulocyte\nSNE: granulocyte\neosinophils: granulocyte\n"
                    "Lymphocyte: mononuclear\nmonocyte: mononuclear\nBL: other\n")
    m = tx.load_label_map(path)
    assert m.name == "gran" and m.parts == ["granulocyte", "mononuclear"]
    assert m.table == {"NE": "granulocyte", "SNE": "granulocyte", "EO": "granulocyte",
                       "LY": "mononuclear", "MO": "mononuclear", "BL": tx.OTHER}
    assert m.pred_part("BA") == tx.OTHER and m.label_part("BA") is None


@pytest.mark.parametrize("text, problem", [
    ("- NE\n- LY\n", "mapping"),
    ("NE: [LY\n", "cannot read"),
    ("NE: 3\n", "part must be"),
    ("neutrophil: NE\nNE: LY\n", "both"),
    ("", "mapping"),
])
def test_bad_yaml_label_map_names_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(tx.LabelMapError, match=re.escape(str(path)) + ".*" + problem):
        tx.load_label_map(path)


def test_unknown_label_map_name_is_an_error(tmp_path):
    with pytest.raises(tx.LabelMapError, match="7part"):
        tx.load_label_map("7part")


def test_automatic_map_only_for_coarse_labels():
    classes = ["BA", "EO", "LY", "MO", "SNE"]
    assert choose_label_map(None, ["SNE", "LY", "ERB", None], classes) is None  # scored as before
    assert choose_label_map(None, ["NE", "LY"], classes).name == "5part"
    assert choose_label_map("none", ["NE"], classes) is None
    assert choose_label_map("5part", ["SNE"], classes).parts == PARTS


def _folder(tmp_path, sample_dir, layout: dict[str, list[str]], n: int):
    """An ImageFolder of real cells: folder name -> the sample classes whose first `n` files it gets."""
    root = tmp_path / "cells"
    for name, sources in layout.items():
        (root / name).mkdir(parents=True)
        for src in sources:
            for p in sorted((sample_dir / "cells" / src).glob("*.jpg"))[:n]:
                shutil.copy(p, root / name / p.name)
    return root


def test_unknown_label_folder_is_skipped_and_listed(tmp_path, sample_dir, caplog):
    root = _folder(tmp_path, sample_dir, {"NE": ["SNE"], "LY": ["LY"], "XYZ": ["MO"]}, 3)
    with caplog.at_level(logging.WARNING, logger="wbc_edge.datasets"):
        ds = datasets.from_image_folder(root)
    assert ds.classes == ["LY", "NE"] and len(ds) == 6
    assert list(ds.skipped) == ["XYZ"] and len(ds.skipped["XYZ"]) == 3
    assert all(p.startswith(str(root / "XYZ")) for p in ds.skipped["XYZ"])
    assert any("XYZ" in r.getMessage() for r in caplog.records)


def test_unknown_manifest_label_is_skipped_and_listed(tmp_path, sample_dir):
    root = _folder(tmp_path, sample_dir, {"NE": ["SNE"], "LY": ["LY"]}, 2)
    rows = [(f"{d}/{p.name}", lab) for d, lab in (("NE", "neutrophil"), ("LY", "LY"), ("NE", "smudge"))
            for p in sorted((root / d).iterdir())]
    ds = datasets.from_manifest(datasets.write_manifest(root / "m.csv", rows))
    assert ds.labels == ["NE", "NE", "LY", "LY"]
    assert ds.skipped == {"smudge": [str(root / "NE" / p) for p in sorted(os.listdir(root / "NE"))]}


def _rows(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _check_mapped(rep, rows, name="5part", oracle=FIVE):
    """The mapped report agrees with scikit-learn on the rows' own label_mapped / pred_mapped, and
    those agree with the test's own reading `oracle` of the model's classes."""
    mapped = rep["mapped"]
    assert mapped["map"] == name and mapped["classes"] == PARTS
    scored = [r for r in rows if r.get("pred") and r.get("label_mapped")]
    assert mapped["n"] == len(scored) > 0
    for r in scored:
        assert r["pred_mapped"] == oracle[r["pred"]]
        assert r["label_mapped"] == oracle.get(r["label"], r["label"])
    y, p = [r["label_mapped"] for r in scored], [r["pred_mapped"] for r in scored]
    assert mapped["macro_f1"] == pytest.approx(f1_score(y, p, labels=PARTS, average="macro", zero_division=0))
    assert mapped["accuracy"] == pytest.approx(accuracy_score(y, p))
    per_class = f1_score(y, p, labels=PARTS, average=None, zero_division=0)
    np.testing.assert_allclose([mapped["per_class"][c]["f1"] for c in PARTS], per_class)


def test_evaluate_scores_5part_labels_beside_the_fine_ones(tmp_path, sample_dir, sample_bundle):
    layout = {"NE": ["SNE", "BNE"], "LY": ["LY"], "MO": ["MO"], "EO": ["EO"], "BA": ["BA"], "XYZ": ["PMY"]}
    root = _folder(tmp_path, sample_dir, layout, 4)
    (root / "LY" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    rep = evaluate(sample_bundle, root, out, progress=False)
    rows = _rows(out)
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    assert sorted(r["path"] for r in rows) == files and rep["n_inputs"] == len(files) == 29
    assert all(r.get("pred") or r.get("error") or r.get("note") for r in rows)  # a result or a reason
    assert rep["unknown_labels"] == {"XYZ": 4} and rep["n_unreadable"] == 1
    assert {r["label"] for r in rows} == set(layout)  # the dataset's own codes, as site-check reads them
    assert rep["scored_on"] == "model" and rep["n"] == 16  # fine report: the LY, MO, EO, BA cells
    assert rep["classes"] == json.loads((sample_bundle / "manifest.json").read_text())["classes"]
    _check_mapped(rep, rows)
    assert rep["mapped"]["n"] == 8 + 16
    assert json.loads((out / "metrics.json").read_text())["mapped"]["macro_f1"] == rep["mapped"]["macro_f1"]
    assert (out / "confusion_5part.png").stat().st_size > 0 and (out / "confusion.png").stat().st_size > 0


@pytest.mark.parametrize("name, oracle", [(None, FIVE), ("5part-strict", FIVE_STRICT)])
def test_evaluate_on_neutrophils_only_reports_mapped_scores_at_top_level(tmp_path, sample_dir, sample_bundle,
                                                                         name, oracle):
    root = _folder(tmp_path, sample_dir, {"neutrophil": ["SNE", "BNE", "MMY", "PMY"]}, 2)
    rep = evaluate(sample_bundle, root, tmp_path / "out", progress=False, label_map=name)
    name = name or "5part"
    assert rep["scored_on"] == name and rep["classes"] == PARTS and rep["n_scored"] == 8
    assert rep["macro_f1"] == rep["mapped"]["macro_f1"]
    assert not (tmp_path / "out" / "confusion.png").exists()
    assert (tmp_path / "out" / f"confusion_{name}.png").stat().st_size > 0
    _check_mapped(rep, _rows(tmp_path / "out"), name, oracle)


def test_evaluate_on_chula_subset_accounts_for_every_row(tmp_path, shared_data, sample_bundle):
    cells = shared_data / "chula-rpi" / "cells"
    if not cells.is_dir():
        pytest.skip("../shared/data/chula-rpi is not present on this machine")
    picked = [(p, p.parent.name) for d in sorted(cells.iterdir()) for p in sorted(d.iterdir())[:8]]
    rows = [(os.path.relpath(p, tmp_path), lab) for p, lab in picked]
    rows += [(os.path.relpath(picked[0][0], tmp_path), "smudge"), ("missing.jpg", "LY")]
    manifest = datasets.write_manifest(tmp_path / "subset.csv", rows)
    rep = evaluate(sample_bundle, manifest, tmp_path / "out", progress=False)
    out_rows = _rows(tmp_path / "out")
    assert len(out_rows) == rep["n_inputs"] == len(rows) == 42
    assert sorted(os.path.normpath(r["path"]) for r in out_rows) == \
        sorted(os.path.normpath(tmp_path / p) for p, _ in rows)
    assert rep["unknown_labels"] == {"smudge": 1} and rep["unreadable"][0]["path"].endswith("missing.jpg")
    _check_mapped(rep, out_rows)
    assert rep["mapped"]["n"] == 40

"""The site monitor (drift alarm) on real cells: the shipped bundle's training statistics, held-out PBC
cells (quiet), a severity-4 stain shift of them (fires), and what evaluate and stream write when it fires."""
import json
import shutil

import numpy as np
import pytest

from wbc_edge.bundle import Bundle
from wbc_edge.data.datasets import open_dataset, write_manifest
from wbc_edge.data.degrade import degrade_dataset
from wbc_edge.edge import drift
from wbc_edge.edge.pipeline import run_stream
from wbc_edge.edge.report import summary_text
from wbc_edge.evaluate import evaluate

FAST_FIT = {"max_cells": 44, "site_cells": 11, "n_groups": 20}


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _few(src, per_label: int, path):
    """A manifest of the first `per_label` cells of each label of `src`."""
    by = {}
    for s in open_dataset(src).samples:
        by.setdefault(s.label, []).append(s.path)
    rows = [(str(p), label) for label, ps in by.items() for p in ps[:per_label]]
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_manifest(path, rows)


@pytest.fixture(scope="module")
def stain4(tmp_path_factory, sample_dir):
    """A heavy stain shift (severity 4) of 6 held-out cells per label: another lab's dyes, per image."""
    tmp = tmp_path_factory.mktemp("stain4")
    few = _few(sample_dir / "cells", 6, tmp / "src" / "manifest.csv")
    degrade_dataset(few, tmp / "cells", "stain_shift", 4, seed=0, progress=False)
    return tmp / "cells"


@pytest.fixture
def no_drift_bundle(bundle_copy):
    b = Bundle.load(bundle_copy)
    b.extra.pop("drift", None)
    b.save()
    return bundle_copy


def test_shipped_bundle_carries_training_statistics(sample_bundle):
    sec = Bundle.load(sample_bundle).extra["drift"]
    assert sec["features"] == list(drift.FEATURES) and sec["threshold"] == drift.THRESHOLD
    assert sec["fitted_on"] and sec["n_cells"] >= 1000  # the training run's cells (its drift_cells.csv)
    ref = drift.Reference.from_section(sec)
    assert np.all(ref.spread > 0) and np.all(ref.spread[0] > ref.spread[-1])  # a 1-cell mean varies most


def test_fit_drift_round_trips_through_the_manifest(bundle_copy, sample_dir, tmp_path):
    cells = _few(sample_dir / "cells", 4, tmp_path / "fit" / "manifest.csv")
    section = drift.fit_drift(bundle_copy, cells, **FAST_FIT)
    stored = json.loads((bundle_copy / "manifest.json").read_text())["drift"]
    assert stored == json.loads(json.dumps(section))  # saved as returned, JSON-clean
    labels = {p.name for p in (sample_dir / "cells").iterdir() if p.is_dir()}
    assert stored["n_cells"] == 44 and set(stored["classes"]) == labels
    ref = drift.Reference.from_section(Bundle.load(bundle_copy).extra["drift"])
    assert ref.centre.shape == (len(drift.FEATURES),)
    assert ref.spread.shape == (len(drift.SIZES), len(drift.FEATURES))
    assert drift.DriftMonitor.for_bundle(Bundle.load(bundle_copy)).source == "training"


def test_pbc_held_out_cells_stay_quiet_and_are_calibrated(sample_bundle, sample_dir, tmp_path):
    rep = evaluate(sample_bundle, sample_dir / "cells", tmp_path / "ev", label_map="5part", progress=False)
    slide = rep["drift"]["slides"][""]
    assert rep["drift"]["reference"] == "training" and slide["n"] == 330
    assert slide["score"] < 0.5 * drift.THRESHOLD and not slide["alarm"]
    assert rep["reliable"] and rep["unreliable_reason"] is None and rep["n_site_shift"] == 0
    rows = _jsonl(tmp_path / "ev" / "predictions.jsonl")
    assert not any("flags" in r for r in rows)
    # confidence on the home site means what it says, on the fine classes and on the 5 parts: the bundle's
    # temperature (fitted on 205 cells no member trained on) takes the raw ensemble's fine-class ECE on
    # these 270 cells from 0.17 to 0.105 (three-member bundle; ECE on 270 cells moves by ~0.02 on its own)
    assert rep["ece"] < 0.12 and 0 <= rep["mapped"]["ece"] < 0.1
    assert (tmp_path / "ev" / "reliability_5part.png").stat().st_size > 0


def test_heavy_stain_shift_fires_and_holds_rare_calls(sample_bundle, stain4, tmp_path):
    rep = evaluate(sample_bundle, stain4, tmp_path / "ev", progress=False)
    slide = rep["drift"]["slides"][""]
    assert slide["alarm"] and slide["score"] > drift.THRESHOLD
    top = slide["top"][0]  # the report names the statistic that moved most, and by how much
    assert top["statistic"] in drift.FEATURES and abs(top["z"]) == pytest.approx(slide["score"], abs=0.01)
    assert not rep["reliable"] and "site shift" in rep["unreliable_reason"]
    assert "wbc-edge adapt" in rep["unreliable_reason"]
    rows = [r for r in _jsonl(tmp_path / "ev" / "predictions.jsonl") if r.get("pred")]
    assert all("site_shift" in r["flags"] for r in rows)
    rare = [r for r in rows if r["pred"] in {"PMY", "MY", "MMY"}]
    assert rare and all({"rare", "unverified"} <= set(r["flags"]) for r in rare)
    assert rep["n_rare_unverified"] == len(rare)
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["reliable"] is False and saved["drift"]["status"] == "alarm"


def test_stream_flags_cells_and_marks_the_differential_unreliable(sample_bundle, stain4, tmp_path):
    s = run_stream(stain4, sample_bundle, tmp_path / "st", mode="crops")
    assert s.exit_code == 0 and s.drift["alarm"] and s.drift["slides"][""]["fired_at_cell"] == drift.MIN_CELLS
    cells = _jsonl(tmp_path / "st" / "cells.jsonl")
    flagged = [c for c in cells if "site_shift" in c["flags"]]
    assert len(flagged) == len(cells) - (drift.MIN_CELLS - 1)  # latched from the 8th cell on
    assert all("unverified" in c["flags"] for c in flagged if "rare" in c["flags"])
    diff = json.loads((tmp_path / "st" / "differential.json").read_text())
    assert diff["reliable"] is False and "site shift" in diff["reason"] and diff["site_monitor"] == "alarm"
    assert all(a["held"] for a in diff["rare_alerts"].values())
    summary = json.loads((tmp_path / "st" / "summary.json").read_text())
    assert summary["differential"]["reliable"] is False and summary["drift"]["reason"] == diff["reason"]
    assert "WARNING: site shift" in summary_text(summary)
    assert "Warning.</b> site shift" in (tmp_path / "st" / "report.html").read_text()


def test_stream_on_home_cells_stays_quiet(sample_bundle, sample_dir, tmp_path):
    s = run_stream(sample_dir / "cells" / "SNE", sample_bundle, tmp_path / "st", mode="crops", report=False)
    assert s.drift["status"] == "ok" and not s.drift["alarm"]
    assert not any("site_shift" in c["flags"] for c in _jsonl(tmp_path / "st" / "cells.jsonl"))
    diff = json.loads((tmp_path / "st" / "differential.json").read_text())
    assert diff["reliable"] is True and diff["reason"] is None
    assert summary_text(s.to_dict()).splitlines()[-1].startswith("site monitor: ok")


def test_bundle_without_statistics_is_silent(no_drift_bundle, stain4, tmp_path):
    rep = evaluate(no_drift_bundle, stain4, tmp_path / "ev", progress=False)
    assert rep["drift"]["status"] == drift.NO_STATISTICS and rep["reliable"] and rep["n_site_shift"] == 0
    s = run_stream(stain4, no_drift_bundle, tmp_path / "st", mode="crops")
    assert s.exit_code == 0 and s.drift["status"] == drift.NO_STATISTICS and s.differential["reliable"]
    assert not any("site_shift" in c["flags"] for c in _jsonl(tmp_path / "st" / "cells.jsonl"))
    assert "site monitor: no training statistics" in summary_text(s.to_dict())


def test_adapted_bundle_compares_with_its_site(bundle_copy, stain4, tmp_path):
    drift.fit_site(bundle_copy, stain4, **FAST_FIT)  # what `wbc-edge adapt` records
    b = Bundle.load(bundle_copy)
    assert "drift" in b.extra["adapt"] and drift.DriftMonitor.for_bundle(b).source == "adapted site"
    rep = evaluate(bundle_copy, stain4, tmp_path / "ev", progress=False)
    assert rep["drift"]["reference"] == "adapted site" and not rep["drift"]["alarm"] and rep["reliable"]


def test_benchmark_quick(sample_bundle, tmp_path):
    from benchmarks import drift as bench

    b = tmp_path / "bundle"
    shutil.copytree(sample_bundle, b)
    bench.main(["--bundle", str(b), "--quick", "--out", str(tmp_path / "res")])
    data = json.loads((tmp_path / "res" / "drift.json").read_text())
    alarms = {r["set"]: r["alarm"] for r in data["rows"]}
    assert alarms["PBC held-out cells"] == "quiet" and alarms["PBC stain_shift s4"] == "FIRES"
    assert (tmp_path / "res" / "drift.png").stat().st_size > 0

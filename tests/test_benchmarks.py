"""Each benchmark runs end to end on a tiny input (no timing asserts: speed lives in the results)."""
import json

import pytest


def _payload(out, name):
    data = json.loads((out / f"{name}.json").read_text())
    assert data["machine"]["cores"] and (out / f"{name}.md").read_text().startswith(f"# {name}")
    return data


def test_robustness_quick(tmp_path):
    from benchmarks import robustness

    robustness.main(["--quick", "--out", str(tmp_path)])
    rows = _payload(tmp_path, "robustness")["rows"]
    assert rows[0]["kind"] == "clean" and len(rows) == 5
    assert (tmp_path / "robustness.png").stat().st_size > 0


def test_stain_quality_quick(tmp_path):
    pytest.importorskip("torchstain")
    from benchmarks import bench_stain_quality

    bench_stain_quality.main(["--quick", "--out", str(tmp_path)])
    data = _payload(tmp_path, "stain_quality")
    assert data["macenko"]["ours_img_s"] > 0 and len(data["lab_shift"]) == 4


def test_int8_quick(tmp_path, sample_dir):
    from benchmarks import bench_int8

    cells = str(sample_dir / "cells")
    bench_int8.main(["--calib", cells, "--val", cells, "--quick", "--out", str(tmp_path)])
    row = _payload(tmp_path, "int8")["result"]
    assert row["fp32_img_s"] > 0 and row["int8_img_s"] > 0 and 0 <= row["top1_agreement"] <= 1


def test_longtail_ablation_quick(tmp_path, shared_data):
    pytest.importorskip("torch")
    from benchmarks import longtail_ablation

    longtail_ablation.main(["--quick", "--recipes", "ce,decoupled", "--out", str(tmp_path)])
    results = _payload(tmp_path, "longtail_ablation")["results"]
    assert [r["recipe"] for r in results] == ["ce", "decoupled"]


def test_throughput_quick(tmp_path):
    pytest.importorskip("torchstain")
    pytest.importorskip("torch")
    from benchmarks import throughput

    throughput.main(["--quick", "--out", str(tmp_path)])
    row = _payload(tmp_path, "throughput")["rows"][0]
    assert row["ours_cells_s"] > 0 and row["raw_cells_s"] > 0 and row["baseline_cells_s"] > 0


def test_localise_quick(tmp_path):
    from benchmarks import bench_localise

    res = bench_localise.main(["--quick", "--out", str(tmp_path)])
    assert res["rows"][2]["frames"] == 8 and (tmp_path / "localise_examples.png").stat().st_size > 0


def test_stream_quick(tmp_path, sample_dir):
    from benchmarks import bench_stream

    rc = bench_stream.main(["--quick", "--source", str(sample_dir / "frames" / "JPEGImages"),
                            "--results", str(tmp_path)])
    data = _payload(tmp_path, "stream_quick")
    assert rc == 0 and data["frames"] == 60 and data["cells"] > 0


def test_bench_front_door(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "wbc_edge.cli", "bench", "robustness", "--quick", "--out",
                          str(tmp_path)], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "robustness.json").is_file()


def test_refinement_quick(tmp_path, sample_dir):
    from benchmarks import refinement

    cells = str(sample_dir / "cells")
    res = refinement.main(["--morph", cells, "--val", cells, "--test", cells, "--out", str(tmp_path)])
    names = [r["variant"] for r in res["rows"]]
    assert names[0] == "ensemble only" and len(names) == 10 and "as selected on validation [member]" in names
    data = _payload(tmp_path, "refinement")
    assert data["morphology"]["pairs"] and data["verify"]["member"]["n_prototypes"]


def test_cross_site_quick(tmp_path):
    from benchmarks import cross_site

    res = cross_site.main(["--quick", "--out", str(tmp_path)])
    sets = [r["set"] for r in _payload(tmp_path, "cross_site")["rows"]]
    assert sets[0] == "Chula cells" and "PBC cells" in sets and "Chula frames" in sets
    assert res["sets"]["pbc"]["mapped"]["5part"]["n"] > 0 and (tmp_path / "cross_site.png").stat().st_size > 0


def test_site_ablation_quick(tmp_path, shared_data):
    pytest.importorskip("torch")
    from benchmarks import site_ablation

    site_ablation.main(["--quick", "--variants", "site,gn", "--out", str(tmp_path)])
    rows = _payload(tmp_path, "site_ablation")["rows"]
    assert [r["variant"] for r in rows] == ["site", "gn"]
    assert all(0 <= r["pbc_9class"] <= 1 and 0 <= r["chula_5part-strict"] <= 1 for r in rows)
    assert (tmp_path / "site_ablation.png").stat().st_size > 0


def test_site_members_quick(tmp_path, shared_data, sample_bundle):
    from benchmarks import site_members

    site_members.main([f"shipped={sample_bundle}", "--quick", "--out", str(tmp_path)])
    (row,) = _payload(tmp_path, "site_members")["rows"]
    shipped = json.loads((sample_bundle / "manifest.json").read_text())
    assert row["variant"] == "shipped" and row["members"] == len(shipped["members"])
    assert all(m["arch"] in row["what"] for m in shipped["members"])
    assert 0 <= row["pbc_9class"] <= 1 and 0 <= row["chula_5part-strict"] <= 1
    assert (tmp_path / "site_members.png").stat().st_size > 0

"""Meeting a new site in three steps, on Chula (another hospital, a Raspberry Pi camera):

    python -m benchmarks.site_adapt [--bundle data/sample/bundle] [--draws 3] [--quick]

zero-shot (the bundle as it is), `wbc-edge adapt` on the site's unlabelled `split=train` cells (BatchNorm
statistics pooled over the site), and few-shot (`adapt --labels`, 20 labelled train cells per class,
`--draws` random draws). Everything is scored on the `split=valid` cells only (5-part macro-F1, `5part`
and `5part-strict`) and at home (PBC held-out sample cells, 9-class). Writes
benchmarks/results/site_adapt.{json,md}.
"""
from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, markdown_table, write_results
from wbc_edge.data.datasets import write_manifest
from wbc_edge.evaluate import evaluate
from wbc_edge.fit.adapt import adapt

ROOT = Path(__file__).resolve().parents[1]
CHULA = ROOT.parent / "shared" / "data" / "chula-rpi"


def manifests(work: Path, draws: int, shots: int, limit: int | None) -> dict:
    """Unlabelled train cells, labelled valid cells and `draws` few-shot sets (absolute paths)."""
    rows = list(csv.DictReader(open(CHULA / "manifest.csv")))
    train = [r for r in rows if r["split"] == "train"][:limit]
    valid = [r for r in rows if r["split"] == "valid"][:limit]
    path = lambda r: str((CHULA / r["path"]).resolve())  # noqa: E731
    out = {"train": write_manifest(work / "train.csv", ((path(r), "") for r in train)),
           "valid": write_manifest(work / "valid.csv", ((path(r), r["label"]) for r in valid)), "shots": []}
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        pick = [train[i] for c in sorted({r["label"] for r in train})
                for i in sorted(rng.permutation([i for i, r in enumerate(train) if r["label"] == c])[:shots])]
        out["shots"].append(write_manifest(work / f"shots{seed}.csv", ((path(r), r["label"]) for r in pick)))
    return out


def score(bundle, sets: dict, work: Path) -> dict:
    row = {}
    for lm in ("5part-strict", "5part"):
        r = evaluate(bundle, sets["valid"], work / f"ev-{lm}", progress=False, label_map=lm)
        row[f"chula_valid_{lm}"] = (r.get("mapped") or r)["macro_f1"]
    row["pbc_9class"] = evaluate(bundle, ROOT / "data" / "sample" / "cells", work / "ev-pbc", progress=False)["macro_f1"]
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", type=Path, default=ROOT / "data" / "sample" / "bundle")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="40 cells per split, 4 shots, one draw")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if not CHULA.is_dir():
        raise SystemExit(f"{CHULA} is not here: nothing to adapt to")
    shots, limit, draws = (4, 40, 1) if a.quick else (20, None, a.draws)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = manifests(work, draws, shots, limit)
        rows.append({"step": "zero-shot", **score(a.bundle, sets, work / "zs")})
        adapt(a.bundle, sets["train"], work / "adabn")
        rows.append({"step": "adapt (no labels)", **score(work / "adabn", sets, work / "adabn-ev")})
        for seed, labels in enumerate(sets["shots"]):
            adapt(a.bundle, sets["train"], work / f"few{seed}", labels=labels)
            rows.append({"step": f"adapt + {shots}/class labels (draw {seed})",
                         **score(work / f"few{seed}", sets, work / f"few{seed}-ev")})
    cols = ["step", "chula_valid_5part-strict", "chula_valid_5part", "pbc_9class"]
    table = (f"Bundle `{a.bundle}`. Chula: adaptation sees only `split=train` cells (unlabelled; few-shot: "
             f"{shots} labelled per class), scores only `split=valid`. Command: `python -m benchmarks.site_adapt"
             f"{' --quick' if a.quick else ''}`\n\n" + markdown_table(rows, cols))
    payload = {"bundle": str(a.bundle), "shots": shots, "rows": rows}
    write_results("site_adapt", payload, table, a.out)
    print(table)
    return payload


if __name__ == "__main__":
    main()

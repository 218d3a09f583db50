"""Refinement phases on held-out cells: macro-F1 and the configured pairs' confusion, per phase.

    python -m benchmarks.refinement --morph TRAIN_CELLS --val VAL_CELLS [--test data/sample/cells]

Phase 1 (logit offsets) is fitted on VAL; phase 3's morphology models on TRAIN_CELLS and its
threshold on VAL; every figure below is on TEST, which neither saw. Writes
benchmarks/results/refinement.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
from pathlib import Path

from benchmarks._common import RESULTS, markdown_table, write_results
from wbc_edge import metrics
from wbc_edge.bundle import Bundle
from wbc_edge.edge.classifier import EnsembleClassifier
from wbc_edge.edge.refine.biofilter import DEFAULT_PAIRS, pair_confusion
from wbc_edge.edge.refine.refiner import Refiner, fit_morphology, labelled, fit_refinement


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", type=Path, default=Path("data/sample/bundle"))
    ap.add_argument("--morph", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--test", default="data/sample/cells")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(a.bundle, Path(tmp) / "b")
        b = Bundle.load(Path(tmp) / "b")
        boost = fit_refinement(b, a.val)
        morph = fit_morphology(b, a.morph, a.val)
        x, y = labelled(b, a.test)
        with EnsembleClassifier(b) as clf:
            probs = clf.predict(x)
        full = copy.deepcopy(b.extra["refine"])
        variants = {"ensemble only": {}, "phase 1 (boost)": {"boost": {**full["boost"], "enabled": True}},
                    "phase 3 (morphology)": {"morphology": {**full["morphology"], "enabled": True}},
                    "phases 1+3": {"boost": {**full["boost"], "enabled": True},
                                   "morphology": {**full["morphology"], "enabled": True}},
                    "as enabled by validation": full}
        pairs = [tuple(p) for p in morph["pairs"]] or list(DEFAULT_PAIRS)
        rows = []
        for name, cfg in variants.items():
            pred = Refiner(cfg, b.classes)(probs, x)[0] if cfg else probs.argmax(1)
            rep = metrics.classification_report(y, pred, range(len(b.classes)))
            rows.append({"variant": name, "macro_f1": rep["macro_f1"], "balanced_accuracy": rep["balanced_accuracy"],
                         **{k: f"{v[list(v)[0]]}/{v[list(v)[1]]}"
                            for k, v in pair_confusion(y, pred, b.classes, pairs).items()}})
    table = (f"Test cells {a.test} ({len(y)}); phase 1 fitted on {a.val} (enabled by validation: "
             f"{boost['enabled']}); phase 3 models on {a.morph}, threshold close={morph['close']} on {a.val} "
             f"(enabled by validation: {morph['enabled']}). Pair columns: A->B / B->A errors.\n\n"
             + markdown_table(rows))
    write_results("refinement", {"boost": boost, "morphology": morph, "rows": rows}, table, a.out)
    print(table)
    return {"rows": rows}


if __name__ == "__main__":
    main()

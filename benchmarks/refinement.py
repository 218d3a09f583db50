"""Refinement phases on held-out cells: macro-F1 and the configured pairs' confusion, per phase.

    python -m benchmarks.refinement --morph TRAIN_CELLS --val VAL_CELLS [--test data/sample/cells]
        [--verify member --verify bundle:OTHER_BUNDLE ...]

With `--test val-half`, VAL is split per class (by path, alternately) into a half that fits and a
half that tests: a larger held-out set than the repo's 270 sample cells.

The confidence temperature and phase 1 (logit offsets) are fitted on VAL; phase 3's morphology models on TRAIN_CELLS and its
threshold on VAL; phase 2's prototypes (one run per --verify embedder) on TRAIN_CELLS and its rank
on VAL; every figure below is on TEST, which none of them saw. Writes
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
from wbc_edge.data.datasets import load_bundle_cells
from wbc_edge.edge.classifier import EnsembleClassifier
from wbc_edge.edge.confidence import fit_bundle_temperature, validation_cells
from wbc_edge.edge.refine.biofilter import DEFAULT_PAIRS, pair_confusion
from wbc_edge.edge.refine.refiner import (Refiner, fit_morphology, fit_refinement, fit_verification,
                                          select_phases)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", type=Path, default=Path("data/sample/bundle"))
    ap.add_argument("--morph", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--test", default="data/sample/cells", help="test cells, or 'val-half'")
    ap.add_argument("--verify", action="append", default=None, metavar="SOURCE",
                    help="phase 2 embedder (repeatable; default: member)")
    ap.add_argument("--name", default="refinement", help="results file name")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        shown = {"val": a.val, "test": a.test}
        if a.test == "val-half":
            shown = {"val": f"{a.val} (fit half)", "test": f"{a.val} (test half)"}
            a.val, a.test = _split_halves(a.val, Path(tmp))
        shutil.copytree(a.bundle, Path(tmp) / "b")
        b = Bundle.load(Path(tmp) / "b")
        cells = validation_cells(b, a.val)  # read and predicted once for every fit
        temperature = fit_bundle_temperature(b, a.val, val=cells)  # first, as `wbc-edge refine` does
        boost = fit_refinement(b, a.val, val=cells)
        morph = fit_morphology(b, a.morph, a.val, val=cells)
        x, y = load_bundle_cells(b, a.test)
        with EnsembleClassifier(b) as clf:
            probs = clf.predict(x)
        full = copy.deepcopy(b.extra["refine"])
        on = {name: {**full[name], "enabled": True} for name in ("boost", "morphology")}
        variants = {"ensemble only": {}, "phase 1 (boost)": {"boost": on["boost"]},
                    "phase 3 (morphology)": {"morphology": on["morphology"]},
                    "phases 1+3": on, "as enabled by validation (no phase 2)": full}
        pairs = [tuple(p) for p in morph["pairs"]] or list(DEFAULT_PAIRS)
        rows = [_row(name, cfg, b, probs, x, y, pairs) for name, cfg in variants.items()]
        verify, selected = {}, {}
        for source in a.verify or ["member"]:  # each fit replaces the bundle's embedder: score it right away
            verify[source] = fit_verification(b, a.morph, a.val, source, val=cells)
            v2 = {**b.extra["refine"]["verify"], "enabled": True}
            rows += [_row(name, cfg, b, probs, x, y, pairs) for name, cfg in {
                f"phases 1+2 [{source}]": {"boost": on["boost"], "verify": v2},
                f"phases 2+3 [{source}]": {"morphology": on["morphology"], "verify": v2},
                f"phases 1+2+3 [{source}]": {**on, "verify": v2},
                f"as enabled by validation [{source}]": copy.deepcopy(b.extra["refine"])}.items()]
            selected[source] = select_phases(b, a.val, val=cells)
            rows.append(_row(f"as selected on validation [{source}]", b.extra["refine"], b, probs, x, y, pairs))
    checked = "; ".join(f"{k}: rank {v['rank']}, enabled {v['enabled']}, phases selected jointly: "
                        f"{selected[k]['chosen']}" for k, v in verify.items())
    table = (f"Test cells {shown['test']} ({len(y)}); confidence temperature {temperature['temperature']} and "
             f"phase 1 fitted on {shown['val']} (enabled by validation: "
             f"{boost['enabled']}); phase 3 models on {a.morph}, threshold close={morph['close']} on {shown['val']} "
             f"(enabled by validation: {morph['enabled']}); phase 2 prototypes on {a.morph}, rank on {shown['val']} "
             f"({checked}). "
             "Pair columns: A->B / B->A errors; switched: cells whose class the refinement changed; vetoed: "
             "switches phase 2 undid.\n\n"
             + markdown_table(rows))
    write_results(a.name, {"temperature": temperature, "boost": boost, "morphology": morph, "verify": verify, "selected": selected, "rows": rows}, table, a.out)
    print(table)
    return {"rows": rows}


def _split_halves(val, tmp: Path) -> tuple[str, str]:
    from wbc_edge.data.datasets import open_dataset, write_manifest

    by_label: dict = {}
    for smp in open_dataset(val).samples:
        by_label.setdefault(smp.label, []).append(str(Path(smp.path).resolve()))  # the CSVs live elsewhere
    halves = ([], [])
    for label, paths in sorted(by_label.items()):
        for i, path in enumerate(sorted(paths)):
            halves[i % 2].append((path, label))
    names = []
    for name, rows in zip(("fit", "test"), halves):
        names.append(str(write_manifest(tmp / f"val_{name}.csv", rows)))
    return names[0], names[1]


def _row(name, cfg, b, probs, x, y, pairs) -> dict:
    refiner = Refiner(cfg, b.classes, b.root)
    pred, changes = refiner(probs, x) if cfg else (probs.argmax(1), [[] for _ in y])
    refiner.close()
    rep = metrics.classification_report(y, pred, range(len(b.classes)))
    return {"variant": name, "macro_f1": rep["macro_f1"], "balanced_accuracy": rep["balanced_accuracy"],
            "switched": int((pred != probs.argmax(1)).sum()),
            "vetoed": sum(any(c["phase"] == "verify" for c in ch) for ch in changes),
            **{k: f"{v[list(v)[0]]}/{v[list(v)[1]]}" for k, v in pair_confusion(y, pred, b.classes, pairs).items()}}


if __name__ == "__main__":
    main()

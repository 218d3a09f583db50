"""Robustness of a bundle to scanner and stain shift: metrics on clean cells and on every degradation
kind at severities 1-4 (wbc_edge.data.degrade), as a table and a plot.

    python -m benchmarks.robustness --bundle data/sample/bundle --data data/sample/cells [--kinds ...] [--quick]

Writes benchmarks/results/robustness.{json,md,png}.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, markdown_table, write_results
from wbc_edge import metrics
from wbc_edge.bundle import Bundle
from wbc_edge.data import degrade
from wbc_edge.data.datasets import open_dataset
from wbc_edge.edge.classifier import EnsembleClassifier
from wbc_edge.edge.preprocess import Preprocessor


def score(clf: EnsembleClassifier, images: np.ndarray, labels: list[str], classes: list[str], pre) -> dict:
    """Metrics as deployed: the bundle's preprocessor (impulse guard on each native-size cell, scale,
    resize, stain step), then the ensemble."""
    prepared = pre.crops(list(images))
    restored = int(prepared.restored.sum())
    pred = np.asarray(classes)[clf.predict(prepared.batch).argmax(1)]
    rep = metrics.classification_report(labels, list(pred), classes)
    return {**{k: rep[k] for k in ("macro_f1", "balanced_accuracy", "macro_precision", "macro_specificity")},
            "restored": int(restored)}


def plot(rows: list[dict], clean: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in dict.fromkeys(r["kind"] for r in rows if r["kind"] != "clean"):
        pts = [r for r in rows if r["kind"] == kind]
        ax.plot([r["severity"] for r in pts], [r["macro_f1"] for r in pts], "o-", label=kind)
    ax.axhline(clean, color="k", ls="--", label="clean")
    ax.set_xticks([1, 2, 3, 4])
    ax.set_xlabel("severity")
    ax.set_ylabel("macro-F1")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", type=Path, default=Path("data/sample/bundle"))
    ap.add_argument("--data", default="data/sample/cells")
    ap.add_argument("--kinds", default=",".join(degrade.KINDS))
    ap.add_argument("--views", default=None, help="comma-separated TTA views (default: the bundle's)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="robustness", help="result file stem")
    ap.add_argument("--no-guard", action="store_true", help="skip the bundle's impulse-noise restoration")
    a = ap.parse_args(argv)
    bundle = Bundle.load(a.bundle)
    pre = Preprocessor.for_bundle(bundle)
    if a.no_guard:
        pre.guard = None
    ds = open_dataset(a.data).filter_classes(bundle.classes)
    if a.quick:
        ds = ds.subset(range(0, len(ds), max(1, len(ds) // 18)))
    x, kept, errors = ds.load(progress=False)
    x = np.stack(x)
    labels = [ds.samples[i].label for i in kept]
    severities = (1, 4) if a.quick else (1, 2, 3, 4)
    kinds = a.kinds.split(",")[:2] if a.quick else a.kinds.split(",")
    with EnsembleClassifier(bundle, views=a.views.split(",") if a.views else None, precision=a.precision) as clf:
        rows = [{"kind": "clean", "severity": 0, **score(clf, x, labels, bundle.classes, pre)}]
        for kind in kinds:
            for sev in severities:
                xd = degrade.apply(x, kind, sev, np.random.default_rng([a.seed, sev]))
                rows.append({"kind": kind, "severity": sev, **score(clf, xd, labels, bundle.classes, pre)})
                print(f"{kind} s{sev}: macro-F1 {rows[-1]['macro_f1']:.4f}")
        views = clf.views
    clean = rows[0]["macro_f1"]
    for r in rows:
        r["delta_macro_f1"] = r["macro_f1"] - clean
    table = (f"Bundle {a.bundle} ({bundle.members[0].arch}, {a.precision}, views {views}, impulse guard "
             f"{'on' if pre.guard else 'off'}: `restored` counts the cells it restored); data {a.data}: "
             f"{len(labels)} cells, {len(errors)} unreadable.\n\n" + markdown_table(rows))
    write_results(a.name, {"bundle": str(a.bundle), "data": a.data, "views": views, "rows": rows}, table, a.out)
    plot(rows, clean, a.out / f"{a.name}.png")
    return {"rows": rows}


if __name__ == "__main__":
    main()

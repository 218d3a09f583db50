"""Long-tail ablation on real PBC cells: 100:1 exponentially imbalanced training set, balanced validation.

    python -m benchmarks.longtail_ablation [--epochs 30] [--recipes ce,decoupled,focal-logw] [--quick]

Every recipe trains the same member for the same stage-1 epochs (decoupled adds its head-only
stage 2 on the frozen backbone), keeps its *last* epoch (no selection on the reported set), and is
scored on the balanced set with ONNX Runtime. Writes benchmarks/results/longtail_ablation.{json,md,png}.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, markdown_table, write_results
from wbc_edge.data.datasets import from_image_folder, write_manifest
from wbc_edge.evaluate import evaluate
from wbc_edge.trainer.config import load_config
from wbc_edge.trainer.loop import train

ROOT = Path(__file__).resolve().parents[1]
PBC = ROOT.parent / "shared" / "data" / "pbc-176"
# Clinical frequency order: the common cells get the most examples, immature granulocytes the fewest.
ORDER = ["SNE", "LY", "MO", "EO", "BNE", "BA", "MY", "MMY", "PMY"]


def imbalanced_counts(largest: int, ratio: float, n: int) -> list[int]:
    return [int(round(largest * ratio ** (-i / (n - 1)))) for i in range(n)]


def write_splits(tmp: Path, largest: int, ratio: float, n_val: int, seed: int) -> tuple[Path, Path, dict]:
    held_out = {p.name for p in (ROOT / "data" / "sample" / "cells").rglob("*.jpg")}
    ds = from_image_folder(PBC, ORDER).exclude_names(held_out)
    rng = np.random.default_rng(seed)
    labels = np.asarray(ds.labels)
    counts = dict(zip(ORDER, imbalanced_counts(largest, ratio, len(ORDER))))
    train_rows, val_rows = [], []
    for code in ORDER:
        idx = rng.permutation(np.flatnonzero(labels == code))
        val_rows += [(ds.samples[i].path, code) for i in idx[:n_val]]
        train_rows += [(ds.samples[i].path, code) for i in idx[n_val:n_val + counts[code]]]
    for name, rows in (("train.csv", train_rows), ("val.csv", val_rows)):
        write_manifest(tmp / name, rows)
    return tmp / "train.csv", tmp / "val.csv", counts


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(rows)
    for k, r in enumerate(rows):
        ax.bar(np.arange(len(ORDER)) + k * width, [r[f"recall_{c}"] for c in ORDER], width,
               label=f"{r['recipe']} (macro-F1 {r['macro_f1']:.3f})")
    ax.set_xticks(np.arange(len(ORDER)) + 0.4 - width / 2, [f"{c}\n(n={n})" for c, n in zip(ORDER, rows[0]["n"])])
    ax.set_ylabel("recall on balanced val")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--stage2-epochs", type=int, default=5)
    ap.add_argument("--recipes", default="ce,decoupled,focal-logw")
    ap.add_argument("--member", default="mobilenetv3_small_100")
    ap.add_argument("--largest", type=int, default=800)
    ap.add_argument("--ratio", type=float, default=100.0)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if a.quick:
        a.epochs, a.stage2_epochs, a.largest, a.ratio, a.n_val = 1, 1, 16, 8.0, 4
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train_csv, val_csv, counts = write_splits(Path(tmp), a.largest, a.ratio, a.n_val, a.seed)
        for recipe in a.recipes.split(","):
            cfg = load_config(data=str(train_csv), val_data=str(val_csv), out=f"{tmp}/{recipe}", member=a.member,
                              recipe=recipe, epochs=a.epochs, stage2_epochs=a.stage2_epochs, seed=a.seed,
                              select_best=False, progress=not a.quick, input_size=64 if a.quick else None)
            bundle = train(cfg)
            rep = evaluate(bundle.root, val_csv, f"{tmp}/{recipe}/eval", views=["id"], progress=False)
            rows.append({"recipe": recipe, "macro_f1": rep["macro_f1"], "balanced_accuracy": rep["balanced_accuracy"],
                         "macro_precision": rep["macro_precision"], "train_seconds": bundle.extra["training"]["seconds"],
                         **{f"recall_{c}": rep["per_class"][c]["recall"] for c in ORDER},
                         "n": [counts[c] for c in ORDER]})
            print(f"{recipe}: macro-F1 {rep['macro_f1']:.4f}")
    cols = ["recipe", "macro_f1", "balanced_accuracy", "macro_precision"] + [f"recall_{c}" for c in ORDER] + \
           ["train_seconds"]
    table = (f"Training counts ({a.ratio:.0f}:1): {counts}; balanced validation: {a.n_val}/class; member "
             f"{a.member}; {a.epochs} epochs (+{a.stage2_epochs} head-only for decoupled); last epoch kept.\n\n"
             + markdown_table(rows, cols))
    payload = {"config": vars(a) | {"out": str(a.out)}, "counts": counts, "results": rows}
    write_results("longtail_ablation", payload, table, a.out)
    plot(rows, a.out / "longtail_ablation.png")
    return payload


if __name__ == "__main__":
    main()

"""Site-robust recipe ablation: each part's effect on a lab the model never saw and on the home lab.

    python -m benchmarks.site_ablation [--epochs 8] [--max-per-class 400] [--variants site,old,gn] [--quick]

Every variant trains the same member on the same PBC cells for the same budget (configs/pbc-cpu.yaml
with `--epochs`, `--max-per-class`, stage 2 of 2 epochs; the repo's sample cells excluded), then is
scored zero-shot on ../shared/data/chula-rpi/cells (all 511 cells, another hospital and a Raspberry
Pi camera; 5-part macro-F1, `5part-strict` = site-check's scoring, and `5part`) and on the held-out PBC
sample cells (9-class macro-F1). A bundle already in `--work`/NAME is scored, not retrained, so a long
run can be resumed. Writes benchmarks/results/site_ablation.{json,md,png}.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks._common import RESULTS, markdown_table, write_results
from wbc_edge.evaluate import evaluate
from wbc_edge.trainer.config import load_config
from wbc_edge.trainer.loop import train

ROOT = Path(__file__).resolve().parents[1]
CHULA = ROOT.parent / "shared" / "data" / "chula-rpi" / "cells"
VARIANTS = {  # name -> (what it is, config overrides); colour anchoring is on unless said
    "old": ("previous recipe: no site chain, no colour anchoring", {"site_augment": 0.0, "colour_anchor": False}),
    "anchor": ("previous recipe + colour anchoring", {"site_augment": 0.0}),
    "site": ("site-robust recipe: anchoring + scale + stain + optics", {"site_augment": 0.8}),
    "site-noanchor": ("site chain without colour anchoring", {"colour_anchor": False}),
    "nostain": ("site recipe without the dye-space stain part", {"site_parts": ["scale", "optics"]}),
    "nooptics": ("site recipe without the camera optics part", {"site_parts": ["scale", "stain"]}),
    "noscale": ("site recipe without magnification jitter", {"site_parts": ["stain", "optics"]}),
    "gn": ("site recipe, GroupNorm member", {"member": "mobilenetv3_small_100_gn"}),
}


def run_variant(name: str, work: Path, epochs: int, per_class: int) -> Path:
    out = work / name
    if not (out / "manifest.json").is_file():
        cfg = load_config(ROOT / "configs" / "pbc-cpu.yaml", out=str(out), epochs=epochs, max_per_class=per_class,
                          stage2_epochs=2, progress=False, data=str(ROOT.parent / "shared" / "data" / "pbc-176"),
                          exclude_from=str(ROOT / "data" / "sample" / "cells"), **VARIANTS[name][1])
        train(cfg)
    return out


def score(bundle: Path, tmp: Path, chula_limit: int | None) -> dict:
    row = {}
    tmp.mkdir(parents=True, exist_ok=True)
    if CHULA.is_dir():
        data = CHULA
        if chula_limit:  # --quick: a few cells of each class
            from wbc_edge.data.datasets import from_manifest, write_manifest

            ds = from_manifest(CHULA.parent / "manifest.csv")
            rows = [(s.path, s.label) for c in sorted(set(ds.labels))
                    for s in [x for x in ds.samples if x.label == c][:chula_limit]]
            data = write_manifest(tmp / "chula.csv", rows)
        for lm in ("5part-strict", "5part"):
            r = evaluate(bundle, data, tmp / f"chula-{lm}", progress=False, label_map=lm)
            row[f"chula_{lm}"] = (r.get("mapped") or r)["macro_f1"]
    r = evaluate(bundle, ROOT / "data" / "sample" / "cells", tmp / "pbc", progress=False)
    row["pbc_9class"] = r["macro_f1"]
    return row


def plot(rows: list[dict], path: Path, title: str = "site-robust recipe ablation (same budget per variant)") -> None:
    from wbc_edge.metrics import new_figure

    fig = new_figure((7, 3.6))
    ax = fig.add_subplot()
    names = [r["variant"] for r in rows]
    x = range(len(rows))
    for k, (col, label) in enumerate((("chula_5part-strict", "Chula 5-part (strict), unseen"),
                                      ("pbc_9class", "PBC 9-class, home"))):
        ax.bar([i + 0.4 * k - 0.2 for i in x], [r.get(col, 0) or 0 for r in rows], 0.4, label=label)
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    ax.set_ylabel("macro-F1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--max-per-class", type=int, default=400)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "ablation")
    ap.add_argument("--quick", action="store_true", help="1 epoch, 8 cells per class, 2 variants")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    variants = a.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if a.quick:
        a.epochs, a.max_per_class = 1, 8
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "runs" if a.quick else a.work
        for name in variants:
            bundle = run_variant(name, work, a.epochs, a.max_per_class)
            rows.append({"variant": name, "what": VARIANTS[name][0],
                         **score(bundle, Path(tmp) / name, 3 if a.quick else None)})
    cols = ["variant", "what", "chula_5part-strict", "chula_5part", "pbc_9class"]
    table = (f"Budget per variant: {a.epochs} epochs + 2 head epochs, at most {a.max_per_class} PBC cells per "
             f"class, mobilenetv3_small_100 at 128 px unless named, from scratch. Chula: all 511 cells, zero-shot "
             f"(never trained on). Command: `python -m benchmarks.site_ablation --epochs {a.epochs} "
             f"--max-per-class {a.max_per_class} --variants {','.join(variants)}`\n\n" + markdown_table(rows, cols))
    payload = {"epochs": a.epochs, "max_per_class": a.max_per_class, "rows": rows}
    write_results("site_ablation", payload, table, a.out)
    plot(rows, a.out / "site_ablation.png")
    print(table)
    return payload


if __name__ == "__main__":
    main()

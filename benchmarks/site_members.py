"""Full-budget bundles side by side: BatchNorm vs GroupNorm members, input size, ensembles.

    python -m benchmarks.site_members NAME=BUNDLE [NAME=BUNDLE ...]

`site_ablation` trains every variant on a small budget to isolate each part of the recipe; this scores
bundles trained with the full budget (the configs in `configs/`, `wbc-edge combine` ensembles) the same
way: Chula cells zero-shot (all 511, never trained on; 5-part strict and 5-part) and PBC held-out sample
cells (9-class). What each bundle is comes from its own manifest (members, input size, recipe, budget).
Writes benchmarks/results/site_members.{json,md,png}.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks._common import RESULTS, markdown_table, write_results
from benchmarks.site_ablation import plot, score
from wbc_edge.bundle import Bundle


def describe(bundle: Bundle) -> str:
    """Members, input size and the training that made them, from the manifest."""
    training = bundle.extra.get("training", {})
    sources = training.get("combined", {}).get("sources")
    if sources:
        return "ensemble of " + " + ".join(f"[{describe_config(s['training'].get('config', {}))}]" for s in sources)
    return describe_config(training.get("config", {}))


def describe_config(cfg: dict) -> str:
    if not cfg:
        return "?"
    start = f"from {cfg['pretrained_file']}" if cfg.get("pretrained_file") else "from scratch"
    return (f"{cfg.get('member') or ','.join(cfg.get('members') or [])} {cfg.get('input_size')} px, "
            f"{cfg.get('epochs')}+{cfg.get('stage2_epochs')} epochs {start}, site_augment {cfg.get('site_augment')}, "
            f"anchor {cfg.get('colour_anchor')}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bundles", nargs="+", metavar="NAME=BUNDLE")
    ap.add_argument("--quick", action="store_true", help="3 Chula cells per class")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true",
                    help="keep the rows of variants measured earlier (in --out) and not named now")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for item in a.bundles:
            name, _, path = item.partition("=")
            if not path:
                raise SystemExit(f"{item}: expected NAME=BUNDLE")
            b = Bundle.load(path)
            rows.append({"variant": name, "bundle": path, "what": describe(b),
                         "members": len(b.members), **score(Path(path), Path(tmp) / name, 3 if a.quick else None)})
    if a.keep and (a.out / "site_members.json").is_file():  # bundles no longer at hand keep their figures
        import json

        named = {r["variant"] for r in rows}
        earlier = json.loads((a.out / "site_members.json").read_text())
        rows = [{**r, "measured": r.get("measured") or earlier.get("machine", {}).get("date", "earlier")}
                for r in earlier["rows"] if r["variant"] not in named] + rows
    cols = ["variant", "what", "members", "chula_5part-strict", "chula_5part", "pbc_9class"]
    cols += ["measured"] if any("measured" in r for r in rows) else []
    table = ("Full-budget bundles. Chula: all 511 cells, zero-shot (never trained on); PBC: the 270 held-out "
             "sample cells of the model's classes. Command: `python -m benchmarks.site_members "
             + " ".join(a.bundles) + "`\n\n" + markdown_table(rows, cols))
    payload = {"rows": rows}
    write_results("site_members", payload, table, a.out)
    plot(rows, a.out / "site_members.png", "full-budget bundles: BN vs GN members, input size, ensembles")
    print(table)
    return payload


if __name__ == "__main__":
    main()

"""Learned restoration (issue 15): per degradation kind and severity, 9-class macro-F1 without and with the
restorer (gate + U-Net), PSNR/SSIM of the canonical cell against the clean one, the share of cells the gate
sent to the restorer, the cost per cell (gate on clean cells, restorer on gated ones, the classifier for
scale), and Chula zero-shot (../shared/tools/site-check) with and without.

    python -m benchmarks.restore --bundle data/sample/bundle --restorer NEW_BUNDLE [--quick]

Held-out cells: data/sample/cells (never trained on by the classifier or the restorer), degraded with the
project's own degradations as benchmarks/robustness.py does (seed [0, severity]); both arms classify with
the same members (the restorer bundle is a copy of --bundle plus its `restore` section).
Writes benchmarks/results/restore.{json,md,png}.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, markdown_table, write_results
from wbc_edge import metrics
from wbc_edge.bundle import Bundle
from wbc_edge.data import degrade
from wbc_edge.data.datasets import open_dataset
from wbc_edge.edge.classifier import EnsembleClassifier
from wbc_edge.edge.preprocess import Preprocessor
from wbc_edge.edge.quality import psnr, ssim

KINDS = ("gaussian_blur", "defocus_blur", "motion_blur", "illumination", "jpeg", "gaussian_noise")


def _load() -> dict:
    found = subprocess.run(["pgrep", "-f", "wbc-edge train"], capture_output=True, text=True, check=False)
    return {"training_running": bool(found.stdout.split()), "loadavg_1m": round(os.getloadavg()[0], 2)}


def arm(clf, pre, images, labels, classes) -> tuple[dict, np.ndarray]:
    """Macro-F1 as deployed through `pre`; and the canonical cells before the colour step."""
    prepared = pre.crops(list(images))
    pred = np.asarray(classes)[clf.predict(prepared.batch).argmax(1)]
    rep = metrics.classification_report(labels, list(pred), classes)
    canon = np.stack([pre.crop(im)[0] for im in images])
    gated = prepared.gate.restored if prepared.gate is not None else np.zeros(len(images), bool)
    return {"macro_f1": rep["macro_f1"], "gated": float(gated.mean())}, canon


def image_quality(cells, clean) -> dict:
    return {"psnr": float(np.mean([min(psnr(a, b), 60.0) for a, b in zip(cells, clean)])),
            "ssim": float(np.mean([ssim(a, b) for a, b in zip(cells, clean)]))}


def costs(pre_on, clean_canon, clf, n: int = 64) -> dict:
    """ms per cell: the gate on clean canonical cells (what a clean stream pays), the restorer graph on a
    batch of 32 cells, and the classifier (the bundle's views) on the same batch, for scale."""
    from benchmarks._common import time_median

    step, batch = pre_on.restorer, np.ascontiguousarray(clean_canon[:32])
    gate_ms = time_median(lambda: step.gate(clean_canon[:n]), 5) / min(n, len(clean_canon)) * 1e3
    restore_ms = time_median(lambda: step.restore(batch), 5) / len(batch) * 1e3
    clf_ms = time_median(lambda: clf.predict(batch), 5) / len(batch) * 1e3
    return {"gate_ms_per_cell": gate_ms, "restorer_ms_per_cell": restore_ms, "classifier_ms_per_cell": clf_ms,
            "clean_stream_rate_ratio": clf_ms / (clf_ms + gate_ms)}


def site_check(bundle: Path) -> dict:
    tool = Path("../shared/tools/site-check")
    if not tool.is_file():
        return {"line": "site-check: not here"}
    line = subprocess.run([str(tool), str(bundle)], capture_output=True, text=True, timeout=900).stdout.strip()
    m = re.search(r"macro-F1 ([0-9.]+), accuracy ([0-9.]+)", line)
    return {"line": line, **({"macro_f1_5part": float(m.group(1)), "accuracy": float(m.group(2))} if m else {})}


def plot(rows, clean, path: Path) -> None:
    from wbc_edge.metrics import new_figure

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig = new_figure((2.6 * len(kinds), 3))
    axes = fig.subplots(1, len(kinds), sharey=True)
    for ax, kind in zip(np.atleast_1d(axes), kinds):
        pts = [r for r in rows if r["kind"] == kind]
        ax.plot([r["severity"] for r in pts], [r["f1_off"] for r in pts], "o-", label="without")
        ax.plot([r["severity"] for r in pts], [r["f1_on"] for r in pts], "s-", label="with restorer")
        ax.axhline(clean, color="k", ls="--", lw=1)
        ax.set_title(kind, fontsize=8)
        ax.set_xticks([1, 2, 3, 4])
    np.atleast_1d(axes)[0].set_ylabel("macro-F1 (9 classes)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", type=Path, default=Path("data/sample/bundle"))
    ap.add_argument("--restorer", type=Path, required=True, help="the bundle with a `restore` section")
    ap.add_argument("--data", default="data/sample/cells")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="severity 4 only, no Chula")
    ap.add_argument("--no-chula", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="restore")
    a = ap.parse_args(argv)
    load_before = _load()
    base, rb = Bundle.load(a.bundle), Bundle.load(a.restorer)
    pre_off, pre_on = Preprocessor.for_bundle(base), Preprocessor.for_bundle(rb)
    if pre_on.restorer is None:
        raise SystemExit(f"{a.restorer}: no enabled `restore` section")
    ds = open_dataset(a.data).filter_classes(base.classes)
    images, kept, _ = ds.load(progress=False)
    x, labels = np.stack(images), [ds.samples[i].label for i in kept]
    rows = []
    with EnsembleClassifier(base) as clf:
        off, clean_canon = arm(clf, pre_off, x, labels, base.classes)
        on, _ = arm(clf, pre_on, x, labels, base.classes)
        clean = {"kind": "clean", "severity": 0, "f1_off": off["macro_f1"], "f1_on": on["macro_f1"],
                 "gated": on["gated"]}
        print(f"clean: {off['macro_f1']:.4f} / {on['macro_f1']:.4f} (gated {on['gated']:.3f})", flush=True)
        for kind in a.kinds.split(","):
            for sev in (4,) if a.quick else degrade.SEVERITIES:
                xd = degrade.apply(x, kind, sev, np.random.default_rng([a.seed, sev]))
                r_off, canon_off = arm(clf, pre_off, xd, labels, base.classes)
                r_on, _ = arm(clf, pre_on, xd, labels, base.classes)
                canon_on, _gate = pre_on.restore(canon_off)
                q_off, q_on = image_quality(canon_off, clean_canon), image_quality(canon_on, clean_canon)
                rows.append({"kind": kind, "severity": sev, "f1_off": r_off["macro_f1"], "f1_on": r_on["macro_f1"],
                             "cost_off": off["macro_f1"] - r_off["macro_f1"], "cost_on": off["macro_f1"] - r_on["macro_f1"],
                             "gated": r_on["gated"], "psnr_off": q_off["psnr"], "psnr_on": q_on["psnr"],
                             "ssim_off": q_off["ssim"], "ssim_on": q_on["ssim"]})
                print(f"{kind} s{sev}: {r_off['macro_f1']:.4f} -> {r_on['macro_f1']:.4f}, gated {r_on['gated']:.2f}, "
                      f"PSNR {q_off['psnr']:.2f} -> {q_on['psnr']:.2f}", flush=True)
        cost = costs(pre_on, clean_canon, clf)
    chula = {} if a.quick or a.no_chula else {"without": site_check(a.bundle), "with": site_check(a.restorer)}
    load = {"before": load_before, "after": _load()}
    gate = rb.extra["restore"]["gate"]
    text = (f"Classifier {a.bundle} ({base.members[0].arch}); restorer {a.restorer} "
            f"(gate {({k: round(v, 4) for k, v in gate.items() if isinstance(v, float)})}); data {a.data}: "
            f"{len(labels)} held-out cells, degraded as benchmarks/robustness.py does. cost_* = clean macro-F1 "
            f"minus this row's (points x 100 in the issue); gated = share of cells the gate sent to the "
            f"restorer; PSNR/SSIM of the canonical cell (before the colour step) against the clean one.\n\n"
            f"Clean: macro-F1 {clean['f1_off']:.4f} without, {clean['f1_on']:.4f} with (gated {clean['gated']:.3f}).\n\n"
            + markdown_table(rows)
            + "\n\nCost per cell (ms): " + ", ".join(f"{k} {v:.3g}" for k, v in cost.items())
            + (f"\n\nChula zero-shot without: {chula['without'].get('line')}\n\nChula zero-shot with: "
               f"{chula['with'].get('line')}" if chula else "")
            + f"\n\nMachine load: {load} (timings are valid only with training_running false).")
    payload = {"bundle": str(a.bundle), "restorer": str(a.restorer), "data": a.data, "clean": clean,
               "rows": rows, "cost": cost, "chula": chula, "load": load, "gate": gate}
    write_results(a.name, payload, text, a.out)
    plot(rows, clean["f1_off"], a.out / f"{a.name}.png")
    return payload


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - t0:.0f} s")

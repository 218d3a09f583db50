"""Cross-site: the bundle zero-shot on cells from sites it never trained on, beside its home site.

Three sets, one table, one figure of confusion matrices:
  Chula cells   ../shared/data/chula-rpi/cells (another hospital, Raspberry Pi camera, 5-part labels)
                through wbc_edge.evaluate, scored under the label maps `5part` (immature granulocyte
                calls count as NE) and `5part-strict` (they are errors: as ../shared/tools/site-check);
  PBC cells     data/sample/cells, the home site's held-out cells (9-class and 5-part);
  Chula frames  ../shared/data/chula-rpi/frames (1440x900, boxes and 5-part labels in frames.csv)
                through the stream pipeline: localiser recall/precision at IoU 0.3, the 5-part
                classification of the matched cells, rare-cell alerts per frame.
plus a scale row per set: the cells' median um/px and where it came from, against the bundle's.

    python -m benchmarks.cross_site [--bundle data/sample/bundle] [--chula ../shared/data/chula-rpi] [--quick]

Writes benchmarks/results/cross_site.{json,md,png}. A set whose data is absent is skipped with a note.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from benchmarks._common import RESULTS, markdown_table, write_results
from wbc_edge import metrics
from wbc_edge.bundle import read_manifest
from wbc_edge.data.datasets import open_dataset, write_manifest
from wbc_edge.edge.localise import match_pairs
from wbc_edge.evaluate import over_parts
from wbc_edge.taxonomy import OTHER, load_label_map

ROOT = Path(__file__).resolve().parents[1]
CHULA = ROOT.parent / "shared" / "data" / "chula-rpi"
MAPS = ("5part", "5part-strict")
IOU = 0.3
COLUMNS = ["set", "site", "n", "9-class macro-F1", "5part macro-F1", "5part-strict macro-F1", "5part acc",
           "5part-strict acc", "ECE", "loc recall@0.3", "loc precision@0.3", "rare alerts/frame",
           "median scale (um/px)", "scale_from", "predicted (fine classes)", "note"]


# --- inputs ----------------------------------------------------------------------------------------

def _few_cells(data, per_label: int, work: Path) -> Path:
    """A manifest of `per_label` cells of each label of `data`, spread over its files (--quick)."""
    by_label = defaultdict(list)
    for s in open_dataset(data).samples:
        by_label[s.label].append(s.path)
    rows = [(str(Path(p).resolve()), label) for label, paths in by_label.items()
            for p in paths[:: max(1, len(paths) // per_label)][:per_label]]
    work.mkdir(parents=True, exist_ok=True)
    return write_manifest(work / "manifest.csv", rows)


def _few_frames(frames: Path, n: int, work: Path) -> Path:
    """A folder of links to `n` frames spread over `frames` (--quick)."""
    files = sorted(p for p in frames.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    work.mkdir(parents=True, exist_ok=True)
    for p in files[:: max(1, len(files) // n)][:n]:
        (work / p.name).symlink_to(p.resolve())
    return work


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- summaries shared by the sets --------------------------------------------------------------------

def _scale(rows: list[dict]) -> dict:
    scales = [r["scale"] for r in rows if r.get("scale")]
    return {"median_um_per_px": float(np.median(scales)) if scales else None,
            "scale_from": dict(Counter(r.get("scale_from") or "none" for r in rows).most_common())}


def _makeup(rows: list[dict]) -> dict:
    return dict(Counter(r["pred"] for r in rows if r.get("pred")).most_common())


def _mapped(y_true: list[str], y_pred: list[str], map_name: str) -> dict | None:
    """5-part report (truth and predictions mapped), macro over the parts: OTHER is a miss, not a class."""
    lmap = load_label_map(map_name)
    pairs = [(lmap.label_part(t), lmap.pred_part(p)) for t, p in zip(y_true, y_pred)]
    pairs = [(t, p) for t, p in pairs if t]
    if not pairs:
        return None
    rep = over_parts(metrics.classification_report([t for t, _ in pairs], [p for _, p in pairs],
                                                   lmap.parts + [OTHER]), lmap.parts)
    return {k: rep[k] for k in ("n", "macro_f1", "accuracy", "confusion_classes", "confusion_matrix")}


# --- the sets -----------------------------------------------------------------------------------------

def score_cells(bundle: Path, data, work: Path) -> dict:
    """wbc_edge.evaluate under each label map -> the mapped reports, the 9-class one, make-up, scale."""
    from wbc_edge.evaluate import evaluate

    reports = {m: evaluate(bundle, data, work / m, label_map=m, progress=False) for m in MAPS}
    preds = _jsonl(work / MAPS[0] / "predictions.jsonl")
    classified = [r for r in preds if r.get("pred")]
    fine = reports[MAPS[0]] if reports[MAPS[0]]["scored_on"] == "model" else None
    mapped = {m: {k: rep["mapped"][k] for k in ("n", "macro_f1", "accuracy", "confusion_classes",
                                                  "confusion_matrix")} if rep.get("mapped") else None
              for m, rep in reports.items()}
    return {"n": len(classified), "n_inputs": len(preds), "mapped": mapped,
            "fine": {k: fine[k] for k in ("n", "classes", "macro_f1", "accuracy", "ece", "confusion_matrix")}
            if fine else None,
            "predicted": _makeup(classified), "scale": _scale(classified),
            "unscored_labels": reports[MAPS[0]]["unknown_labels"]}


def _truth_boxes(frames_csv: Path) -> dict[str, list[tuple[str, list[float]]]]:
    truth = defaultdict(list)
    with open(frames_csv, newline="") as f:
        for r in csv.DictReader(f):
            truth[r["frame"]].append((r["label"], [float(r[k]) for k in ("x0", "y0", "x1", "y1")]))
    return truth


def score_frames(bundle: Path, frames: Path, frames_csv: Path, work: Path) -> dict:
    """The stream pipeline on whole frames -> localiser counts, matched cells' 5-part scores, alerts."""
    from wbc_edge.edge.pipeline import run_stream

    summary = run_stream(str(frames), bundle, work, mode="frames", report=False)
    if summary.exit_code != 0:
        raise RuntimeError(f"stream on {frames} ended {summary.status}: {summary.error}")
    cells, truth = _jsonl(work / "cells.jsonl"), _truth_boxes(frames_csv)
    done = [Path(r["source"]).name for r in _jsonl(work / "frames.jsonl") if not r.get("error")]
    by_frame = defaultdict(list)
    for c in cells:
        by_frame[Path(c["source"]).name].append(c)
    tp = fp = fn = 0
    y_true, y_pred, ious = [], [], []
    for name in done:
        pred_boxes, gt = [c["box"] for c in by_frame[name]], truth.get(name, [])
        pairs = match_pairs(pred_boxes, [b for _, b in gt], IOU)
        tp, fp, fn = tp + len(pairs), fp + len(pred_boxes) - len(pairs), fn + len(gt) - len(pairs)
        ious += [v for _, _, v in pairs]
        for i, j, _ in pairs:
            y_true.append(gt[j][0])
            y_pred.append(by_frame[name][i]["pred"])
    rare = sum("rare" in c.get("flags", []) for c in cells)
    return {"frames": len(done), "truth_cells": tp + fn, "detections": len(cells),
            "tp": tp, "fp": fp, "fn": fn,
            "recall": tp / max(1, tp + fn), "precision": tp / max(1, tp + fp),
            "mean_iou": float(np.mean(ious)) if ious else None, "rare_alerts": rare,
            "rare_per_frame": rare / max(1, len(done)), "matched": len(y_true),
            "mapped": {m: _mapped(y_true, y_pred, m) for m in MAPS},
            "predicted": _makeup(cells), "scale": _scale(cells)}


# --- table and figure -----------------------------------------------------------------------------

def _fmt_counts(counts: dict, top: int = 5) -> str:
    items = list(counts.items())
    shown = ", ".join(f"{k} {v}" for k, v in items[:top])
    return shown + (f", +{sum(v for _, v in items[top:])} other" if len(items) > top else "")


def _metric_row(name: str, site: str, res: dict) -> dict:
    row = {"set": name, "site": site, "n": res.get("n", res.get("frames")),
           "predicted (fine classes)": _fmt_counts(res["predicted"])}
    for m in MAPS:
        rep = res["mapped"].get(m)
        if rep:
            row[f"{m} macro-F1"], row[f"{m} acc"] = rep["macro_f1"], rep["accuracy"]
    if res.get("fine"):
        row["ECE"] = res["fine"]["ece"]
    return row


def _scale_row(name: str, site: str, res: dict) -> dict:
    sc = res["scale"]
    return {"set": f"{name}: scale", "site": site, "n": sum(sc["scale_from"].values()),
            "median scale (um/px)": sc["median_um_per_px"] if sc["median_um_per_px"] else "-",
            "scale_from": _fmt_counts(sc["scale_from"])}


def rows_for(name: str, site: str, res: dict | None, skipped: str | None) -> list[dict]:
    if res is None:
        return [{"set": name, "site": site, "n": 0, "note": f"skipped: {skipped}"}]
    row = _metric_row(name, site, res)
    if "frames" in res:  # n is frames there; the cells are in the note
        row.update({"loc recall@0.3": res["recall"], "loc precision@0.3": res["precision"],
                    "rare alerts/frame": res["rare_per_frame"],
                    "note": f"{res['frames']} frames, {res['truth_cells']} true WBCs, {res['detections']} "
                            f"detections, {res['matched']} matched and scored"})
    elif res.get("fine") and res["fine"]["n"] and name.startswith("PBC"):
        row["9-class macro-F1"] = res["fine"]["macro_f1"]
        row["note"] = (f"9-class on {res['fine']['n']} cells; labels not scored: "
                       f"{_fmt_counts(res['unscored_labels']) or 'none'}")
    elif res.get("fine"):
        row["note"] = f"ECE over the {res['fine']['n']} cells labelled LY/MO/EO/BA (model classes)"
    return [row, _scale_row(name, site, res)]


def _draw(ax, cm, classes, title: str) -> None:
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    shown = cm / np.maximum(rows, 1)
    keep = [i for i, c in enumerate(classes) if rows[i, 0] > 0 or c != OTHER]  # OTHER: a column, no row
    ax.imshow(shown[keep], cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(classes)), [str(c) for c in classes], rotation=90)
    ax.set_yticks(range(len(keep)), [f"{classes[i]} ({int(rows[i, 0])})" for i in keep])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (n)")
    ax.set_title(title, fontsize=9)
    for r, i in enumerate(keep):
        for j in range(len(classes)):
            if cm[i, j]:
                ax.text(j, r, f"{shown[i, j]:.2f}", ha="center", va="center", fontsize=6.5,
                        color="white" if shown[i, j] > 0.5 else "black")


def plot(panels: list[tuple[str, dict | None]], path: Path) -> None:
    """Row-normalised confusion matrices side by side; a panel without data says why."""
    fig = metrics.new_figure((6.0 * len(panels), 5.4))
    for k, (title, rep) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), k)
        if rep is None:
            ax.axis("off")
            ax.text(0.5, 0.5, f"{title}\n\nnot available", ha="center", va="center")
            continue
        _draw(ax, rep["confusion_matrix"], rep.get("confusion_classes", rep.get("classes")), title)
    fig.suptitle("Cross-site confusion matrices (rows: true class, row-normalised; OTHER column: "
                 "immature granulocyte calls under 5part-strict)", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)


# --- main -----------------------------------------------------------------------------------------

def _run_sets(a, work: Path) -> dict:
    chula_ok = (a.chula / "cells").is_dir()
    why = f"{a.chula} is not present"
    steps = [("Chula cells", "chula", chula_ok), ("PBC cells", "pbc", Path(a.pbc).exists()),
             ("Chula frames", "frames", chula_ok and (a.chula / "frames.csv").is_file())]
    results = {}
    for name, key, ok in tqdm(steps, desc="cross-site sets", unit="set"):
        if not ok:
            results[key] = None
        elif key == "frames":
            frames = _few_frames(a.chula / "frames", 4, work / "qf") if a.quick else a.chula / "frames"
            results[key] = score_frames(a.bundle, frames, a.chula / "frames.csv", work / key)
        else:
            data = a.chula / "cells" if key == "chula" else Path(a.pbc)
            data = _few_cells(data, 2, work / f"q{key}") if a.quick else data
            results[key] = score_cells(a.bundle, data, work / key)
    return {"results": results, "skipped": {"chula": why, "pbc": f"{a.pbc} is not present", "frames": why}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("data/sample/bundle"))
    ap.add_argument("--chula", type=Path, default=CHULA, help="folder with cells/, frames/, frames.csv")
    ap.add_argument("--pbc", default="data/sample/cells", help="home-site held-out cells")
    ap.add_argument("--quick", action="store_true", help="2 cells per label, 4 frames (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="cross_site", help="result file stem")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cross_site_") as tmp:
        run = _run_sets(a, Path(tmp))
    res, skip = run["results"], run["skipped"]
    sets = [("Chula cells", "Chula (RPi camera), unseen", "chula"),
            ("PBC cells", "PBC (home), held out", "pbc"),
            ("Chula frames", "Chula (RPi camera), unseen", "frames")]
    rows = [r for name, site, key in sets for r in rows_for(name, site, res[key], skip[key])]
    train = read_manifest(a.bundle).get("scale") or {}
    rows.append({"set": "bundle training scale", "site": "PBC (home)", "n": train.get("n_images", ""),
                 "median scale (um/px)": train.get("um_per_px", "-"), "scale_from": "manifest.json"})
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    command = "python -m benchmarks.cross_site " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    table = (f"Bundle {a.bundle}, zero-shot on sites it never trained on, beside its home site. `5part`: "
             f"immature granulocyte calls count as NE; `5part-strict`: they are errors (as site-check). "
             f"Frames: localiser vs frames.csv boxes at IoU {IOU}, 5-part scores over the matched cells; "
             f"every true frame cell is a mature 5-part cell, so each rare alert is a false alarm. "
             f"ECE on the model's fine classes.\n\nCommand: `{command.strip()}`\n\n"
             + markdown_table(rows, columns))
    write_results(a.name, {"bundle": str(a.bundle), "chula": str(a.chula), "pbc": a.pbc, "quick": a.quick,
                           "command": command.strip(), "rows": rows, "sets": res, "training_scale": train},
                  table, a.out)
    strict = lambda key: ((res[key] or {}).get("mapped") or {}).get("5part-strict")  # noqa: E731
    plot([("Chula cells, 5part-strict", strict("chula")),
          ("PBC held-out cells, 9-class", (res["pbc"] or {}).get("fine")),
          ("Chula frames (matched cells), 5part-strict", strict("frames"))], a.out / f"{a.name}.png")
    return {"rows": rows, "sets": res}


if __name__ == "__main__":
    main()

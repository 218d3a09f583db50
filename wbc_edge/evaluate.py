"""`wbc-edge evaluate`: classify a labelled dataset with a bundle on a runner, score it, draw it.

Scored twice when a label map is in use: on the model's own classes (cells labelled with one of them),
and on the map's parts (cells whose label maps to one; predictions are mapped too). That lets a
13-class model be checked on another lab's 5-part labels without pretending it predicts NE.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from . import metrics
from .bundle import Bundle
from .data.datasets import open_dataset
from .data.wbcbench import write_submission
from .edge import tta
from .edge.classifier import EnsembleClassifier
from .edge.drift import DriftMonitor, RecordingClassifier, flag_row
from .edge.offline import classify_dataset, write_jsonl
from .edge.preprocess import Preprocessor
from .edge.refine.refiner import Refiner
from .edge.sinks import atomic_write_text
from .outdir import owns_output
from .taxonomy import FIVE_PARTS, OTHER, RARE_CODES, LabelMap, load_label_map

log = logging.getLogger("wbc_edge.evaluate")


# --out is claimed before any work (writable, locked against a second run, the last run's outputs removed)
@owns_output("out_dir", ("metrics.json", "predictions.jsonl", "submission.csv", "confusion*.png",
                         "reliability*.png"))
def evaluate(bundle_dir, data, out_dir, device: str = "cpu", precision: str = "fp32", views=None,
             batch_size: int = 64, progress: bool = True, refine: bool = True, label_map=None,
             pixel_size: float | None = None, scale_per: str = "slide", server: str | None = None) -> dict:
    """Score the bundle on `data`; inputs whose label can be scored neither on the model's classes nor
    through `label_map` (a name, a YAML file, "none"; None: automatic) are listed, not scored. The
    cells' physical scale is `pixel_size` (um/px) when given, else estimated per slide (the dataset, or
    its `group` column) or per image (`scale_per`)."""
    bundle = Bundle.load(bundle_dir)
    views = tta.check_views(views) if views is not None else None  # refused before any cell is read
    ds = open_dataset(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pre = Preprocessor.for_bundle(bundle, pixel_size, same_scale=scale_per == "slide")
    monitor = DriftMonitor.for_bundle(bundle)
    rows, run = _classify(bundle, ds, pre, device, precision, views, batch_size, progress, refine, monitor,
                          server)
    drift = _site_monitor(rows, ds, monitor)
    rows += _skipped_rows(ds)
    lmap = choose_label_map(label_map, [r["label"] for r in rows], bundle.classes)
    _annotate(rows, bundle.classes, lmap)
    write_jsonl(rows, out / "predictions.jsonl")
    images = [r for r in rows if not r.get("skipped")]  # a LICENSE beside the cells is no submission row
    write_submission(out / "submission.csv", [Path(r["path"]).name for r in images],
                     [r["pred"] or "" for r in images])
    fine = _fine_report(rows, bundle.classes, out)
    mapped = _mapped_report(rows, lmap, out, bundle.classes) if lmap else None
    if fine is None and mapped is None:
        via = f" or to a part of label map {lmap.name}" if lmap else ""
        raise ValueError(f"{data}: no readable images with a label among the model's classes "
                         f"{bundle.classes}{via}")
    report = dict(fine, scored_on="model") if fine else dict(mapped, scored_on=lmap.name)
    unknown = Counter(r["label"] for r in rows if r.get("note"))
    report.update({"bundle": str(bundle_dir), "data": str(data), "precision": precision, **run,
                   "n_inputs": len(rows), "n_scored": report["n"],
                   "n_unreadable": sum(1 for r in rows if r.get("error")),
                   "n_restored": sum(1 for r in rows if r.get("restored")),
                   "n_restored_learned": sum(1 for r in rows if r.get("restored") == "learned"),
                   "n_unknown_label": sum(unknown.values()), "unknown_labels": dict(unknown),
                   "n_skipped": sum(1 for r in rows if r.get("skipped")),
                   "unreadable": [{"path": r["path"], "reason": r["error"]} for r in rows if r.get("error")],
                   "files": ["metrics.json", "predictions.jsonl", "submission.csv"]
                   + (["confusion.png", "reliability.png"] if fine else [])
                   + ([f"confusion_{lmap.name}.png", f"reliability_{lmap.name}.png"] if mapped else []),
                   "drift": drift, "reliable": drift["reliable"], "unreliable_reason": drift["reason"],
                   "n_site_shift": sum(1 for r in rows if "site_shift" in r.get("flags", ())),
                   "n_rare_unverified": sum(1 for r in rows if "unverified" in r.get("flags", ()))})
    if mapped:
        report["mapped"] = mapped
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2))  # never half a file (full disk)
    return report


def _classify(bundle, ds, pre, device, precision, views, batch_size, progress, refine,
              monitor=None, server=None) -> tuple[list[dict], dict]:
    """One row per sample of `ds`, and what ran: runner, views, whether refinement was applied. With a
    site `monitor`, each classified row gets its `drift_features` (measured on its model-input cell)."""
    with EnsembleClassifier(bundle, device, views, precision, server=server) as clf:
        refiner = Refiner.for_bundle(bundle, refine, device)
        rec = RecordingClassifier(clf, monitor)
        try:
            rows = list(classify_dataset(rec, ds, batch_size, progress=progress, refiner=refiner, pre=pre))
        finally:
            refiner.close()
        rec.attach([r for r in rows if r.get("pred")])
        run = {"runner": clf.runner_name, "refined": refiner.active, "views": clf.views}
        return rows, {**run, "server": clf.server_report} if server else run


def _site_monitor(rows, ds, monitor: DriftMonitor) -> dict:
    """Pool the rows' statistics per slide (the dataset, or its `group` column, as for the scale), flag
    the rows of a slide above the threshold (`site_shift`; a rare-cell call `rare` + `unverified`)."""
    group = {s.path: s.group or "" for s in ds.samples}
    slides: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("drift_features") is not None:
            slides.setdefault(group.get(r["path"], ""), []).append(r)
    for slide, rs in slides.items():
        alarm = monitor.add(slide, np.stack([r["drift_features"] for r in rs]))
        for r in rs:
            if alarm:
                r["flags"] = ["rare"] if r["pred"] in RARE_CODES else []
                flag_row(r, True)
    for r in rows:
        r.pop("drift_features", None)
    drift = monitor.report()
    if drift["alarm"]:
        log.warning("%s", drift["reason"])
    return drift


def _skipped_rows(ds) -> list[dict]:
    # files under a label that is no class code were never classified; they still get a row, so that
    # every input is accounted for in predictions.jsonl
    return [{"path": p, "label": label, "pred": None,
             "note": f"label {label!r} is no known class code; not classified"}
            for label, paths in ds.skipped.items() for p in paths] + \
        [{"path": s.path, "label": None, "pred": None, "skipped": s.reason} for s in ds.ignored]


def choose_label_map(spec, labels, classes) -> LabelMap | None:
    """The label map `spec` names ("none": no map). None (automatic): the 5-part map when some labels
    outside the model's classes are 5-part codes (a lab's NE), else no map, so that data labelled with
    the model's own classes is scored exactly as without maps."""
    if spec is not None:
        return None if str(spec).lower() == "none" else load_label_map(spec)
    outside = set(labels) - set(classes)
    return load_label_map("5part") if outside & set(FIVE_PARTS) else None


def _annotate(rows, classes, lmap: LabelMap | None) -> None:
    """Add the mapped label and prediction to each row; say why a classified row is not scored."""
    for r in rows:
        if lmap is not None:
            r["label_mapped"] = lmap.label_part(r["label"])
            r["pred_mapped"] = lmap.pred_part(r["pred"]) if r.get("pred") else None
        if r.get("pred") and r["label"] not in classes and not r.get("label_mapped"):
            via = f" nor of a part of label map {lmap.name}" if lmap else ""
            r["note"] = f"label {r['label']} is not a class of this model{via}; not scored"


def _score(rows, true_key: str, pred_key: str, classes: list, png: Path):
    """Report over the classified rows whose `true_key` is in `classes`, its confusion matrix drawn
    to `png` -> (report or None if no row qualifies, the scored rows)."""
    scored = [r for r in rows if r.get("pred") and r.get(true_key) in classes]
    if not scored:
        return None, scored
    y_true, y_pred = [r[true_key] for r in scored], [r[pred_key] for r in scored]
    report = metrics.classification_report(y_true, y_pred, classes)
    report["n_refined"] = sum(1 for r in scored if r.get("pred_raw", r["pred"]) != r["pred"])
    metrics.plot_confusion(np.asarray(report["confusion_matrix"]), classes, png)
    return report, scored


def _fine_report(rows, classes, out: Path) -> dict | None:
    """Scores on the model's own classes, with calibration (it needs the truth among the classes)."""
    report, scored = _score(rows, "label", "pred", classes, out / "confusion.png")
    if report is not None:
        idx = {c: i for i, c in enumerate(classes)}
        probs = np.stack([r["probs"] for r in scored])
        y_idx = np.asarray([idx[r["label"]] for r in scored])
        report["ece"] = metrics.expected_calibration_error(probs, y_idx)
        metrics.plot_reliability(probs, y_idx, out / "reliability.png")
    return report


def _mapped_report(rows, lmap: LabelMap, out: Path, classes: list[str]) -> dict | None:
    png = out / f"confusion_{lmap.name}.png"
    report, scored = _score(rows, "label_mapped", "pred_mapped", lmap.parts + [OTHER], png)
    if report is None:
        return None
    # calibration on the map's parts: a part's probability is the sum over the model classes it takes
    # (what a 5-part count would report); OTHER takes the classes no part does
    columns = lmap.parts + [OTHER]
    to_part = np.zeros((len(classes), len(columns)))
    to_part[np.arange(len(classes)), [columns.index(lmap.pred_part(c)) for c in classes]] = 1.0
    probs = np.stack([r["probs"] for r in scored]) @ to_part
    y_idx = np.asarray([columns.index(r["label_mapped"]) for r in scored])
    report["ece"] = metrics.expected_calibration_error(probs, y_idx)
    metrics.plot_reliability(probs, y_idx, out / f"reliability_{lmap.name}.png")
    return {"map": lmap.name, "table": lmap.table, **over_parts(report, lmap.parts)}


def over_parts(report: dict, parts: list[str]) -> dict:
    """`report` (over parts + OTHER) averaged over the parts only: OTHER is a column for predictions no
    part fits, a miss for the cell's true part, not a class (no cell's truth is OTHER)."""
    per_class = {p: report["per_class"][p] for p in parts}
    macro = {k: float(np.mean([row[k] for row in per_class.values()])) for k in report["macro"]}
    return {**report, "classes": list(parts), "confusion_classes": report["classes"], "per_class": per_class,
            "macro": macro, "macro_f1": macro["f1"], "balanced_accuracy": macro["recall"],
            "macro_precision": macro["precision"], "macro_specificity": macro["specificity"]}

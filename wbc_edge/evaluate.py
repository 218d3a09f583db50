"""`wbc-edge evaluate`: classify a labelled dataset with a bundle on a runner, score it, draw it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import metrics
from .bundle import Bundle
from .data.datasets import open_dataset
from .data.wbcbench import write_submission
from .edge.classifier import EnsembleClassifier
from .edge.offline import classify_dataset, write_jsonl
from .edge.refine.refiner import Refiner


def evaluate(bundle_dir, data, out_dir, device: str = "cpu", precision: str = "fp32", views=None,
             batch_size: int = 64, progress: bool = True, refine: bool = True) -> dict:
    """Score the bundle on `data`; inputs whose label the model does not know are listed, not scored."""
    bundle = Bundle.load(bundle_dir)
    ds = open_dataset(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with EnsembleClassifier(bundle, device, views, precision) as clf:
        refiner = Refiner.for_bundle(bundle, refine, device)
        try:
            rows = list(classify_dataset(clf, ds, batch_size, progress=progress, refiner=refiner))
        finally:
            refiner.close()
        runner = clf.runners[0].name
    for r in rows:
        if r.get("pred") and r["label"] not in bundle.classes:
            r["note"] = f"label {r['label']} is not a class of this model; not scored"
    write_jsonl(rows, out / "predictions.jsonl")
    write_submission(out / "submission.csv", [Path(r["path"]).name for r in rows], [r["pred"] or "" for r in rows])
    scored = [r for r in rows if r.get("pred") and r["label"] in bundle.classes]
    if not scored:
        raise ValueError(f"{data}: no readable images with a label among the model's classes {bundle.classes}")
    y_true = [r["label"] for r in scored]
    y_pred = [r["pred"] for r in scored]
    report = metrics.classification_report(y_true, y_pred, bundle.classes)
    idx = {c: i for i, c in enumerate(bundle.classes)}
    probs = np.stack([r["probs"] for r in scored])
    y_idx = np.asarray([idx[c] for c in y_true])
    report.update({"bundle": str(bundle_dir), "data": str(data), "runner": runner, "precision": precision,
                   "refined": refiner.active,
                   "n_refined": sum(1 for r in scored if r.get("pred_raw", r["pred"]) != r["pred"]),
                   "views": clf.views, "n_inputs": len(rows), "n_scored": len(scored),
                   "n_unreadable": sum(1 for r in rows if r.get("error")),
                   "n_restored": sum(1 for r in rows if r.get("restored")),
                   "n_unknown_label": sum(1 for r in rows if r.get("note")),
                   "ece": metrics.expected_calibration_error(probs, y_idx),
                   "unreadable": [{"path": r["path"], "reason": r["error"]} for r in rows if r.get("error")]})
    metrics.plot_confusion(np.asarray(report["confusion_matrix"]), bundle.classes, out / "confusion.png")
    metrics.plot_reliability(probs, y_idx, out / "reliability.png")
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    return report

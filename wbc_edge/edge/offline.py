"""Classify a dataset of single-cell crops in batches; every input becomes one result row.

A row carries the prediction and top-k probabilities, or an `error` saying why it has none.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.datasets import CellDataset
from .classifier import EnsembleClassifier
from .preprocess import Preprocessor


def _read_chunk(ds: CellDataset, idx, pre: Preprocessor):
    """(prepared cells or None, dataset indices of its rows, error rows by dataset index)."""
    idx = list(idx)
    batch, kept, errors, prepared = pre.load(ds.subset(idx))
    # by index, not path: a manifest may list one (unreadable) file twice, and each row gets its reason
    rows = {idx[e.index]: {"path": e.path, "label": ds.samples[idx[e.index]].label, "pred": None,
                           "error": e.reason} for e in errors}
    return (prepared if len(kept) else None), [idx[k] for k in kept], rows


def classify_dataset(clf: EnsembleClassifier, ds: CellDataset, batch_size: int = 64, top_k: int = 3,
                     progress: bool = True, refiner=None, pre: Preprocessor | None = None):
    """Yield one row per sample, in dataset order (refined, with the changes recorded, if a refiner is
    given); each row carries the cell's scale and where it came from."""
    classes = clf.bundle.classes
    pre = pre or Preprocessor.for_bundle(clf.bundle)
    bar = tqdm(total=len(ds), desc="classifying", unit="cell", disable=not progress)
    for start in range(0, len(ds), batch_size):
        idx = range(start, min(start + batch_size, len(ds)))
        prepared, ok, rows = _read_chunk(ds, idx, pre)
        if prepared is not None:
            batch = prepared.batch
            probs = clf.predict(batch)
            final, changes = refiner(probs, batch) if refiner is not None and refiner.active \
                else (probs.argmax(1), None)
            for n, (i, p) in enumerate(zip(ok, probs)):
                top = np.argsort(-p)[:top_k]
                rows[i] = {"path": ds.samples[i].path, "label": ds.samples[i].label, "pred": classes[final[n]],
                           "confidence": float(p[final[n]]),
                           "top_k": [[classes[j], round(float(p[j]), 6)] for j in top],
                           **prepared.scales[n].as_row(), "probs": p}
                if changes and changes[n]:
                    rows[i].update(pred_raw=changes[n][0]["from"], refine=changes[n])
                if prepared.restored[n]:
                    rows[i]["restored"] = "impulse_noise"
                if prepared.gate is not None:  # the quality gate's scores; `restored: learned` where it restored
                    rows[i].update(prepared.gate.row(n))
                    if prepared.gate.restored[n]:
                        rows[i].setdefault("restored", "learned")
        for i in idx:
            yield rows[i]
        bar.update(len(idx))
    bar.close()


def write_jsonl(rows, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k != "probs"}) + "\n")
    return path

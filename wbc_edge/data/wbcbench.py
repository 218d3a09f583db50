"""The WBCBench 2026 submission format: a CSV with columns `ID,labels` (one predicted code per image)."""
from __future__ import annotations

import csv
from pathlib import Path

from ..taxonomy import normalise_code


def read_submission(path) -> dict[str, str]:
    """`ID -> code`; a duplicated ID or unknown label is an error naming the line."""
    out: dict[str, str] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or [c.strip() for c in reader.fieldnames[:2]] != ["ID", "labels"]:
            raise ValueError(f"{path}: expected header 'ID,labels', got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            key = row["ID"].strip()
            if key in out:
                raise ValueError(f"{path}:{line}: duplicate ID {key!r}")
            out[key] = normalise_code(row["labels"])
    return out


def write_submission(path, ids, labels) -> Path:
    """Write predictions in submission order; IDs are file names without folders."""
    ids, labels = list(ids), list(labels)
    if len(ids) != len(labels):
        raise ValueError(f"{len(ids)} IDs but {len(labels)} labels")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ID", "labels"])
        w.writerows(zip(ids, labels))
    return path

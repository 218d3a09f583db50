"""Stream sinks: where classified cells go. Each sink gets every `FrameResult` in stream order.

Sinks write as they go and are flushed by the pipeline about once a second and on Ctrl-C, so a run
that is stopped keeps everything already classified. A write that fails (full disk, folder gone)
raises an OSError naming the sink's file (`write_failed`), which ends the run as `failed`. None of them keeps a per-frame history in RAM:
counts are counters, galleries are fixed-size reservoirs, everything else goes straight to disk.
"""
from __future__ import annotations

import csv
import errno
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..taxonomy import RARE_CODES, is_wbc
from .sources import Frame
from .stats import Reservoir

log = logging.getLogger("wbc_edge.sinks")


@dataclass
class FrameResult:
    frame: Frame  # `frame.image` is kept only when a sink needs it (annotation)
    boxes: list  # localiser boxes, or [None] per crop in crops mode
    crops: np.ndarray  # uint8 N x S x S x 3, RGB
    cells: list[dict] = field(default_factory=list)  # one row per cell (see pipeline.cell_rows)
    latency_s: float | None = None


class Sink:
    """write() every result in order; flush() makes what was written durable; close() ends the run.
    `where` is the file or folder it writes, for error messages."""

    where: Path | None = None

    def write(self, res: FrameResult) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self, summary: dict) -> None:
        self.flush()


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file + rename, so a reader (or a crash) never sees half a file; a write
    that fails (full disk) removes its temporary file and leaves the previous version in place."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_failed(where, exc: OSError) -> OSError:
    """`exc` (which names no file when a buffered write hits a full disk) as an OSError naming `where`."""
    return OSError(exc.errno or errno.EIO, exc.strerror or str(exc), str(where))


def imwrite(path: Path, bgr: np.ndarray) -> None:
    """cv2.imwrite, raising when it fails (it only returns False, e.g. on a full disk)."""
    if not cv2.imwrite(str(path), bgr):
        raise OSError(errno.EIO, "could not write the image", str(path))


def _json_row(row: dict) -> str:
    return json.dumps(row, separators=(",", ":"))


class _LineFile(Sink):
    """A text file opened once and written line by line."""

    def __init__(self, path: Path):
        self.path = self.where = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "w", newline="")  # noqa: SIM115 - open for the whole run, closed in close()

    def flush(self) -> None:
        if not self.f.closed:
            self.f.flush()

    def close(self, summary: dict) -> None:
        if not self.f.closed:
            self.f.close()


class JsonlCells(_LineFile):
    """cells.jsonl: one JSON object per classified cell (or per unreadable crop in crops mode)."""

    def write(self, res: FrameResult) -> None:
        for row in res.cells:
            self.f.write(_json_row(row) + "\n")


class CsvCells(_LineFile):
    COLUMNS = ("source", "frame", "cell", "x0", "y0", "x1", "y1", "pred", "confidence", "top_k", "flags",
               "error")

    def __init__(self, path: Path):
        super().__init__(path)
        self.w = csv.writer(self.f)
        self.w.writerow(self.COLUMNS)

    def write(self, res: FrameResult) -> None:
        for r in res.cells:
            box = r.get("box") or [""] * 4
            top = "|".join(f"{c}:{p:.4f}" for c, p in r.get("top_k") or [])
            conf = f"{r['confidence']:.4f}" if r.get("confidence") is not None else ""
            self.w.writerow([r["source"], r["frame"], r["cell"], *box, r.get("pred") or "", conf, top,
                             "|".join(r.get("flags", [])), r.get("error") or ""])


class FramesLog(_LineFile):
    """frames.jsonl: one row per frame, also for frames with no cells or that could not be read."""

    def write(self, res: FrameResult) -> None:
        f = res.frame
        row = {"index": f.index, "source": f.source, "pos": f.pos, "n_cells": len(res.cells),
               "error": f.error, "latency_ms": round(1e3 * res.latency_s, 2) if res.latency_s else None}
        self.f.write(_json_row(row) + "\n")


class DifferentialCount(Sink):
    """The running differential: counts per class, % over white cells, rare-cell alerts.

    Rewritten atomically to differential.json on every flush, so it is current while the run goes on.
    While the site monitor's alarm is on (`set_reliability`), the count says it is not reliable and why,
    and each rare-cell alert counts the calls held as `unverified`.
    """

    def __init__(self, path: Path, classes: list[str], max_examples: int = 10):
        self.path, self.classes, self.max_examples = Path(path), list(classes), max_examples
        self.where = self.path
        self.counts: Counter = Counter()
        self.flags: Counter = Counter()
        self.alerts: dict[str, dict] = {}
        self.site = {"reliable": True, "reason": None, "site_monitor": None}
        self._dirty = True

    def set_reliability(self, drift: dict) -> None:
        """The site monitor's report (`DriftMonitor.report`): reliable or not, the reason, its status."""
        self.site = {"reliable": bool(drift.get("reliable", True)), "reason": drift.get("reason"),
                     "site_monitor": drift.get("status")}
        self._dirty = True

    def write(self, res: FrameResult) -> None:
        for r in res.cells:
            if not r.get("pred"):
                continue
            self.counts[r["pred"]] += 1
            self.flags.update(r.get("flags", []))
            if r["pred"] in RARE_CODES:
                self._alert(r)
            self._dirty = True

    def _alert(self, r: dict) -> None:
        a = self.alerts.setdefault(r["pred"], {"count": 0, "unverified": 0, "examples": []})
        a["count"] += 1
        a["unverified"] += "unverified" in r.get("flags", ())
        if len(a["examples"]) < self.max_examples:  # the first few, so a reviewer can go straight to them
            a["examples"].append({k: r.get(k) for k in ("source", "frame", "cell", "box", "confidence")})

    def as_dict(self) -> dict:
        n_wbc = sum(n for c, n in self.counts.items() if is_wbc(c))
        order = self.classes + sorted(set(self.counts) - set(self.classes))
        return {"n_cells": sum(self.counts.values()), "n_wbc": n_wbc,
                "classes": {c: {"count": self.counts[c], "rare": c in RARE_CODES,
                                "percent_of_wbc": round(100.0 * self.counts[c] / n_wbc, 2)
                                if n_wbc and is_wbc(c) else None} for c in order},
                # while the site monitor's alarm is on every alert is held (cells before it fired included)
                "rare_alerts": {c: {**self.alerts[c], "held": not self.site["reliable"]}
                                for c in sorted(self.alerts)},
                "flags": dict(self.flags), **self.site}

    def flush(self) -> None:
        if self._dirty:
            atomic_write_text(self.path, json.dumps(self.as_dict(), indent=2) + "\n")
            self._dirty = False


def _bgr(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[..., ::-1])


class ReviewQueue(Sink):
    """review/: a PNG of every flagged cell (rare, possibly rare, low confidence) and review.jsonl with
    its prediction. Capped at `max_items` so a long soak cannot fill the disk; the rest are counted."""

    REASONS = ("rare", "rare_possible", "low_confidence")

    def __init__(self, directory: Path, max_items: int = 2000):
        self.dir, self.max_items = Path(directory), max_items
        self.where = self.dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.dir / "review.jsonl", "w")  # noqa: SIM115 - closed in close()
        self.saved = self.dropped = 0

    def write(self, res: FrameResult) -> None:
        for r, crop in zip(res.cells, res.crops):
            if not any(f in self.REASONS for f in r.get("flags", [])):
                continue
            if self.saved >= self.max_items:
                self.dropped += 1
                continue
            name = f"{r['frame']:07d}-{r['cell']:02d}-{r['pred']}.png"
            imwrite(self.dir / name, _bgr(crop))
            self.log.write(_json_row({**r, "image": name}) + "\n")
            self.saved += 1

    def flush(self) -> None:
        if not self.log.closed:
            self.log.flush()

    def close(self, summary: dict) -> None:
        if self.dropped:
            log.warning("review queue full: %d flagged cells beyond the first %d were not saved",
                        self.dropped, self.max_items)
        self.log.close()


# BGR colours: rare cells red, uncertain ones orange, the rest green.
_COLOURS = {"rare": (0, 0, 255), "low_confidence": (0, 165, 255), "ok": (0, 200, 0)}


def draw_cells(image: np.ndarray, cells: list[dict]) -> np.ndarray:
    """A BGR copy of the RGB frame with each cell's box and 'CLASS 0.93' label drawn on it."""
    out = _bgr(image)
    for r in cells:
        if not r.get("box") or not r.get("pred"):
            continue
        flags = r.get("flags", [])
        colour = _COLOURS["rare" if "rare" in flags else "low_confidence" if flags else "ok"]
        x0, y0, x1, y1 = (round(v) for v in r["box"])
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, 2)
        label = f"{r['pred']} {r['confidence']:.2f}"
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        ty = max(th + 4, y0)
        cv2.rectangle(out, (x0, ty - th - 4), (x0 + tw + 4, ty), colour, -1)
        cv2.putText(out, label, (x0 + 2, ty - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return out


class AnnotatedFrames(Sink):
    """Frames with boxes and labels: annotated.avi (MJPG) for video/camera sources, else one JPEG per
    frame in annotated/. Frames that could not be read are skipped."""

    def __init__(self, out_dir: Path, video: bool, fps: float | None = None):
        self.out_dir, self.video, self.fps = Path(out_dir), video, fps or 10.0
        self.where = self.out_dir / ("annotated.avi" if video else "annotated")
        self.writer, self.size = None, None
        if not video:
            (self.out_dir / "annotated").mkdir(parents=True, exist_ok=True)

    def write(self, res: FrameResult) -> None:
        img = res.frame.image
        if img is None:
            return
        drawn = draw_cells(img, res.cells)
        if not self.video:
            stem = Path(res.frame.source).stem
            imwrite(self.out_dir / "annotated" / f"{res.frame.index:07d}-{stem}.jpg", drawn)
            return
        if self.writer is None:
            self.size = (drawn.shape[1], drawn.shape[0])
            fourcc = cv2.VideoWriter_fourcc(*"MJPG")
            self.writer = cv2.VideoWriter(str(self.out_dir / "annotated.avi"), fourcc, self.fps, self.size)
        if (drawn.shape[1], drawn.shape[0]) != self.size:  # a camera that changed resolution mid-run
            drawn = cv2.resize(drawn, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(drawn)

    def close(self, summary: dict) -> None:
        if self.writer is not None:
            self.writer.release()  # writes the AVI index; without it the file is not seekable
            self.writer = None


def thumbnail(crop: np.ndarray, size: int = 96) -> bytes:
    """A small JPEG of an RGB crop, for embedding in the HTML report."""
    small = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA) if crop.shape[0] != size else crop
    ok, buf = cv2.imencode(".jpg", _bgr(small), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return buf.tobytes() if ok else b""


class HtmlReport(Sink):
    """report.html at the end: count table, a few cells per class, flagged cells. Keeps only
    fixed-size reservoirs of small thumbnails while the stream runs."""

    def __init__(self, path: Path, classes: list[str], per_class: int = 6, n_rare: int = 36,
                 n_uncertain: int = 18):
        self.path, self.classes = Path(path), list(classes)
        self.where = self.path
        self.gallery = {c: Reservoir(per_class, seed=i) for i, c in enumerate(self.classes)}
        self.rare, self.uncertain = Reservoir(n_rare, seed=101), Reservoir(n_uncertain, seed=102)

    def write(self, res: FrameResult) -> None:
        for r, crop in zip(res.cells, res.crops):
            if not r.get("pred"):
                continue
            flags = r.get("flags", [])
            for pool in (self.gallery.get(r["pred"]),
                         self.rare if ("rare" in flags or "rare_possible" in flags) else None,
                         self.uncertain if "low_confidence" in flags else None):
                if pool is not None:
                    pool.add_lazy(lambda: _Thumb(crop, r))  # noqa: B023 - called at once, inside the loop

    def close(self, summary: dict) -> None:
        from .report import write_report

        gallery = {c: [t.as_item() for t in pool.items] for c, pool in self.gallery.items()}
        flagged = [t.as_item() for t in self.rare.items] + [t.as_item() for t in self.uncertain.items]
        write_report(self.path, summary, gallery, flagged)


class _Thumb:
    """A thumbnail encoded once on entry, so the reservoir holds ~3 kB per cell, not the crop."""

    __slots__ = ("jpeg", "row")

    def __init__(self, crop: np.ndarray, row: dict):
        self.jpeg = thumbnail(crop)
        keys = ("source", "frame", "cell", "pred", "confidence", "top_k", "flags")
        self.row = {k: row.get(k) for k in keys}

    def as_item(self) -> dict:
        return {"jpeg": self.jpeg, **self.row}

"""The stream pipeline: frames in, classified cells and a running differential count out.

    reader thread       source -> Frame (decode)                      -> q_frames   (bounded)
    localise workers    Frame -> boxes -> crops                       -> q_located  (bounded)
    inference thread    micro-batches crops across frames (max batch,
                        max delay), one EnsembleClassifier call each   -> q_results  (bounded)
    writer thread       cell rows -> every sink, in frame order
    main thread         waits; turns Ctrl-C into a graceful stop

Bounded queues give back-pressure: a slow classifier slows the reader instead of filling RAM. Every
stage is timed; per-frame latency (read start -> all sinks written) goes into a fixed-size histogram.
On the first Ctrl-C (or SIGTERM, what systemd and Docker send) the source stops and every frame already
read is still classified and written; a second drops unclassified work, but what was classified is still
written and flushed. A sink that cannot write (full disk) ends the run as `failed`: the other sinks and
summary.json still get what was done, as far as the disk lets them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..outdir import EXIT_ERROR, EXIT_OK, EXIT_SOURCE_LOST, exit_code_for, owns_output, signal_of
from ..taxonomy import RARE_CODES
from ..xp import to_numpy
from . import tta
from .classifier import EnsembleClassifier
from .drift import NO_STATISTICS, DriftMonitor, flag_row
from .preprocess import Preprocessor
from .sinks import (
    AnnotatedFrames,
    CsvCells,
    DifferentialCount,
    FrameResult,
    FramesLog,
    HtmlReport,
    JsonlCells,
    ReviewQueue,
    Sink,
    atomic_write_text,
    write_failed,
)
from .sources import Frame, Source, open_source
from .stats import LogHistogram, RssTrace, StageTimes, rss_mb

log = logging.getLogger("wbc_edge.pipeline")

_END = object()  # end-of-stream marker passed down the queues
_EMPTY = object()  # a queue get that timed out
# interrupted: 128 + the signal (130 SIGINT, 143 SIGTERM), see StreamSummary.signal
EXIT_CODES = {"completed": EXIT_OK, "failed": EXIT_ERROR, "source_lost": EXIT_SOURCE_LOST,
              "interrupted": exit_code_for(signal.SIGINT)}
# what a run writes in its --out: an earlier run's are removed first (fresh review/, no stale summary)
STREAM_OUTPUTS = ("cells.jsonl", "cells.csv", "frames.jsonl", "differential.json", "review", "annotated",
                  "annotated.avi", "report.html", "summary.json", "differential.json.tmp", "summary.json.tmp")


@dataclass
class StreamSummary:
    """What a run did; JSON-able (`to_dict`), also written to summary.json."""

    status: str  # completed | interrupted | source_lost | failed
    exit_code: int
    source: str
    mode: str
    bundle: str
    frames: int = 0
    cells: int = 0
    errors: dict = field(default_factory=dict)  # {"count", "examples": first few {source, index, error}}
    skipped: list = field(default_factory=list)  # found beside the inputs but no image: {path, reason}
    restored_frames: int = 0  # frames/crops the impulse guard restored (their rows say so)
    decoded_reduced: dict = field(default_factory=dict)  # {"1/2": frames decoded at half size per side, ...}
    scales: dict = field(default_factory=dict)  # per slide: the last scale its cells got (um/px, source)
    drift: dict = field(default_factory=dict)  # the site monitor: score per slide, alarm, reliable, reason
    differential: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)  # per stage: total_s, calls, ms_per_call, ms_per_frame
    fps: float = 0.0
    cells_per_s: float = 0.0
    latency_ms: dict = field(default_factory=dict)  # p50, p99, mean, max
    rss_mb: dict = field(default_factory=dict)  # start, end, trace [(frames, MB)]
    wall_s: float = 0.0
    load_s: float = 0.0
    batches: dict = field(default_factory=dict)
    runner: str = ""
    views: list = field(default_factory=list)
    precision: str = "fp32"
    review: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    error: str | None = None
    signal: str | None = None  # the signal that interrupted the run (SIGINT, SIGTERM)
    server: dict | None = None  # --server: the Triton model, its checksum, requests, resent requests, outages

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Located:
    frame: Frame
    boxes: list
    crops: np.ndarray  # canonical cells (the preprocessor's output before its stain step)
    scale: object = None  # the frame's (or crop's) Scale
    gate: object = None  # edge/restore.py GateResult of the crops (None: the bundle has no restorer)


def slide_of(frame: Frame) -> str:
    """The slide a frame belongs to, for scales pooled per slide: a file's folder, else the stream."""
    return file_slide(frame.source) if frame.pos is None else frame.source


def file_slide(path: str) -> str:
    return str(Path(path).parent)


def _box_row(box) -> dict:
    """The JSON fields of a localiser box (None in crops mode)."""
    if box is None:
        return {"box": None}
    return {"box": [round(float(v), 1) for v in (box.x0, box.y0, box.x1, box.y1)],
            "score": round(float(box.score), 4), "nucleus_area": int(box.nucleus_area)}


class CellLabeller:
    """Probabilities -> per-cell rows with top-k and review flags.

    Flags: `rare` (top-1 is a class a hematologist must see), `rare_possible` (a rare class has at
    least `rare_min_prob` without being top-1: missing a blast costs more than a second look), and
    `low_confidence` (top-1 probability under `low_confidence`).
    """

    def __init__(self, classes: list[str], top_k: int = 3, low_confidence: float = 0.5,
                 rare_min_prob: float = 0.25, refiner=None):
        self.classes, self.top_k = list(classes), top_k
        self.low_confidence, self.rare_min_prob = low_confidence, rare_min_prob
        self.rare_idx = np.array([i for i, c in enumerate(self.classes) if c in RARE_CODES], np.int64)
        self.refiner = refiner if refiner is not None and refiner.active else None

    def refine(self, probs: np.ndarray, crops) -> tuple[np.ndarray, list | None]:
        """(final class indices, per-cell changes or None) for a whole micro-batch of cells."""
        if self.refiner is None or not len(probs):
            return probs.argmax(-1), None
        return self.refiner(probs, crops)

    def rows(self, frame: Frame, boxes: list, probs: np.ndarray, crops_mode: bool, final=None,
             changes=None, scale=None) -> list[dict]:
        """Rows of one frame; `final`/`changes` are this frame's slice of `refine` (None: no refinement);
        every cell carries the frame's `scale` (um/px) and where it came from."""
        base = {"source": frame.source, "frame": frame.index}
        if frame.error and crops_mode:  # in crops mode the input *is* the cell: keep one row per input
            return [{**base, "cell": 0, "box": None, "pred": None, "error": frame.error}]
        probs = np.asarray(probs)
        final = probs.argmax(-1) if final is None else final
        rows = [self._row(base, i, box, p, int(k)) for i, (box, p, k) in enumerate(zip(boxes, probs, final))]
        if scale is not None:
            for row in rows:
                row.update(scale.as_row())
        for row, ch in zip(rows, changes or []):
            if ch:  # the refinement moved this cell: keep the ensemble's class and how it changed
                row.update(pred_raw=ch[0]["from"], refine=ch)
        if frame.restored:
            for row in rows:
                row["restored"] = "impulse_noise"
        return rows

    def _row(self, base: dict, i: int, box, p: np.ndarray, k: int) -> dict:
        order = np.argsort(-p)[: self.top_k]
        pred, conf = self.classes[k], float(p[k])
        flags = []
        if pred in RARE_CODES:
            flags.append("rare")
        elif self.rare_idx.size and float(p[self.rare_idx].max()) >= self.rare_min_prob:
            flags.append("rare_possible")
        if conf < self.low_confidence:
            flags.append("low_confidence")
        return {**base, "cell": i, **_box_row(box), "pred": pred, "confidence": round(conf, 4),
                "top_k": [[self.classes[j], round(float(p[j]), 4)] for j in order], "flags": flags}


def _enlarged(box, factor: int):
    """A localiser Box found on a frame decoded at 1/factor, in the file's pixels."""
    return type(box)(box.x0 * factor, box.y0 * factor, box.x1 * factor, box.y1 * factor, box.score,
                     box.nucleus_area * factor * factor)


def _load_localiser():
    """The localiser module, imported only when frames (not crops) are streamed."""
    from . import localise

    return localise


class Pipeline:
    """Threads and queues for one run; `run()` blocks until the source ends or Ctrl-C."""

    def __init__(self, source: Source, clf: EnsembleClassifier, sinks: list[Sink], labeller: CellLabeller,
                 pre: Preprocessor, localiser_config=None, max_batch: int = 64,
                 max_delay_ms: float = 20.0, workers: int = 1, keep_images: bool = False,
                 on_progress: Callable[[dict], None] | None = None, localiser=None,
                 monitor: DriftMonitor | None = None):
        self.source, self.clf, self.sinks, self.labeller = source, clf, sinks, labeller
        # the site monitor: per-slide distance from the bundle's training cells (silent without statistics)
        self.monitor = monitor if monitor is not None else DriftMonitor(None, NO_STATISTICS)
        self.diff = next((s for s in sinks if isinstance(s, DifferentialCount)), None)
        self.pre = pre  # the bundle's preprocessor: impulse guard, scale, canonical cells, stain step
        self.crops_mode = source.kind == "crops"
        self.crop_size, self.keep_images = pre.size, keep_images
        self.loc = None if self.crops_mode else (localiser or _load_localiser())
        if self.loc is not None and localiser_config is None:
            localiser_config = self.loc.LocaliserConfig()  # the localiser's own defaults
        self.loc_config = localiser_config
        if not self.crops_mode and not keep_images:  # annotated frames are drawn at the file's own size
            source.reduction = self.decode_reduction
        self.max_batch, self.workers = max(1, max_batch), max(1, workers)
        self.max_delay_s = max_delay_ms / 1e3
        self.on_progress = on_progress
        self.q_frames = queue.Queue(maxsize=2 * self.workers + 2)
        self.q_located = queue.Queue(maxsize=2 * self.workers + 4)
        self.q_results = queue.Queue(maxsize=16)  # frames, not crops: keeps latency from queueing low
        # Plain flags, not Events: they are set from a signal handler, where taking a lock could deadlock.
        self.stopping = self.aborting = False
        self.times, self.latency, self.rss = StageTimes(), LogHistogram(), RssTrace()
        self.frames = self.cells = self.n_errors = self.n_batches = self.batched_crops = self.max_seen = 0
        self.n_restored = 0
        self.n_reduced: dict[str, int] = {}
        self.scales: dict[str, dict] = {}
        self.error_examples: list[dict] = []
        self.fatal: BaseException | None = None
        self.interrupted, self.n_interrupts, self.signum = False, 0, None
        self.wall_s = 0.0

    # ---- queue helpers: never block forever, so a hard stop always gets through -----------------
    def _put(self, q: queue.Queue, item) -> bool:
        while not self.aborting:
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue, timeout: float | None = None):
        """The next item; _EMPTY after `timeout` seconds; None once aborting."""
        end = None if timeout is None else time.perf_counter() + timeout
        while not self.aborting:
            wait = 0.1 if end is None else min(0.1, max(0.0, end - time.perf_counter()))
            try:
                return q.get(timeout=wait) if wait > 0 else q.get_nowait()
            except queue.Empty:
                if end is not None and time.perf_counter() >= end:
                    return _EMPTY
        return None

    def _fail(self, exc: BaseException) -> None:
        # one line; the traceback only with -v (a full disk is not a bug to debug)
        log.error("stream stage failed: %s", reason(exc),
                  exc_info=exc if log.isEnabledFor(logging.INFO) else None)
        if self.fatal is None:
            self.fatal = exc
        self.source.stop()
        self.aborting = True

    def decode_reduction(self, path: str) -> int:
        """How much smaller to decode a JPEG frame of this file's slide: 1, 2, 4 or 8 per side.

        Once a slide's red cells are measured (its pooled estimate frozen, or the user's um/px), its
        frames need no more pixels than the model's window and the localiser work at; a camera that
        resolves a red cell in 85 px (the Raspberry Pi frames) gives the window 2.4x, the localiser 2.7x
        what they use. libjpeg's DCT scaling then skips part of the decoding (a 1440x900 frame at 1/2:
        8.9 -> 7.1 ms; the entropy decoding stays) and the impulse guard and the crops see 4x fewer
        pixels (4.2 -> 1.2 and 4.9 -> 2.4 ms); the stream went from 39 to 48 frames/s. Crops and boxes
        are the same cells at the same physical scale; boxes and scales are reported in the file's own
        pixels."""
        rbc = self.pre.settled_rbc_px(file_slide(path))
        if not rbc:
            return 1
        need = max(self.pre.scale_spec.get("rbc_px") or 0.0, self.loc_config.work_rbc_px)
        r = 1
        while r < 8 and rbc / (2 * r) >= need:
            r *= 2
        return r

    # ---- stage 1: read ----------------------------------------------------------------------
    def _read_loop(self) -> None:
        try:
            for frame in self.source:
                self.times.add("decode", frame.decode_s)
                if not self._put(self.q_frames, frame) or self.stopping:
                    break
        except BaseException as exc:  # noqa: BLE001 - reported as the run's failure, never swallowed
            self._fail(exc)
        finally:
            for _ in range(self.workers):
                self._put(self.q_frames, _END)

    # ---- stage 2: localise + crop -----------------------------------------------------------
    def _locate_loop(self) -> None:
        try:
            while True:
                item = self._get(self.q_frames)
                if item is None or item is _END or not self._put(self.q_located, self._locate(item)):
                    break
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
        finally:
            self._put(self.q_located, _END)

    def _locate(self, frame: Frame) -> _Located:
        empty = np.zeros((0, self.crop_size, self.crop_size, 3), np.uint8)
        if frame.image is None:
            return _Located(frame, [], empty)
        t0 = time.perf_counter()
        frame.image, frame.restored = self.pre.guarded(frame.image)
        # a crops stream is one slide, as `evaluate`'s dataset is (they must agree); frames: per folder
        scale = self.pre.scale_of(frame.image, "" if self.crops_mode else slide_of(frame), frame.reduced)
        t1 = time.perf_counter()
        self.times.add("restore+scale", t1 - t0)
        if self.crops_mode:  # the image is the cell
            crops = self.pre.canonical(frame.image, scale.reduced(frame.reduced))[None]
            self.times.add("crop", time.perf_counter() - t1)
            return self._done_with_image(self._restored(_Located(frame, [None], crops, scale)))
        try:
            # a settled slide's scale is in the file's pixels; a reduced frame has fewer, its boxes go back
            boxes, crops = self._boxes_and_crops(frame.image, scale.reduced(frame.reduced))
            boxes = [_enlarged(b, frame.reduced) for b in boxes] if frame.reduced > 1 else boxes
        except Exception as exc:  # noqa: BLE001 - one odd frame must not end a microscope run
            log.warning("frame %d (%s): localiser failed: %s", frame.index, frame.source, exc)
            frame.error, frame.image = f"localiser failed: {exc}", None
            return _Located(frame, [], empty)
        return self._done_with_image(self._restored(_Located(frame, boxes, crops if len(boxes) else empty, scale)))

    def _restored(self, loc: _Located) -> _Located:
        """The preprocessor's quality gate + learned restorer on this frame's canonical cells."""
        if self.pre.restorer is not None:
            t0 = time.perf_counter()
            loc.crops, loc.gate = self.pre.restore(loc.crops)
            self.times.add("learned_restore", time.perf_counter() - t0)
        return loc

    def _boxes_and_crops(self, image: np.ndarray, scale):
        t0 = time.perf_counter()
        boxes = self.loc.localise(image, self.loc_config, rbc_px=scale.rbc_px)
        t1 = time.perf_counter()
        self.times.add("localise", t1 - t0)
        if not boxes:
            return [], None
        crops = self.pre.frame_cells(image, boxes, scale)
        self.times.add("crop", time.perf_counter() - t1)
        return list(boxes), crops

    def _done_with_image(self, loc: _Located) -> _Located:
        if not self.keep_images:  # drop the full frame early: queues then hold only small crops
            loc.frame.image = None
        return loc

    # ---- stage 3: micro-batched inference ---------------------------------------------------
    def _infer_loop(self) -> None:
        pending, n_crops, deadline, ended = [], 0, None, 0
        reorder, expected = {}, 0  # workers may finish out of order; sinks see frames in order
        try:
            while ended < self.workers:
                wait = 0.1 if deadline is None else max(0.0, deadline - time.perf_counter())
                item = self._get(self.q_located, wait)
                if item is None:
                    return
                if item is _END:
                    ended += 1
                elif item is not _EMPTY:
                    reorder[item.frame.index] = item
                while expected in reorder:
                    loc = reorder.pop(expected)
                    expected += 1
                    if pending and n_crops + len(loc.crops) > self.max_batch:
                        self._classify(pending)
                        pending, n_crops = [], 0
                    if not pending:
                        deadline = time.perf_counter() + self.max_delay_s
                    pending.append(loc)
                    n_crops += len(loc.crops)
                if pending and (n_crops >= self.max_batch or n_crops == 0 or time.perf_counter() >= deadline):
                    self._classify(pending)
                    pending, n_crops, deadline = [], 0, None
            leftover = pending + [reorder[k] for k in sorted(reorder)]
            if leftover:
                self._classify(leftover)
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
        finally:
            self._put(self.q_results, _END)

    def _classify(self, pending: list[_Located]) -> None:
        """One EnsembleClassifier call for the crops of all pending frames, then split per frame."""
        sizes = [len(loc.crops) for loc in pending]
        probs = np.zeros((0, len(self.labeller.classes)), np.float32)
        feats = None
        if sum(sizes):
            t0 = time.perf_counter()
            # the host -> device boundary (a no-op on CPU): the colour step, views, runners and means run
            # where the cells now are, and only the probabilities come back
            crops = np.concatenate([loc.crops for loc in pending if len(loc.crops)])
            cells = self.pre.stain(self.clf.upload(crops))
            probs = self.clf.predict(cells)
            self.times.add("infer", time.perf_counter() - t0)
            if self.monitor.active:  # the site statistics of the same model-input cells (cheap, per batch)
                t1 = time.perf_counter()
                feats = self.monitor.features(to_numpy(cells), probs)  # colour statistics: host code
                self.times.add("site_monitor", time.perf_counter() - t1)
            self.n_batches += 1
            self.batched_crops += sum(sizes)
            self.max_seen = max(self.max_seen, sum(sizes))
        # the refinement runs once per micro-batch too, not once per frame in the writer thread
        t0 = time.perf_counter()
        final, changes = self.labeller.refine(probs, cells if sum(sizes) else None)
        if changes is not None:
            self.times.add("refine", time.perf_counter() - t0)
        bounds = np.cumsum(sizes)[:-1]
        parts = zip(np.split(probs, bounds), np.split(final, bounds),
                    np.split(np.arange(len(probs)), bounds))
        for loc, (p, f, idx) in zip(pending, parts):
            item = (loc, p, f, [changes[i] for i in idx] if changes is not None else None,
                    feats[idx] if feats is not None else None)
            if not self._put(self.q_results, item):
                return

    # ---- stage 4: sinks ---------------------------------------------------------------------
    def _write_loop(self) -> None:
        last_flush = time.monotonic()
        try:
            while True:
                item = self._get(self.q_results, 0.5)
                if item is None:  # aborting: still write what was already classified
                    self._drain_results()
                    return
                if item is _END:
                    return
                if item is not _EMPTY:
                    self._write(*item)
                if time.monotonic() - last_flush >= 1.0:
                    self._flush()
                    last_flush = time.monotonic()
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
        finally:
            try:
                self._flush()
            except BaseException as exc:  # noqa: BLE001 - e.g. the disk filled up: the run failed
                self._fail(exc)

    def _drain_results(self) -> None:
        while True:
            try:
                item = self.q_results.get_nowait()
            except queue.Empty:
                return
            if item is not _END:
                self._write(*item)

    def _write(self, loc: _Located, probs: np.ndarray, final=None, changes=None, feats=None) -> None:
        t0 = time.perf_counter()
        res = FrameResult(loc.frame, loc.boxes, loc.crops,
                          self.labeller.rows(loc.frame, loc.boxes, probs, self.crops_mode, final, changes, loc.scale))
        if loc.gate is not None:  # the quality gate's scores per cell; `restored: learned` where it restored
            for i, row in enumerate(res.cells[:len(loc.gate.restored)]):  # one row per crop, in order
                row.update(loc.gate.row(i))
                if loc.gate.restored[i]:
                    row.setdefault("restored", "learned")
        self._monitor(res, feats)
        for sink in self.sinks:
            if isinstance(sink, FramesLog):  # written last, so its latency covers the other sinks
                res.latency_s = time.perf_counter() - loc.frame.t_start
            try:
                sink.write(res)
            except OSError as exc:
                raise write_failed(sink.where, exc) from exc
        self.times.add("sinks", time.perf_counter() - t0)
        if loc.scale is not None:
            self.scales["" if self.crops_mode else slide_of(loc.frame)] = loc.scale.as_row()
        self._count(res)

    def _monitor(self, res: FrameResult, feats) -> None:
        """Pool this frame's cells into its slide; once the slide's alarm is on, flag its cells and mark
        the differential unreliable (the alarm latches per slide)."""
        slide = "" if self.crops_mode else slide_of(res.frame)
        was_on = self.monitor.alarm(slide)
        if not self.monitor.add(slide, feats):
            return
        for row in res.cells:
            flag_row(row, True)
        if not was_on:
            drift = self.monitor.report()
            log.warning("%s (from cell %d of the slide on)", drift["reason"],
                        drift["slides"][slide]["fired_at_cell"])
            if self.diff is not None:
                self.diff.set_reliability(drift)

    def _count(self, res: FrameResult) -> None:
        self.frames += 1
        self.n_restored += bool(res.frame.restored)
        if res.frame.reduced > 1:
            key = f"1/{res.frame.reduced}"
            self.n_reduced[key] = self.n_reduced.get(key, 0) + 1
        self.cells += sum(1 for r in res.cells if r.get("pred"))
        if res.latency_s is not None:
            self.latency.add(res.latency_s)
        if res.frame.error:
            self.n_errors += 1
            if len(self.error_examples) < 20:
                f = res.frame
                self.error_examples.append({"source": f.source, "index": f.index, "pos": f.pos,
                                            "error": f.error})
        self.rss.maybe_add(self.frames)

    def _flush(self) -> None:
        for sink in self.sinks:
            try:
                sink.flush()
            except OSError as exc:
                raise write_failed(sink.where, exc) from exc
        if self.on_progress is not None:
            self.on_progress({"frames": self.frames, "cells": self.cells, "errors": self.n_errors,
                              "fps": round(self.frames / max(1e-9, time.perf_counter() - self._t0), 2)})

    # ---- the run ----------------------------------------------------------------------------
    def run(self) -> None:
        self._t0 = time.perf_counter()
        threads = [threading.Thread(target=self._read_loop, name="wbc-read", daemon=True)]
        threads += [threading.Thread(target=self._locate_loop, name=f"wbc-locate-{i}", daemon=True)
                    for i in range(self.workers)]
        threads += [threading.Thread(target=self._infer_loop, name="wbc-infer", daemon=True)]
        writer = threading.Thread(target=self._write_loop, name="wbc-write", daemon=True)
        for t in threads + [writer]:
            t.start()
        with _signals_call(self.interrupt):
            while writer.is_alive():
                try:
                    writer.join(0.2)
                except KeyboardInterrupt:  # raised another way (e.g. _thread.interrupt_main)
                    self.interrupt()
        self.wall_s = time.perf_counter() - self._t0

    def interrupt(self, signum: int = signal.SIGINT, _frame=None) -> None:
        """Ctrl-C or SIGTERM: the first stops the source (frames already read are still classified and
        written); the second drops unclassified work (what was classified is still written); the third
        gives up."""
        self.n_interrupts += 1
        if self.signum is None:
            self.signum = int(signum)
        if self.n_interrupts == 1:
            log.warning("interrupted: finishing the frames already read (Ctrl-C again to stop now)")
            self.interrupted = self.stopping = True
            self.source.stop()
        elif self.n_interrupts == 2:
            log.warning("stopping now; writing what was already classified")
            self.aborting = True
        else:
            raise KeyboardInterrupt


# ---- run_stream: the library call behind `wbc-edge stream` ------------------------------------
def _make_sinks(out: Path, classes: list[str], source: Source, annotate: bool, report: bool,
                review_max: int) -> list[Sink]:
    sinks: list[Sink] = [JsonlCells(out / "cells.jsonl"), CsvCells(out / "cells.csv"),
                         DifferentialCount(out / "differential.json", classes),
                         ReviewQueue(out / "review", review_max)]
    if annotate and source.kind == "frames":
        sinks.append(AnnotatedFrames(out, video=source.mode in ("video", "camera"), fps=source.fps))
    if report:
        sinks.append(HtmlReport(out / "report.html", classes))
    sinks.append(FramesLog(out / "frames.jsonl"))  # last: see Pipeline._write
    return sinks


def _resolve_views(views, bundle: Bundle) -> list[str]:
    return tta.check_views(views) if views is not None else list(bundle.views)


def reason(exc: BaseException) -> str:
    """One line for a failure: 'FILE: what went wrong' for an OSError naming a file (a full disk)."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def _status(pipe: Pipeline | None, source: Source, signum: int | None) -> tuple[str, str | None]:
    """(status, error); `signum`: the signal that ended the run outside the pipeline's own handler."""
    if pipe is not None and pipe.fatal is not None:
        return "failed", reason(pipe.fatal)
    if signum is not None or (pipe is not None and pipe.interrupted):
        return "interrupted", None
    if source.lost:
        return "source_lost", "the source disconnected and did not come back"
    if pipe is not None and pipe.frames and pipe.n_errors == pipe.frames:  # (an empty folder is fine)
        return "failed", f"no readable input: all {pipe.frames} frame(s) failed (see frames.jsonl)"
    return "completed", None


def _stage_devices(pipe: Pipeline) -> dict[str, str]:
    """Per timed stage, where it ran: for `infer` (colour step, views, runners, means) `cuda` when all of it
    ran on device arrays, `cuda-runner` when only the runners did (host arrays in between), the
    refinement features' device for `refine`, the CPU for the others."""
    runners = getattr(pipe.clf, "runners", None) or []
    infer = "cpu"
    if getattr(pipe.clf, "server", None):
        infer = "server"
    elif getattr(pipe.clf, "xp", np) is not np:
        infer = "cuda"
    elif runners and str(getattr(runners[0], "device", "cpu")).startswith("cuda"):
        infer = "cuda-runner"
    refiner = getattr(pipe.labeller, "refiner", None)
    refine = getattr(refiner, "features_device", None) or "cpu"
    return {**{stage: "cpu" for stage in pipe.times.total}, "infer": infer, "refine": refine}


def _summarise(pipe: Pipeline | None, status: str, error: str | None, signum: int | None = None,
               **info) -> StreamSummary:
    diff = info.pop("diff")
    s = StreamSummary(status=status, exit_code=EXIT_CODES[status], error=error, differential=diff.as_dict(),
                      **info)
    if status == "interrupted":
        signum = (pipe.signum if pipe is not None else None) or signum or signal.SIGINT
        s.exit_code, s.signal = exit_code_for(signum), signal.Signals(signum).name
    if pipe is None:
        return s
    wall = max(pipe.wall_s, 1e-9)
    lat = pipe.latency
    s.frames, s.cells, s.wall_s = pipe.frames, pipe.cells, round(pipe.wall_s, 3)
    s.errors = {"count": pipe.n_errors, "examples": pipe.error_examples}
    s.restored_frames = pipe.n_restored
    s.decoded_reduced = dict(pipe.n_reduced)
    s.scales = dict(pipe.scales)
    s.drift = pipe.monitor.report()
    s.timing = pipe.times.as_dict(pipe.frames)
    for stage, where in _stage_devices(pipe).items():  # where each stage ran: cpu / cuda (/ server)
        if stage in s.timing:
            s.timing[stage]["device"] = where
    s.fps, s.cells_per_s = round(pipe.frames / wall, 3), round(pipe.cells / wall, 3)
    s.latency_ms = {k: (round(1e3 * v, 2) if v is not None else None) for k, v in
                    {"p50": lat.quantile(0.5), "p99": lat.quantile(0.99), "max": lat.max if lat.n else None,
                     "mean": lat.total / lat.n if lat.n else None}.items()}
    s.batches = {"count": pipe.n_batches, "mean_crops": round(pipe.batched_crops / max(1, pipe.n_batches), 2),
                 "max_crops": pipe.max_seen}
    s.rss_mb["trace"] = pipe.rss.points
    return s


@owns_output("out_dir", STREAM_OUTPUTS)
def run_stream(source, bundle_dir, out_dir, mode: str = "auto", device: str = "cpu", precision: str = "fp32",
               views=None, max_batch: int = 64, max_delay_ms: float = 20.0, annotate: bool = False,
               report: bool = True, loop: int = 1, max_frames: int | None = None, *, workers: int = 1,
               top_k: int = 3, low_confidence: float = 0.5, rare_min_prob: float = 0.25,
               review_max: int = 2000, pixel_size: float | None = None, scale_per: str = "slide",
               localiser_config=None, retries: int = 5, backoff_s: float = 0.5, watch_idle_s: float = 10.0,
               threads: int | None = None, refine: bool = True,
               on_progress: Callable[[dict], None] | None = None, server: str | None = None,
               pace_fps: float | None = None) -> StreamSummary:
    """Stream `source` through the localiser and the bundle's ensemble into `out_dir`.

    `source` is a video file, a camera index, an RTSP/GStreamer URL, an image folder or glob, a
    directory to watch (mode='watch') or single-cell crops (mode='crops'). Writes cells.jsonl,
    cells.csv, frames.jsonl, differential.json, review/, report.html (and annotated frames) and
    summary.json; returns the summary. `exit_code` is non-zero when the source was lost (3), the
    run failed (1) or was interrupted (130 SIGINT, 143 SIGTERM). `out_dir` is claimed first (created,
    checked writable, locked against a second run, an earlier run's outputs removed: `outdir.claim`).
    `pace_fps` plays a folder or video file at that frame rate, as a camera would deliver it.
    """
    rss_start, t_load = rss_mb(), time.perf_counter()
    bundle = Bundle.load(bundle_dir)
    src = open_source(source, mode, loop=loop, max_frames=max_frames, retries=retries, backoff_s=backoff_s,
                      watch_idle_s=watch_idle_s, pace_fps=pace_fps)
    views = _resolve_views(views, bundle)
    clf = EnsembleClassifier(bundle, device, views, precision, max_batch=max(1, max_batch) * len(views),
                             threads=threads, server=server, spin=False)  # decode/localise share the cores
    with clf:  # setup errors (no runner, no localiser) raise before any output is created (`claim` then
        # removes the --out folder again if it made it)
        from .refine.refiner import Refiner

        labeller = CellLabeller(bundle.classes, top_k, low_confidence, rare_min_prob,
                                Refiner.for_bundle(bundle, refine, device))
        localiser = None if src.kind == "crops" else _load_localiser()
        out = Path(out_dir)
        pre = Preprocessor.for_bundle(bundle, pixel_size, same_scale=scale_per == "slide")
        info = {"source": str(source), "mode": src.mode, "bundle": str(bundle_dir), "views": views,
                "precision": precision, "runner": clf.runner_name,
                "load_s": round(time.perf_counter() - t_load, 3),
                "skipped": [asdict(s) for s in getattr(src, "skipped", [])],
                "server": clf.server_report}  # the runner's live record: outages during the run included
        sinks = _make_sinks(out, bundle.classes, src, annotate, report, review_max)
        pipe, signum = None, None
        try:  # from here on every end (Ctrl-C, SIGTERM, a failure) closes the sinks and writes summary.json
            pipe = Pipeline(src, clf, sinks, labeller, pre, localiser_config, max_batch, max_delay_ms,
                            workers, keep_images=annotate, on_progress=on_progress, localiser=localiser,
                            monitor=DriftMonitor.for_bundle(bundle))
            pipe.run()
        except KeyboardInterrupt as exc:  # a third Ctrl-C, or one that came just before/after the run
            signum = signal_of(exc)
        finally:
            summary = _finish(pipe, src, signum, sinks, out, rss_start, **info)
            if labeller.refiner is not None:
                labeller.refiner.close()
    return summary


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; systemd/Docker stop: both end a run gracefully


@contextlib.contextmanager
def _signals_call(handler):
    """Route SIGINT and SIGTERM to `handler` while the block runs. A handler cannot be raised into the
    middle of the main thread's bookkeeping the way KeyboardInterrupt can. Only the main thread may do
    this."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _signals_deferred():
    """While sinks close, a further Ctrl-C/SIGTERM is noted in the log, not raised: half-closed files
    lose results."""
    return _signals_call(lambda *a: log.warning("interrupted while closing outputs: finishing them first"))


def _close_sinks(sinks: list[Sink], summary: dict) -> None:
    """Each sink gets the summary; one failing (full disk) is logged in one line and does not stop the
    others."""
    for sink in sinks:
        try:
            sink.close(summary)
        except Exception as exc:  # noqa: BLE001
            log.warning("closing %s failed: %s", sink.where or type(sink).__name__,
                        exc.strerror if isinstance(exc, OSError) and exc.strerror else exc,
                        exc_info=exc if log.isEnabledFor(logging.INFO) else None)


def _write_summary(out: Path, summary: StreamSummary) -> None:
    try:
        atomic_write_text(out / "summary.json", json.dumps(summary.to_dict(), indent=2) + "\n")
    except OSError as exc:  # the run's result is still printed and in the exit code
        log.error("%s: summary not written: %s", out / "summary.json", exc.strerror or exc)
        if summary.status != "failed":
            summary.status, summary.exit_code = "failed", EXIT_ERROR
            summary.error = reason(write_failed(out / "summary.json", exc))


def _finish(pipe, src, signum, sinks, out: Path, rss_start: float, **info) -> StreamSummary:
    """Summary, then close every sink, then summary.json; a signal meanwhile waits until they are written."""
    with _signals_deferred():
        summary = _summary_of(pipe, src, signum, sinks, out, **info)
        summary.rss_mb.update({"start": round(rss_start, 1), "end": round(rss_mb(), 1)})  # for report.html
        _close_sinks(sinks, summary.to_dict())
        summary.rss_mb["end"] = round(rss_mb(), 1)  # summary.json: after the sinks closed
        _write_summary(out, summary)
    return summary


def _summary_of(pipe, src, signum, sinks, out: Path, **info) -> StreamSummary:
    status, error = _status(pipe, src, signum)
    diff = next(s for s in sinks if isinstance(s, DifferentialCount))
    if pipe is not None:  # the final state of the site monitor, in differential.json and the summary
        diff.set_reliability(pipe.monitor.report())
    review = next(s for s in sinks if isinstance(s, ReviewQueue))
    summary = _summarise(pipe, status, error, signum, diff=diff, **info)
    summary.review = {"saved": review.saved, "dropped": review.dropped}
    names = ("cells.jsonl", "cells.csv", "frames.jsonl", "differential.json", "review", "summary.json")
    summary.outputs = {n: str(out / n) for n in names}
    return summary

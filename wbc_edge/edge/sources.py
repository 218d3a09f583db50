"""Frame sources for the stream: video file, camera / RTSP / GStreamer, image folder or glob,
a watched directory, and single-cell crops.

Every source yields `Frame`s. A frame that cannot be read is a `Frame` with `image=None` and the
reason in `error`, never an exception: one bad file must not stop a microscope run. Live sources
(camera, network stream) reconnect with bounded exponential back-off; if the source stays gone the
source ends with an error frame and `lost=True`, so the run can end with a non-zero status.
"""
from __future__ import annotations

import glob as globmod
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..data.images import ImageReadError, read_scaled, to_rgb_uint8
from ..data.inventory import Skipped, list_inputs, not_image_reason, walk

log = logging.getLogger("wbc_edge.sources")

VIDEO_SUFFIXES = frozenset({".avi", ".mp4", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv",
                            ".ts", ".mjpg", ".mjpeg", ".ogv", ".flv"})
MODES = ("auto", "frames", "crops", "video", "camera", "watch")


@dataclass
class Frame:
    source: str  # file path, video path, camera/stream name
    index: int  # running index in the stream (unique, consecutive from 0)
    image: np.ndarray | None  # RGB uint8 HxWx3; None when unreadable
    error: str | None = None  # why `image` is None
    t_start: float = 0.0  # perf_counter() when reading began: per-frame latency is measured from here
    decode_s: float = 0.0  # seconds spent reading + decoding this frame
    pos: int | None = None  # frame number inside a video / stream (None for files)
    restored: bool = False  # the impulse guard removed salt-and-pepper noise from `image`
    reduced: int = 1  # `image` holds 1/reduced of the file's pixels per side (JPEG DCT scaling); boxes
    # and scales in the output are in the file's own pixels


class Source:
    """Iterate to get frames. `loop` repeats a finite source; `max_frames` caps the whole run;
    `pace_fps` hands out frames no faster than that (a folder played at a camera's rate: latency
    benchmarks; frames the consumer was too slow for are late, never dropped)."""

    kind = "frames"  # or "crops": each image is already one cell
    mode = "frames"  # frames | crops | video | camera | watch, as in open_source
    live = False  # live sources are never looped
    name = "source"
    fps: float | None = None

    def __init__(self, loop: int = 1, max_frames: int | None = None, pace_fps: float | None = None):
        self.loop, self.max_frames = max(1, int(loop)), max_frames
        self.pace_s = 1.0 / pace_fps if pace_fps else None
        self.lost = False  # a live source that stayed gone
        self._stopped = False
        # path -> the JPEG reduction to decode it at (1, 2, 4, 8); set by the stream once a slide's red
        # cells are measured (Pipeline.decode_reduction). Image files only: video frames come decoded.
        self.reduction: Callable[[str], int] | None = None

    def stop(self) -> None:
        """Ask the source to end after the current frame (Ctrl-C, or a consumer that has enough)."""
        self._stopped = True

    def _items(self) -> Iterator[Frame]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Frame]:
        index, start = 0, time.perf_counter()
        if self.max_frames is not None and self.max_frames <= 0:
            return
        for _ in range(1 if self.live else self.loop):
            if self._stopped:
                return
            items = self._items()
            try:
                for frame in items:
                    frame.index = index
                    yield frame
                    index += 1
                    if self._stopped or (self.max_frames is not None and index >= self.max_frames):
                        return
                    if self.pace_s is not None and not self.live:  # the next frame is read at its time
                        _sleep_unless(lambda: self._stopped, start + index * self.pace_s - time.perf_counter())
            finally:
                items.close()  # releases a VideoCapture even when the consumer stops early
            if self.lost:
                return


def _timed_read(path: str, t0: float, reduction: Callable[[str], int] | None = None) -> Frame:
    reduced = 1
    try:
        img, reduced = read_scaled(path, reduce=reduction(path) if reduction else 1)
        err = None
    except ImageReadError as exc:
        img, err = None, exc.reason
    return Frame(path, -1, img, err, t0, time.perf_counter() - t0, reduced=reduced)


class FileSource(Source):
    """A folder (recursive, sorted, symlinks followed once), a glob pattern, or one image file;
    unreadable files are error frames. What the listing found that is no image (LICENSE, a CSV, a
    dangling link, a symlink loop) is in `skipped`, with the reason, and never becomes a frame."""

    def __init__(self, target: str, kind: str = "frames", **kw):
        super().__init__(**kw)
        self.kind = self.mode = kind
        self.name = str(target)
        inv = list_inputs(target)
        self.paths = inv.files  # the input listing, not per-frame history
        self.skipped: list[Skipped] = inv.skipped
        if inv.skipped:
            log.warning("%s: %d path(s) skipped, e.g. %s: %s", target, len(inv.skipped), inv.skipped[0].path,
                        inv.skipped[0].reason)

    def _items(self) -> Iterator[Frame]:
        for path in self.paths:
            yield _timed_read(path, time.perf_counter(), self.reduction)


class VideoSource(Source):
    """A video file through OpenCV (FFmpeg). A file that ends before its header's frame count is
    reported as one error frame (truncated or corrupt), after the frames that did decode."""

    mode = "video"

    def __init__(self, path: str, **kw):
        super().__init__(**kw)
        self.path = self.name = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such video file")

    def _items(self) -> Iterator[Frame]:
        cap = cv2.VideoCapture(self.path)
        try:
            if not cap.isOpened():
                yield Frame(self.path, -1, None, "cannot open video (corrupt file or unsupported codec)",
                            time.perf_counter())
                return
            self.fps = cap.get(cv2.CAP_PROP_FPS) or None
            expected = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            n = yield from _read_frames(cap, self.path)
            if expected > 0 and n < expected:
                yield Frame(self.path, -1, None, f"video ended after {n} of {expected} frames "
                            f"(truncated or corrupt)", time.perf_counter(), pos=n)
        finally:
            cap.release()


def _read_frames(cap, name: str):
    """Yield decoded frames until `cap.read()` fails; return how many were read."""
    n = 0
    while True:
        t0 = time.perf_counter()
        ok, img = cap.read()
        if not ok:
            return n
        try:
            frame = Frame(name, -1, to_rgb_uint8(img, f"{name}#{n}", bgr=True), None, t0, pos=n)
        except ImageReadError as exc:
            frame = Frame(name, -1, None, exc.reason, t0, pos=n)
        frame.decode_s = time.perf_counter() - t0
        yield frame
        n += 1


def _has_gstreamer() -> bool:
    return any(b == cv2.CAP_GSTREAMER for b in cv2.videoio_registry.getBackends())


class LiveSource(Source):
    """A camera index, an RTSP/HTTP URL or a GStreamer pipeline. When reading fails the capture is
    reopened after 1x, 2x, 4x ... `backoff_s` (at most `retries` times in a row); a source that stays
    gone ends with an error frame and `lost=True`."""

    live = True
    mode = "camera"

    def __init__(self, target, retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 8.0, **kw):
        super().__init__(**kw)
        self.target, self.name = target, f"camera:{target}" if isinstance(target, int) else str(target)
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.backend = cv2.CAP_GSTREAMER if isinstance(target, str) and "!" in target else cv2.CAP_ANY
        if self.backend == cv2.CAP_GSTREAMER and not _has_gstreamer():
            raise ValueError("this OpenCV build has no GStreamer backend; use an RTSP URL (FFmpeg) or "
                             "an OpenCV built with GStreamer")

    def _open(self):
        cap = cv2.VideoCapture(self.target, self.backend)
        if cap.isOpened():
            self.fps = cap.get(cv2.CAP_PROP_FPS) or self.fps
            return cap
        cap.release()
        return None

    def _reconnect(self):
        """Reopen with exponential back-off; None if every attempt failed or the run was stopped."""
        delay = self.backoff_s
        for attempt in range(1, self.retries + 1):
            if _sleep_unless(lambda: self._stopped, delay):
                return None
            cap = self._open()
            if cap is not None:
                log.warning("%s: reconnected (attempt %d)", self.name, attempt)
                return cap
            log.warning("%s: reconnect attempt %d/%d failed", self.name, attempt, self.retries)
            delay = min(2 * delay, self.max_backoff_s)
        return None

    def _items(self) -> Iterator[Frame]:
        cap, pos = self._open(), 0
        while not self._stopped:
            if cap is None:
                cap = self._reconnect()
            if cap is None:
                if not self._stopped:
                    self.lost = True
                    yield Frame(self.name, -1, None, f"source lost: no frames after {self.retries} "
                                f"reconnect attempts", time.perf_counter(), pos=pos)
                return
            reader = _read_frames(cap, self.name)
            for frame in reader:
                frame.pos = pos
                pos += 1
                yield frame
                if self._stopped:
                    break
            cap.release()
            cap = None  # read failed (or stopped): reconnect on the next turn
        if cap is not None:
            cap.release()


def _sleep_unless(stopped, seconds: float, step: float = 0.05) -> bool:
    """Sleep `seconds` in short steps; True as soon as `stopped()` says so."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if stopped():
            return True
        time.sleep(min(step, max(0.0, end - time.monotonic())))
    return stopped()


class WatchSource(Source):
    """A directory a scanner writes into (subfolders included), polled every `poll_s`. A file is read
    once its size and mtime are unchanged between two polls and it was last modified `settle_s` ago (a
    scanner that pauses mid-write must not have its half file read); a file that still fails to decode
    is tried again `retries` times, a poll apart, before it becomes an error frame (a writer that paused
    longer than `settle_s`). A file rewritten under the same name is read again: files are known by
    (path, size, mtime). The source ends after `idle_s` without a new file; files already there at
    start are read first.

    Memory stays bounded however many files arrive: names older than `horizon_s` before the newest
    file seen are forgotten, and files older than anything forgotten are ignored (a file copied in with
    an old preserved mtime would be missed; copy without preserving times)."""

    live = True
    mode = "watch"

    def __init__(self, directory: str, idle_s: float = 10.0, poll_s: float = 0.2, settle_s: float = 0.5,
                 horizon_s: float = 300.0, kind: str = "frames", retries: int = 3, **kw):
        super().__init__(**kw)
        self.dir, self.name, self.kind = Path(directory), str(directory), kind
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{directory}: not a directory (watch mode needs one)")
        self.idle_s, self.poll_s, self.settle_s, self.horizon_s = idle_s, poll_s, settle_s, horizon_s
        self.retries = retries
        self.done: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) of the version read (pruned)
        self.failed: dict[tuple, int] = {}  # (path, size, mtime_ns) -> failed reads so far
        self.cutoff_ns = -1  # files at or before this mtime were forgotten: ignore them
        self.skipped: list[Skipped] = []  # what was found that is no image (each path once)
        self._skipped_seen: set[str] = set()

    def _candidates(self):
        files, cut = walk(self.dir)
        for p in files:
            why = not_image_reason(p)
            if why is None:
                yield p
            elif why != "partial or temporary file (still being written?)":
                self._skip(Skipped(str(p), why))
        for s in cut:
            self._skip(s)

    def _skip(self, s: Skipped) -> None:
        if s.path not in self._skipped_seen and len(self._skipped_seen) < 10000:
            self._skipped_seen.add(s.path)
            self.skipped.append(s)
            log.warning("%s: skipped: %s", s.path, s.reason)

    def _scan(self, pending: dict) -> list[tuple[int, str, tuple[int, int]]]:
        """Files stable since the last poll, oldest first; updates `pending`."""
        ready, now, settled_ns = [], {}, time.time_ns() - int(self.settle_s * 1e9)
        for p in self._candidates():
            try:
                st = p.stat()
            except OSError:  # removed between listing and stat
                continue
            key, sig = str(p), (st.st_size, st.st_mtime_ns)
            if st.st_mtime_ns <= self.cutoff_ns or self.done.get(key) == sig:
                continue
            if pending.get(key) == sig and st.st_mtime_ns <= settled_ns:
                ready.append((st.st_mtime_ns, key, sig))
            else:
                now[key] = sig
        pending.clear()
        pending.update(now)
        current = {(k, *sig) for k, sig in now.items()} | {(k, *sig) for _, k, sig in ready}
        self.failed = {k: n for k, n in self.failed.items() if k in current}  # rewritten or removed
        return sorted(ready)

    def _forget_old(self) -> None:
        newest = max((m for _, m in self.done.values()), default=0)
        old = {n: m for n, (_, m) in self.done.items() if m < newest - int(self.horizon_s * 1e9)}
        if old:
            self.cutoff_ns = max(self.cutoff_ns, max(old.values()))
            for n in old:
                del self.done[n]

    def _read(self, path: str, sig) -> Frame | None:
        """The frame, or None while a failed read is still to be retried (a writer may have paused)."""
        frame = _timed_read(path, time.perf_counter(), self.reduction)
        tries = self.failed.pop((path, *sig), 0) + 1
        if frame.error is not None and tries <= self.retries:
            self.failed[(path, *sig)] = tries
            return None
        self.done[path] = sig
        return frame

    def _items(self) -> Iterator[Frame]:
        pending: dict[str, tuple[int, int]] = {}
        last_new = time.monotonic()
        while not self._stopped:
            for _, path, sig in self._scan(pending):
                frame = self._read(path, sig)
                if frame is None:
                    continue
                yield frame
                last_new = time.monotonic()
                if self._stopped:
                    return
            self._forget_old()
            if time.monotonic() - last_new >= self.idle_s and not pending and not self.failed:
                return
            _sleep_unless(lambda: self._stopped, self.poll_s)


def _camera_target(source):
    """An int camera index from '0', '1', ... else the string (URL or pipeline) unchanged."""
    return int(source) if isinstance(source, int) or str(source).isdigit() else str(source)


def resolve_mode(source, mode: str = "auto") -> str:
    """The concrete mode for `source` under 'auto': camera, video, or frames (crops/watch are explicit)."""
    if mode not in MODES:
        raise ValueError(f"unknown stream mode {mode!r}; choose from {', '.join(MODES)}")
    if mode != "auto":
        return mode
    s = str(source)
    if isinstance(source, int) or s.isdigit() or "://" in s or "!" in s:
        return "camera"
    p = Path(s)
    if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
        return "video"
    if p.is_dir() or p.is_file() or globmod.has_magic(s):
        return "frames"
    raise FileNotFoundError(f"{source}: not a file, folder, glob, camera index or stream URL")


def open_source(source, mode: str = "auto", loop: int = 1, max_frames: int | None = None,
                retries: int = 5, backoff_s: float = 0.5, watch_idle_s: float = 10.0,
                poll_s: float = 0.2, pace_fps: float | None = None) -> Source:
    """A Source for `source` (path, glob, camera index, URL or GStreamer pipeline) in `mode`."""
    mode = resolve_mode(source, mode)
    kw = {"loop": loop, "max_frames": max_frames, "pace_fps": pace_fps}
    if mode == "camera":
        return LiveSource(_camera_target(source), retries=retries, backoff_s=backoff_s, **kw)
    if mode == "video":
        return VideoSource(str(source), **kw)
    if mode == "watch":
        return WatchSource(str(source), idle_s=watch_idle_s, poll_s=poll_s, **kw)
    return FileSource(str(source), kind="crops" if mode == "crops" else "frames", **kw)


"""End-to-end `stream` throughput and memory: BCCD frames -> localiser -> ensemble -> every sink, on CPU.

Loops the 364 BCCD frames until --frames frames (default 10,000) have gone through, then records
frames/s, cells/s, per-frame latency p50/p99, the per-stage time breakdown and RSS at start, end and
along the way (a soak test: RSS must level off, not climb with the number of frames).

    python benchmarks/bench_stream.py                 # 10,000 frames -> benchmarks/results/stream.{json,md}
    python benchmarks/bench_stream.py --frames 2000
    python benchmarks/bench_stream.py --quick         # 60 frames smoke test -> results/stream_quick.*
"""
from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import markdown_table, write_results  # noqa: E402
from wbc_edge.data.images import is_image_file  # noqa: E402
from wbc_edge.edge.pipeline import run_stream  # noqa: E402

DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "bccd-frames" / "BCCD" / "JPEGImages"
DEFAULT_BUNDLE = ROOT / "data" / "sample" / "bundle"


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=10_000, help="frames to stream (the source is looped)")
    p.add_argument("--quick", action="store_true", help="60-frame smoke test, written to stream_quick.*")
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--out", type=Path, help="keep the stream's outputs here (default: a temp dir, removed)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-delay-ms", type=float, default=20.0)
    p.add_argument("--views", help="comma-separated TTA views (default: the bundle's)")
    p.add_argument("--workers", type=int, default=1, help="localiser threads")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's)")
    p.add_argument("--results", type=Path, default=None, help="results folder (default: benchmarks/results)")
    return p.parse_args(argv)


def _progress_printer(every_s: float = 15.0):
    """Print a progress line at most every `every_s` seconds (a soak run takes a while)."""
    last = [0.0]

    def show(p: dict) -> None:
        if time.monotonic() - last[0] >= every_s:
            last[0] = time.monotonic()
            print(f"  {p['frames']} frames, {p['cells']} cells, {p['fps']} frames/s", flush=True)
    return show


def _tables(s: dict) -> str:
    lat, rss = s["latency_ms"], s["rss_mb"]
    head = [{"frames": s["frames"], "cells": s["cells"], "frames/s": s["fps"], "cells/s": s["cells_per_s"],
             "latency p50 ms": lat["p50"], "latency p99 ms": lat["p99"], "RSS start MB": rss["start"],
             "RSS end MB": rss["end"], "wall s": s["wall_s"], "runner": s["runner"],
             "views": ",".join(s["views"])}]
    stages = [{"stage": k, "total s": v["total_s"], "calls": v["calls"], "ms/call": v["ms_per_call"],
               "ms/frame": v["ms_per_frame"]} for k, v in s["timing"].items()]
    trace = [{"frames": f, "RSS MB": mb} for f, mb in rss.get("trace", [])]
    parts = [markdown_table(head), "## Per-stage time (stages overlap on threads)", markdown_table(stages)]
    if trace:
        parts += ["## RSS along the run", markdown_table(trace)]
    return "\n\n".join(parts)


def main(argv=None) -> int:
    a = _args(argv)
    frames = 60 if a.quick else a.frames
    n_files = sum(1 for p in a.source.iterdir() if is_image_file(p))
    if not n_files:
        print(f"no frames in {a.source}", file=sys.stderr)
        return 1
    out = a.out or Path(tempfile.mkdtemp(prefix="wbc-bench-stream-"))
    logging.basicConfig(level=logging.WARNING)
    print(f"streaming {frames} frames ({n_files} files looped) from {a.source} with {a.bundle}", flush=True)
    try:
        s = run_stream(a.source, a.bundle, out, mode="frames", views=a.views.split(",") if a.views else None,
                       max_batch=a.max_batch, max_delay_ms=a.max_delay_ms, loop=math.ceil(frames / n_files),
                       max_frames=frames, workers=a.workers, threads=a.threads,
                       on_progress=_progress_printer()).to_dict()
    finally:
        if a.out is None:
            shutil.rmtree(out, ignore_errors=True)
    config = {"source": str(a.source), "bundle": str(a.bundle), "frames_requested": frames,
              "max_batch": a.max_batch, "max_delay_ms": a.max_delay_ms, "workers": a.workers,
              "threads": a.threads}
    keep = ("status", "frames", "cells", "errors", "fps", "cells_per_s", "latency_ms", "timing", "rss_mb",
            "wall_s", "load_s", "batches", "runner", "views", "precision", "differential")
    payload = {"config": config, **{k: s[k] for k in keep}}
    path = write_results("stream_quick" if a.quick else "stream", payload, _tables(s), a.results)
    print(_tables(s))
    print(f"\nwritten: {path}")
    return 0 if s["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())

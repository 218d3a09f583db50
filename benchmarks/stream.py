"""What a camera vendor asks: frames/s and per-frame latency of `wbc-edge stream` against frame size.

    python -m benchmarks.stream [--frames 300] [--sizes 640x480,1440x900,1920x1080,2448x2048]
    wbc-edge bench stream --frames 300 [--workers 2]

Frames are real smears, written as JPEG (quality 95) the way a camera's frame grabber or a scanner
would: 640x480 are BCCD frames (../shared/data/bccd-frames, else data/sample/frames), 1440x900 the
Chula Raspberry Pi frames (../shared/data/chula-rpi/frames), and 1920x1080 / 2448x2048 mosaics of the
Chula frames (red cells keep their 85 px; seams between tiles are the only thing no camera makes).
Each size is one slide (one folder) streamed with the shipped bundle through the whole pipeline
(decode, impulse guard, per-slide scale, localiser, crops, colour step, ensemble, site monitor, every
sink), looped to --frames frames. Latency: read start -> every sink written, per frame; first with the
frames read as fast as they go (fps; latency then includes the frames queued ahead: the bounded queues
are full), then played at --camera-fps like a camera (the latency a user sees; sizes that keep up).
Writes benchmarks/results/stream_sizes.{json,md,png} (bench_stream.py's 10,000-frame soak writes
stream.*), with the machine's load (a training run?) recorded.
Set WBC_EDGE_CODE=DIR to measure another checkout's package (e.g. the code before an optimisation).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("WBC_EDGE_CODE"):
    sys.path.insert(0, os.environ["WBC_EDGE_CODE"])
sys.path.insert(1 if os.environ.get("WBC_EDGE_CODE") else 0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import wbc_edge  # noqa: E402
from benchmarks._common import RESULTS, markdown_table, write_results  # noqa: E402
from benchmarks.throughput import machine_load  # noqa: E402
from wbc_edge.data.images import read_image  # noqa: E402
from wbc_edge.edge.pipeline import run_stream  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SIZES = ("640x480", "1440x900", "1920x1080", "2448x2048")


def _jpegs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.jpg"))


def source_frames(size: str) -> list[np.ndarray]:
    """Real RGB frames of `size`: as they are (640x480, 1440x900) or mosaics of the Chula frames."""
    w, h = (int(v) for v in size.split("x"))
    bccd = SHARED / "bccd-frames" / "BCCD" / "JPEGImages"
    if (w, h) == (640, 480):
        files = _jpegs(bccd)[:60] if bccd.is_dir() else _jpegs(ROOT / "data" / "sample" / "frames" / "JPEGImages")
        return [read_image(f) for f in files]
    chula = [read_image(f) for f in _jpegs(SHARED / "chula-rpi" / "frames")]
    if not chula:
        raise SystemExit("the Chula frames (../shared/data/chula-rpi/frames) are needed for the large sizes")
    th, tw = chula[0].shape[:2]
    if (w, h) == (tw, th):
        return chula
    rows, cols = math.ceil(h / th), math.ceil(w / tw)
    out = []
    for i in range(len(chula)):  # each mosaic starts at another frame: no two mosaics are the same
        tiles = [chula[(i + k) % len(chula)] for k in range(rows * cols)]
        mosaic = np.concatenate([np.concatenate(tiles[r * cols:(r + 1) * cols], 1) for r in range(rows)], 0)
        out.append(np.ascontiguousarray(mosaic[:h, :w]))
    return out


def write_slide(frames: list[np.ndarray], folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"frame_{i:04d}.jpg"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])


def _run(folder: Path, out: Path, bundle: Path, n_frames: int, workers: int, pace_fps=None) -> dict:
    n_files = len(_jpegs(folder))
    paced = {"pace_fps": pace_fps} if pace_fps else {}  # (a checkout before pacing existed runs unpaced)
    s = run_stream(folder, bundle, out, mode="frames", loop=math.ceil(n_frames / n_files), max_frames=n_frames,
                   workers=workers, **paced).to_dict()
    shutil.rmtree(out, ignore_errors=True)
    return s


def measure(size: str, tmp: Path, bundle: Path, n_frames: int, workers: int, camera_fps: float) -> dict:
    """As fast as the frames can be read (throughput, and the latency of a full pipeline), then played at
    `camera_fps` as a camera delivers them (the latency a user sees), if the first run kept up with it."""
    folder = tmp / size
    write_slide(source_frames(size), folder)
    s = _run(folder, tmp / f"out-{size}", bundle, n_frames, workers)
    paced = _run(folder, tmp / f"paced-{size}", bundle, n_frames, workers, camera_fps) \
        if camera_fps and s["fps"] >= camera_fps else None
    w, h = (int(v) for v in size.split("x"))
    stages = {k: round(v["ms_per_frame"], 2) for k, v in s["timing"].items()}
    return {"size": size, "megapixels": round(w * h / 1e6, 2), "frames": s["frames"], "cells": s["cells"],
            "cells_per_frame": round(s["cells"] / max(1, s["frames"]), 2), "fps": s["fps"],
            "cells_per_s": s["cells_per_s"], "latency_p50_ms": s["latency_ms"]["p50"],
            "latency_p99_ms": s["latency_ms"]["p99"],
            f"at_{camera_fps:g}fps_p50_ms": paced["latency_ms"]["p50"] if paced else None,
            f"at_{camera_fps:g}fps_p99_ms": paced["latency_ms"]["p99"] if paced else None,
            "status": s["status"], "workers": workers,
            "ms_per_frame": stages, "views": s["views"], "runner": s["runner"],
            # frames the settled slide let the reader decode at reduced size (absent before issue 18's change)
            "decoded_reduced": s.get("decoded_reduced", {})}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    x = np.arange(len(rows))
    names = [r["size"] for r in rows]
    a.bar(x, [r["fps"] for r in rows], color="tab:blue")
    for y, label in ((30, "30 fps camera"), (60, "2x a 30 fps camera")):
        a.axhline(y, ls="--", lw=1, color="grey")
        a.text(len(rows) - 0.5, y, label, ha="right", va="bottom", fontsize=7)
    a.set_xticks(x, names, fontsize=8)
    a.set_ylabel("frames / s")
    b.bar(x - 0.2, [r["latency_p50_ms"] for r in rows], 0.4, label="p50")
    b.bar(x + 0.2, [r["latency_p99_ms"] for r in rows], 0.4, label="p99")
    b.set_xticks(x, names, fontsize=8)
    b.set_ylabel("latency per frame (ms)")
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=300, help="frames per size (the slide is looped)")
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--bundle", type=Path, default=ROOT / "data" / "sample" / "bundle")
    ap.add_argument("--workers", type=int, default=1, help="localiser threads")
    ap.add_argument("--camera-fps", type=float, default=30.0,
                    help="also play the frames at this rate, as a camera delivers them, for the latency a user "
                         "sees (0: skip)")
    ap.add_argument("--name", default="stream_sizes", help="results name (e.g. stream_sizes_before)")
    ap.add_argument("--quick", action="store_true", help="40 frames of 640x480 and 1440x900, to <name>_quick.*")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    sizes = ["640x480", "1440x900"] if a.quick else a.sizes.split(",")
    n = 40 if a.quick else a.frames
    name = f"{a.name}_quick" if a.quick else a.name
    load = machine_load()
    code = str(Path(wbc_edge.__file__).resolve().parents[1])
    print(f"wbc_edge from {code}; {load}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for size in sizes:
            rows.append(measure(size, Path(tmp), a.bundle, n, a.workers, a.camera_fps))
            print({k: v for k, v in rows[-1].items() if k != "ms_per_frame"}, flush=True)
    flat = [{**{k: v for k, v in r.items() if k not in ("ms_per_frame", "views", "runner")},
             "decoded_reduced": ", ".join(f"{n} at {k}" for k, n in r["decoded_reduced"].items()) or "none"}
            for r in rows]
    stages = [{"size": r["size"], **r["ms_per_frame"]} for r in rows]
    text = (f"`wbc-edge stream` on JPEG frames of each size (one slide each, {n} frames), bundle {a.bundle} "
            f"(views {rows[0]['views']}, {rows[0]['runner']}), {a.workers} localiser thread(s); package from "
            f"`{code}`. Machine load: {load}.\n\n" + markdown_table(flat)
            + "\n\n## Time per frame in each stage (ms; stages overlap on threads)\n\n" + markdown_table(stages)
            + f"\n\n![stream]({name}.png)")
    write_results(name, {"rows": rows, "load": load, "code": code, "frames_per_size": n}, text, a.out)
    plot(rows, Path(a.out) / f"{name}.png", f"wbc-edge stream, {Path(a.bundle).name} bundle, 2-core CPU")
    print(text)
    return {"rows": rows}


if __name__ == "__main__":
    main()

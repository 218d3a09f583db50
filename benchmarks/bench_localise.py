"""WBC localisation on real BCCD frames against their VOC WBC boxes (IoU >= 0.5).

    python -m benchmarks.bench_localise [--quick]

A small grid of LocaliserConfig values is scored on the even-numbered frames (fit); the best is
reported on the odd-numbered frames (held out) and on all frames. Writes
benchmarks/results/localise.{json,md} and localise_examples.png (ground truth green, ours red).
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from benchmarks._common import RESULTS, markdown_table, write_results
from wbc_edge.data.images import read_image
from wbc_edge.data.voc import read_voc
from wbc_edge.edge.localise import LocaliserConfig, localise, match

ROOT = Path(__file__).resolve().parents[1]
GRID = {"box_margin": (0.0, 0.05, 0.1), "merge_radius": (10, 15), "score_floor": (25.0, 35.0)}


def load_frames(quick: bool) -> tuple[list, str]:
    shared = ROOT.parent / "shared" / "data" / "bccd-frames" / "BCCD"
    base = shared if shared.is_dir() and not quick else ROOT / "data" / "sample" / "frames"
    frames = []
    for xml in sorted((base / "Annotations").glob("*.xml")):
        frames.append((xml.stem, read_image(base / "JPEGImages" / f"{xml.stem}.jpg"), read_voc(xml).get("WBC", [])))
    return frames, str(base)


def score(frames, cfg) -> dict:
    tp = fp = fn = 0
    ious, ms, misses = [], [], []
    for name, img, truth in frames:
        t0 = time.perf_counter()
        boxes = localise(img, cfg)
        ms.append(1000 * (time.perf_counter() - t0))
        a, b, c, v = match([bx.as_list() for bx in boxes], truth)
        tp, fp, fn, ious = tp + a, fp + b, fn + c, ious + v
        if b or c:
            misses.append(name)
    rec, prec = tp / max(tp + fn, 1), tp / max(tp + fp, 1)
    return {"frames": len(frames), "wbc": tp + fn, "recall": rec, "precision": prec,
            "f1": 2 * rec * prec / max(rec + prec, 1e-9), "mean_iou": float(np.mean(ious)) if ious else 0.0,
            "ms_per_frame_p50": float(np.median(ms)), "frames_with_errors": misses}


def fit(frames) -> LocaliserConfig:
    best, best_cfg = -1.0, None
    for values in itertools.product(*GRID.values()):
        cfg = replace(LocaliserConfig(), **dict(zip(GRID, values)))
        f1 = score(frames, cfg)["f1"]
        if f1 > best:
            best, best_cfg = f1, cfg
    return best_cfg


def draw_examples(frames, cfg, path: Path, n: int = 6) -> None:
    tiles = []
    for name, img, truth in frames[:n]:
        im = img[..., ::-1].copy()
        for t in truth:
            cv2.rectangle(im, (int(t[0]), int(t[1])), (int(t[2]), int(t[3])), (0, 200, 0), 3)
        for b in localise(img, cfg):
            cv2.rectangle(im, (int(b.x0), int(b.y0)), (int(b.x1), int(b.y1)), (0, 0, 255), 2)
        cv2.putText(im, name, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 2)
        tiles.append(cv2.resize(im, (320, 240)))
    while len(tiles) % 3:
        tiles.append(np.full_like(tiles[0], 255))
    rows = [np.hstack(tiles[i:i + 3]) for i in range(0, len(tiles), 3)]
    cv2.imwrite(str(path), np.vstack(rows))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="the 8 sample frames, defaults only")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    frames, src = load_frames(a.quick)
    cfg = LocaliserConfig() if a.quick else fit(frames[0::2])
    rows = [{"split": "fit (even frames)", **score(frames[0::2], cfg)},
            {"split": "held out (odd frames)", **score(frames[1::2], cfg)},
            {"split": "all", **score(frames, cfg)}]
    cols = ["split", "frames", "wbc", "recall", "precision", "f1", "mean_iou", "ms_per_frame_p50"]
    table = (f"Frames: {src}. Config: {cfg.to_dict()} (defaults: {LocaliserConfig().to_dict()}).\n\n"
             + markdown_table(rows, cols) + "\n\nFrames with a miss or a false box (all): "
             + ", ".join(rows[2]["frames_with_errors"]))
    a.out.mkdir(parents=True, exist_ok=True)
    draw_examples(frames, cfg, a.out / "localise_examples.png")
    write_results("localise", {"source": src, "config": cfg.to_dict(), "rows": rows}, table, a.out)
    print(table)
    return {"config": cfg.to_dict(), "rows": rows}


if __name__ == "__main__":
    main()

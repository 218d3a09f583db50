"""ORT INT8 (U8S8 Q/DQ) against ORT FP32 on this CPU: throughput at a batch size, and accuracy drop.

    python -m benchmarks.bench_int8 --bundle data/sample/bundle --calib CALIB --val VAL [--batch 32]

CALIB and VAL are ImageFolders/manifests of real cells; VAL must be held out from training (e.g. the
`val_split.csv` the trainer writes beside the bundle, or data/sample/cells). The bundle is
copied; the original is not modified. Writes benchmarks/results/int8.{json,md}.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, markdown_table, time_median, write_results
from wbc_edge.build.builder import build
from wbc_edge.edge.runners import OrtRunner


def throughput(onnx_path: Path, batch: np.ndarray, repeats: int) -> float:
    with OrtRunner(onnx_path) as r:
        return len(batch) / time_median(lambda: r.infer(batch), repeats=repeats, warmup=3)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", type=Path, default=Path("data/sample/bundle"))
    ap.add_argument("--calib", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="int8", help="result file stem")
    a = ap.parse_args(argv)
    if a.quick:
        a.n_calib, a.repeats = 32, 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "bundle"
        shutil.copytree(a.bundle, work)
        b = build(work, "ort-int8", calib=a.calib, val=a.val, calib_method=a.method, n_calib=a.n_calib,
                  max_f1_drop=1.0)  # measure, never refuse, here
        s = b.preprocess.input_size
        x = np.random.default_rng(0).integers(0, 256, (a.batch, s, s, 3), dtype=np.uint8)
        m = b.members[0]
        fp32 = throughput(b.path(m.onnx), x, a.repeats)
        int8 = throughput(b.path(m.artifacts["ort-int8"]), x, a.repeats)
        check = b.extra["calibration"]["ort-int8"]
    row = {"batch": a.batch, "fp32_img_s": fp32, "int8_img_s": int8, "speedup": int8 / fp32,
           "macro_f1_fp32": check["macro_f1_fp32"], "macro_f1_int8": check["macro_f1_int8"],
           "macro_f1_drop_points": 100 * check["macro_f1_drop"], "top1_agreement": check["top1_agreement"],
           "n_val": check["n_val"], "method": a.method}
    worst = max(check["recall_drop"].items(), key=lambda kv: kv[1])
    table = markdown_table([row]) + f"\n\nLargest per-class recall drop: {worst[0]} {100 * worst[1]:.2f} points. " \
        f"Member {m.arch}, input {s}px, calibration {a.calib} ({check['n_calib']} cells), validation {a.val}."
    payload = {"config": {k: str(v) for k, v in vars(a).items()}, "result": row, "check": check}
    write_results(a.name, payload, table, a.out)
    print(table)
    return payload


if __name__ == "__main__":
    main()

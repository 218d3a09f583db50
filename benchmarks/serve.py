"""Serving on Triton vs in-process: 1, 2 and 4 concurrent streams (separate processes, like microscopes
sharing one server) each sending the classifier stage's micro-batches of model-input cells.

Each stream: the bundle's ensemble with its TTA views on batches of --batch real cells (the sample cells
through the bundle's Preprocessor), for --seconds after a common start. Remote: `EnsembleClassifier(...,
server=URL)` against one `tritonserver` (the nvidia-pytriton wheel's binary; the repository's graph in
its Python backend under ONNX Runtime, as in tests/test_triton.py). In-process: the same classifier on
ONNX Runtime CPU, each stream with cores/streams threads. Recorded per configuration: cells/s over all
streams, per-batch latency p50/p99, the batch sizes the server formed (its statistics), and lost cells
(every batch must come back whole; a stream's probabilities are compared with the in-process ones).

Timings are only meaningful on an otherwise idle machine: the script refuses to measure while
`wbc-edge train` runs unless --allow-load, and records the load it saw either way.

    python benchmarks/serve.py                  # -> benchmarks/results/serve.{json,md,png}
    python benchmarks/serve.py --seconds 3 --out /tmp/serve   # a quick look
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks._common import markdown_table, write_results  # noqa: E402

DEFAULT_BUNDLE = ROOT / "data" / "sample" / "bundle"
DEFAULT_CELLS = ROOT / "data" / "sample" / "cells"


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--cells", type=Path, default=DEFAULT_CELLS, help="labelled cell crops (ImageFolder)")
    p.add_argument("--streams", default="1,2,4")
    p.add_argument("--batch", type=int, default=8, help="cells per request (a frame's micro-batch)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time per configuration")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    p.add_argument("--allow-load", action="store_true", help="measure even while a training job runs")
    p.add_argument("--quiet-load", type=float, default=1.0,
                   help="before each configuration wait (up to 3 min) for the 1-min load average to drop below")
    return p.parse_args(argv)


def _load() -> dict:
    found = subprocess.run(["pgrep", "-f", "wbc-edge train"], capture_output=True, text=True, check=False)
    return {"training_running": bool(found.stdout.split()), "loadavg_1m": round(os.getloadavg()[0], 2)}


def _stream(remote_url, bundle_dir, cells_path, batch, seconds, start, threads, out_q) -> None:
    """One stream (its own process): batches of cells through the classifier until the time is up."""
    from wbc_edge.bundle import Bundle
    from wbc_edge.edge.classifier import EnsembleClassifier

    cells, reference = np.load(cells_path)["cells"], np.load(cells_path)["probs"]
    b = Bundle.load(bundle_dir)
    lat, n_cells, lost, max_diff, i = [], 0, 0, 0.0, 0
    with EnsembleClassifier(b, server=remote_url, threads=threads, calibrated=False) as clf:
        clf.predict(cells[:batch])  # warm-up: sessions, connections
        start.wait()  # every stream loaded and warmed up: they start together
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            idx = np.arange(i * batch, (i + 1) * batch) % len(cells)
            t0 = time.perf_counter()
            probs = clf.predict(cells[idx])
            lat.append(time.perf_counter() - t0)
            lost += len(idx) - len(probs)
            n_cells += len(probs)
            max_diff = max(max_diff, float(np.abs(probs - reference[idx]).max()))
            i += 1
        report = clf.server_report
    out_q.put({"latencies": lat, "cells": n_cells, "lost": lost, "max_abs_diff": max_diff,
               "outages": len(report["outages"]) if report else 0})


def _server_batches(stats_before: dict, stats_after: dict) -> dict:
    """{batch size: executions} the server formed between two statistics snapshots."""
    def counts(stats):
        return {int(s["batch_size"]): int(s["compute_infer"]["count"]) for s in stats.get("batch_stats", [])}
    before, after = counts(stats_before), counts(stats_after)
    return {k: after[k] - before.get(k, 0) for k in sorted(after) if after[k] - before.get(k, 0)}


def _quiet(limit: float, wait_s: float = 180.0) -> None:
    """Wait (at most `wait_s`) until the 1-minute load average is under `limit`: other jobs on a shared
    machine (and the previous configuration's own load) would otherwise be measured too."""
    t_end = time.monotonic() + wait_s
    while os.getloadavg()[0] >= limit and time.monotonic() < t_end:
        time.sleep(5)


def _run(n: int, remote_url, args, cells_path, stats=None) -> dict:
    _quiet(args.quiet_load)
    load_start = round(os.getloadavg()[0], 2)
    ctx = mp.get_context("spawn")  # fresh processes: no ORT or gRPC state shared through fork
    out_q = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // n)
    start = ctx.Barrier(n)
    procs = [ctx.Process(target=_stream, args=(remote_url, args.bundle, cells_path, args.batch, args.seconds,
                                               start, threads, out_q)) for _ in range(n)]
    before = stats() if stats else None
    for p in procs:
        p.start()
    results = [out_q.get(timeout=args.seconds + 300) for _ in procs]
    for p in procs:
        p.join()
    lat = np.concatenate([r["latencies"] for r in results]) * 1e3
    row = {"mode": "triton" if remote_url else "in-process", "streams": n,
           "cells_per_s": round(sum(r["cells"] for r in results) / args.seconds, 1),
           "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
           "cells": sum(r["cells"] for r in results), "lost": sum(r["lost"] for r in results),
           "max_abs_diff": max(r["max_abs_diff"] for r in results),
           "outages": sum(r["outages"] for r in results), "load_1m_at_start": load_start}
    if stats:
        formed = _server_batches(before, stats())
        execs = sum(formed.values())
        row["server_batches"] = " ".join(f"{k}x{v}" for k, v in formed.items())  # size x executions
        row["mean_server_batch"] = round(sum(k * v for k, v in formed.items()) / max(1, execs), 1)
    return row


def _cells(args, tmp: Path) -> Path:
    """The sample cells through the bundle's preprocessor, and their in-process probabilities."""
    from wbc_edge.bundle import Bundle
    from wbc_edge.data.datasets import from_image_folder
    from wbc_edge.edge.classifier import EnsembleClassifier
    from wbc_edge.edge.preprocess import Preprocessor

    b = Bundle.load(args.bundle)
    cells = Preprocessor.for_bundle(b).load(from_image_folder(args.cells))[0]
    with EnsembleClassifier(b, calibrated=False) as clf:
        probs = clf.predict(cells)
    path = tmp / "cells.npz"
    np.savez(path, cells=cells, probs=probs)
    return path


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for mode, style in (("in-process", "o-"), ("triton", "s-")):
        rs = [r for r in rows if r["mode"] == mode]
        ax1.plot([r["streams"] for r in rs], [r["cells_per_s"] for r in rs], style, label=mode)
        ax2.plot([r["streams"] for r in rs], [r["p99_ms"] for r in rs], style, label=f"{mode} p99")
        ax2.plot([r["streams"] for r in rs], [r["p50_ms"] for r in rs], style, alpha=0.4, label=f"{mode} p50")
    ax1.set(xlabel="concurrent streams", ylabel="cells/s (all streams)", title="throughput")
    ax2.set(xlabel="concurrent streams", ylabel="ms per batch", title="latency", yscale="log")
    for ax in (ax1, ax2):
        ax.set_xticks(sorted({r["streams"] for r in rows}))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    from wbc_edge.build.triton import write_repository
    from wbc_edge.build.triton_server import LocalServer
    from wbc_edge.bundle import Bundle

    args = _args(argv)
    load = _load()
    if load["training_running"] and not args.allow_load:
        sys.exit("a `wbc-edge train` job is running: timings would be meaningless (wait, or --allow-load)")
    streams = [int(s) for s in args.streams.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cells_path = _cells(args, tmp)
        repo = write_repository(Bundle.load(args.bundle), tmp / "repo", backend="python")
        rows = [_run(n, None, args, cells_path) for n in streams]
        with LocalServer(repo) as server:
            from tritonclient import grpc

            client = grpc.InferenceServerClient(server.url.removeprefix("grpc://"))

            def stats():
                return client.get_inference_statistics("wbc_edge", as_json=True)["model_stats"][0]

            rows += [_run(n, server.url, args, cells_path, stats) for n in streams]
            client.close()
    load_after = _load()
    columns = ["mode", "streams", "cells_per_s", "p50_ms", "p99_ms", "mean_server_batch", "server_batches",
               "cells", "lost", "max_abs_diff", "load_1m_at_start"]
    note = (f"\n\nClassifier stage only (the sample bundle's ensemble, TTA views {Bundle.load(args.bundle).views}, "
            f"{args.batch} cells per request, {args.seconds:.0f} s per configuration, each stream a process). "
            "Server: tritonserver 2.51 from the nvidia-pytriton wheel, the repository's graph in its Python "
            "backend under ONNX Runtime CPU, one instance, dynamic batching (queue delay 2 ms). In-process: "
            "ONNX Runtime CPU with cores/streams threads per stream, the bundle as it is (its members one by "
            "one unless it carries a fused graph; the server always serves the fused graph). Same machine. "
            f"Load: training running {load['training_running']} (before) / {load_after['training_running']} "
            f"(after), 1-min load average {load['loadavg_1m']} before.")
    out = write_results("serve", {"rows": rows, "load_before": load, "load_after": load_after,
                                  "batch": args.batch, "seconds": args.seconds},
                        markdown_table(rows, columns) + note, args.out)
    _plot(rows, out.with_suffix(".png"))
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()

"""Shared benchmark plumbing: machine description, warm-up + median timing, JSON + markdown output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
_PACKAGES = ("wbc-edge", "numpy", "opencv-python-headless", "onnxruntime", "onnx", "numba", "torch", "timm",
             "torchstain")


def machine_info() -> dict:
    """CPU model, cores and library versions, recorded in every result."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def time_median(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict, table_md: str, out_dir: Path | None = None) -> Path:
    """Write `<name>.json` (payload + machine) and `<name>.md` (title, machine, table)."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), **payload}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2))
    m = payload["machine"]
    head = f"# {name}\n\nMachine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['date']}\n\n"
    (out_dir / f"{name}.md").write_text(head + table_md + "\n")
    return out_dir / f"{name}.json"

"""One command for the first GPU (`scripts/gpu-check`): install, build, parity, evaluate/stream, throughput.

Steps run in order; each records its result in `<out>/gpu_check.json` (+ `.md`, one summary table):

  cpu-reference   ORT CPU probabilities of each member on the sample cells (the parity reference)
  evaluate-cpu    `wbc-edge evaluate data/sample/cells --device cpu`
  stream-cpu      `wbc-edge stream data/sample/frames/JPEGImages --device cpu`
  gpu             the first GPU step: is there a CUDA device? (nvidia-smi). Without one the check stops
                  here, says so and exits 0: the dry run that proves every CPU step works.
  install         cupy-cuda12x[ctk], tensorrt-cu12, onnxruntime-gpu[cuda,cudnn] into this Python (pip;
                  `--wheels DIR` installs from a folder of wheels for a machine without network)
  engines         `wbc-edge build <copy of the bundle> --target trt-fp16|trt-int8 --calib data/sample/cells`
  parity          per member: ORT CUDA FP32, TensorRT FP16, TensorRT INT8 against ORT CPU FP32 (top-1
                  agreement, max |dp|), pass/fail by precision
  evaluate-cuda   evaluate with --device cuda at each precision; rows compared with the CPU run
  stream-cuda     stream with --device cuda; rows compared with the CPU run
  throughput      cells/s per stage (preprocess, classify, refine features) and end to end at batch
                  1/32/256, CPU and each CUDA precision

It stops before a step when its time budget (default 450 s, under the issue's 8 minutes) would be
exceeded. Exit code: 0 when every step that ran passed (a dry run included), 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, machine_info, markdown_table

ROOT = Path(__file__).resolve().parents[1]
BUNDLE, CELLS, FRAMES = ROOT / "data/sample/bundle", ROOT / "data/sample/cells", ROOT / "data/sample/frames/JPEGImages"
BATCHES = (1, 32, 256)
PRECISIONS = ("fp32", "fp16", "int8")  # fp32: ORT CUDA; fp16/int8: TensorRT engines (ORT fallback)
# Polygraphy-style tolerances by precision: FP32 strict, FP16 ~1e-2, INT8 by top-1 agreement
TOLERANCE = {"fp32": {"max_abs": 1e-3, "top1": 0.99}, "fp16": {"max_abs": 2e-2, "top1": 0.98},
             "int8": {"max_abs": None, "top1": 0.90}}
PIP = {"cupy": "cupy-cuda12x[ctk]>=13", "tensorrt": "tensorrt-cu12>=10.3",
       "onnxruntime-gpu": "onnxruntime-gpu[cuda,cudnn]>=1.19"}


class StopCheck(Exception):
    """Stop here (no GPU, out of time): not a failure."""


class Check:
    def __init__(self, out: Path, budget_s: float, wheels: Path | None, n_cells: int | None):
        self.out, self.budget_s, self.wheels, self.n_cells = out, budget_s, wheels, n_cells
        self.t0, self.state, self.steps = time.perf_counter(), {}, {}

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def cli(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        """`wbc-edge ARGS` in a fresh process (packages installed by `install` are seen), output kept."""
        run = subprocess.run([sys.executable, "-m", "wbc_edge.cli", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=timeout)
        if run.returncode != 0:
            tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"wbc-edge {' '.join(args[:2])} failed ({run.returncode}): {' | '.join(tail)}")
        return run


# ---- data ------------------------------------------------------------------------------------------------

def cells_data(ck: Check) -> Path:
    """The sample cells, or a manifest of the first `--cells` of them (a quick run, e.g. the test)."""
    if ck.n_cells is None:
        return CELLS
    lines = (CELLS / "manifest.csv").read_text().splitlines()
    rows = lines[1:]
    pick = [rows[i] for i in np.linspace(0, len(rows) - 1, min(ck.n_cells, len(rows))).astype(int)]
    path = ck.out / "cells.csv"
    path.write_text("\n".join([lines[0]] + [f"{CELLS / r.split(',')[0]},{r.split(',', 1)[1]}" for r in pick]) + "\n")
    return path


def model_input(ck: Check) -> np.ndarray:
    """The sample cells as model input (uint8 BxSxSx3) through the bundle's own preprocessor."""
    if "cells" not in ck.state:
        from wbc_edge.bundle import Bundle
        from wbc_edge.data.datasets import open_dataset
        from wbc_edge.data.images import read_image
        from wbc_edge.edge.preprocess import Preprocessor

        bundle = Bundle.load(BUNDLE)
        ds = open_dataset(cells_data(ck))
        images = ck.state["images"] = [read_image(s.path) for s in ds.samples]
        ck.state["cells"] = Preprocessor.for_bundle(bundle).crops(images).batch
    return ck.state["cells"]


def read_rows(path: Path, key) -> dict:
    return {key(r): r for r in map(json.loads, path.read_text().splitlines()) if r.get("pred")}


def compare_rows(cpu: dict, gpu: dict) -> dict:
    """Same cells, same class? and the largest confidence difference."""
    common = sorted(set(cpu) & set(gpu), key=str)
    same = sum(cpu[k]["pred"] == gpu[k]["pred"] for k in common)
    dconf = max((abs(cpu[k]["confidence"] - gpu[k]["confidence"]) for k in common), default=0.0)
    return {"rows_cpu": len(cpu), "rows_cuda": len(gpu), "common": len(common),
            "pred_agreement": round(same / max(1, len(common)), 4), "max_conf_diff": round(float(dconf), 5)}


EVAL_KEY = lambda r: r["path"]  # noqa: E731
STREAM_KEY = lambda r: (r["source"], r["frame"], r["cell"])  # noqa: E731


# ---- steps -----------------------------------------------------------------------------------------------

def step_cpu_reference(ck: Check) -> dict:
    from wbc_edge.bundle import Bundle
    from wbc_edge.edge.runners import OrtRunner

    bundle, cells = Bundle.load(BUNDLE), model_input(ck)
    ref = {}
    for m in bundle.members:
        with OrtRunner(bundle.path(m.onnx), "cpu") as r:
            ref[m.name] = r.infer(cells)
    ck.state["reference"] = ref
    return {"cells": int(len(cells)), "members": list(ref)}


def _evaluate(ck: Check, device: str, precision: str, bundle: Path) -> dict:
    out = ck.out / f"evaluate_{device}_{precision}"
    ck.cli("evaluate", str(cells_data(ck)), "--bundle", str(bundle), "--out", str(out), "--device", device,
           "--precision", precision)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"runner": metrics["runner"], "macro_f1": metrics.get("macro_f1"), "n": metrics["n_scored"],
            "rows": out / "predictions.jsonl"}


def _stream(ck: Check, device: str, precision: str, bundle: Path) -> dict:
    out = ck.out / f"stream_{device}_{precision}"
    ck.cli("stream", str(FRAMES), "--bundle", str(bundle), "--out", str(out), "--device", device,
           "--precision", precision, "--no-report")
    s = json.loads((out / "summary.json").read_text())
    return {"runner": s.get("runner"), "cells": s["cells"], "cells_per_s": s["cells_per_s"],
            "timing": s.get("timing"), "rows": out / "cells.jsonl"}


def step_evaluate_cpu(ck: Check) -> dict:
    r = _evaluate(ck, "cpu", "fp32", BUNDLE)
    ck.state["eval_cpu"] = read_rows(r.pop("rows"), EVAL_KEY)
    return r


def step_stream_cpu(ck: Check) -> dict:
    r = _stream(ck, "cpu", "fp32", BUNDLE)
    ck.state["stream_cpu"] = read_rows(r.pop("rows"), STREAM_KEY)
    return r


def gpu_present() -> tuple[bool, str]:
    """(a CUDA GPU is here, what nvidia-smi says or why not). No CUDA library is imported."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False, "nvidia-smi not found"
    run = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    if run.returncode != 0 or not run.stdout.strip():
        return False, f"nvidia-smi found no GPU ({(run.stderr or run.stdout).strip()[:200]})"
    return True, run.stdout.strip().splitlines()[0]


def step_gpu(ck: Check) -> dict:
    ok, what = gpu_present()
    if not ok:
        raise StopCheck(f"no CUDA GPU here ({what})")
    return {"gpu": what}


def _missing_packages() -> list[str]:
    code = ("import importlib.util as u, onnxruntime as o;"
            "print('cupy' if u.find_spec('cupy') is None else '');"
            "print('tensorrt' if u.find_spec('tensorrt') is None else '');"
            "print('' if 'CUDAExecutionProvider' in o.get_available_providers() else 'onnxruntime-gpu')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return [p for p in run.stdout.split() if p]


def step_install(ck: Check) -> dict:
    missing = _missing_packages()
    if not missing:
        return {"installed": [], "note": "everything present"}
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if ck.wheels:
        pip += ["--no-index", "--find-links", str(ck.wheels)]
    if "onnxruntime-gpu" in missing:  # both provide the `onnxruntime` module: the CPU one must go first
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "onnxruntime"], check=False)
    wanted = [PIP[p] for p in missing]
    run = subprocess.run(pip + wanted, capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(wanted)} failed: {run.stderr.strip()[-400:]}")
    return {"installed": wanted}


def step_engines(ck: Check) -> dict:
    bundle = ck.out / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(BUNDLE, bundle)
    times = {}
    for target in ("trt-fp16", "trt-int8"):
        t0 = time.perf_counter()
        extra = ["--calib", str(CELLS)] if target == "trt-int8" else []
        ck.cli("build", str(bundle), "--target", target, *extra, timeout=300)
        times[target] = round(time.perf_counter() - t0, 1)
    ck.state["bundle"] = bundle
    return {"bundle": str(bundle), "build_s": times}


def _probs(runner_factory, cells: np.ndarray) -> tuple[np.ndarray, str]:
    r = runner_factory()
    with r:
        return r.infer(cells), r.name


def step_parity(ck: Check) -> dict:
    from wbc_edge.bundle import Bundle
    from wbc_edge.edge.runners import OrtRunner
    from wbc_edge.edge.trt_runner import TensorRTRunner

    bundle, cells, ref = Bundle.load(ck.state["bundle"]), model_input(ck), ck.state["reference"]
    rows, ok = [], True
    for m in bundle.members:
        candidates = {"fp32": lambda: OrtRunner(bundle.path(m.onnx), "cuda"),
                      "fp16": lambda: TensorRTRunner(bundle.path(m.artifacts["trt-fp16"])),
                      "int8": lambda: TensorRTRunner(bundle.path(m.artifacts["trt-int8"]))}
        for precision, make in candidates.items():
            probs, name = _probs(make, cells)
            top1 = float((probs.argmax(1) == ref[m.name].argmax(1)).mean())
            max_abs = float(np.abs(probs - ref[m.name]).max())
            tol = TOLERANCE[precision]
            passed = top1 >= tol["top1"] and (tol["max_abs"] is None or max_abs <= tol["max_abs"])
            ok &= passed
            rows.append({"member": m.name, "precision": precision, "runner": name, "top1_agreement": round(top1, 4),
                         "max_abs_diff": round(max_abs, 5), "pass": passed})
    if not ok:
        ck.state["failed"] = True
    return {"rows": rows, "pass": ok}


def step_evaluate_cuda(ck: Check) -> dict:
    out = {}
    for precision in PRECISIONS:
        r = _evaluate(ck, "cuda", precision, ck.state["bundle"])
        out[precision] = {**r, **compare_rows(ck.state["eval_cpu"], read_rows(r.pop("rows"), EVAL_KEY))}
    return out


def step_stream_cuda(ck: Check) -> dict:
    out = {}
    for precision in PRECISIONS:
        r = _stream(ck, "cuda", precision, ck.state["bundle"])
        out[precision] = {**r, **compare_rows(ck.state["stream_cpu"], read_rows(r.pop("rows"), STREAM_KEY))}
    return out


def _cells_per_s(fn, n: int, repeats: int = 5) -> float:
    from benchmarks._common import time_median

    return round(n / max(time_median(fn, repeats=repeats), 1e-9), 1)


def step_throughput(ck: Check) -> dict:
    """cells/s per stage and end to end (native crops -> preprocess -> classify -> refine features) per batch."""
    from wbc_edge.bundle import Bundle
    from wbc_edge.edge.classifier import EnsembleClassifier
    from wbc_edge.edge.preprocess import Preprocessor

    bundle = Bundle.load(ck.state["bundle"])
    cells, images = model_input(ck), ck.state["images"]
    pre = Preprocessor.for_bundle(bundle)
    rows = []
    for device, precision in [("cpu", "fp32")] + [("cuda", p) for p in PRECISIONS]:
        with EnsembleClassifier(bundle, device, precision=precision,
                                max_batch=max(BATCHES) * len(bundle.views)) as clf:
            features = _features_fn(device)
            for b in BATCHES:
                batch = np.ascontiguousarray(np.resize(cells, (b, *cells.shape[1:])))
                natives = [images[i % len(images)] for i in range(b)]

                def end_to_end():
                    x = pre.crops(natives).batch
                    clf.predict(x)
                    features(x)

                rows.append({"device": device, "precision": precision, "runner": clf.runners[0].name, "batch": b,
                             "arrays": clf.xp.__name__,  # cupy: the ensemble ran on device arrays end to end
                             "preprocess_cells_s": _cells_per_s(lambda: pre.crops(natives), b),
                             "classify_cells_s": _cells_per_s(lambda: clf.predict(batch), b),
                             "refine_features_cells_s": _cells_per_s(lambda: features(batch), b),
                             "end_to_end_cells_s": _cells_per_s(end_to_end, b)})
    return {"rows": rows}


def _features_fn(device: str):
    if device == "cuda":
        from wbc_edge.edge.refine.cuda_kernels import morphology_features_cuda

        return morphology_features_cuda
    from wbc_edge.edge.refine.features import morphology_features

    return morphology_features


STEPS = (("cpu-reference", step_cpu_reference), ("evaluate-cpu", step_evaluate_cpu), ("stream-cpu", step_stream_cpu),
         ("gpu", step_gpu), ("install", step_install), ("engines", step_engines), ("parity", step_parity),
         ("evaluate-cuda", step_evaluate_cuda), ("stream-cuda", step_stream_cuda), ("throughput", step_throughput))
FIRST_GPU_STEP = "gpu"
# a step is not started when less than this is left of the budget (seconds it may take on one GPU)
NEEDS_S = {"install": 120, "engines": 120, "evaluate-cuda": 40, "stream-cuda": 40, "throughput": 60}


# ---- report ----------------------------------------------------------------------------------------------

def summary_rows(ck: Check) -> list[dict]:
    rows = []
    for name, rec in ck.steps.items():
        r = rec.get("result") or {}
        detail = rec.get("message", "")
        if name == "parity" and "rows" in r:
            detail = "; ".join(f"{x['member']} {x['precision']}: top1 {x['top1_agreement']}, "
                               f"max|dp| {x['max_abs_diff']}" for x in r["rows"])
        elif name in ("evaluate-cuda", "stream-cuda") and r:
            detail = "; ".join(f"{p}: agree {v['pred_agreement']}, max dconf {v['max_conf_diff']}" for p, v in r.items())
        elif name == "throughput" and "rows" in r:
            best = max(r["rows"], key=lambda x: x["end_to_end_cells_s"])
            detail = f"best end to end {best['end_to_end_cells_s']} cells/s ({best['device']} {best['precision']}, b{best['batch']})"
        elif not detail:
            detail = ", ".join(f"{k}={v}" for k, v in r.items() if not isinstance(v, (dict, list)))[:160]
        rows.append({"step": name, "status": rec["status"], "s": rec.get("s", ""), "detail": detail})
    return rows


def write_report(ck: Check, payload: dict) -> str:
    table = markdown_table(summary_rows(ck), ["step", "status", "s", "detail"])
    extra = ""
    tp = ck.steps.get("throughput", {}).get("result")
    if tp:
        extra = "\n\n## Throughput (cells/s)\n\n" + markdown_table(tp["rows"])
    payload = {"benchmark": "gpu_check", "machine": machine_info(), **payload}
    ck.out.mkdir(parents=True, exist_ok=True)
    (ck.out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str))
    m = payload["machine"]
    head = (f"# gpu_check\n\nMachine: {m['cpu']}, {m['cores']} cores, GPU: {payload.get('gpu') or 'none'}, "
            f"{m['date']}; load: {payload['load']}\n\n")
    (ck.out / "gpu_check.md").write_text(head + table + extra + "\n")
    return table


def machine_load() -> str:
    busy = subprocess.run(["pgrep", "-f", "wbc-edge train"], capture_output=True, text=True).stdout.split()
    load = os.getloadavg()[0]
    return f"loadavg {load:.2f}" + (f", a training job running (pids {' '.join(busy)})" if busy else "")


def run(ck: Check) -> int:
    stopped = None
    for name, fn in STEPS:
        left = ck.budget_s - ck.elapsed
        if left < NEEDS_S.get(name, 10):
            stopped = f"out of time before step '{name}' ({ck.elapsed:.0f} s of {ck.budget_s:.0f} s used)"
            ck.steps[name] = {"status": "not run", "message": stopped}
            break
        t0 = time.perf_counter()
        print(f"gpu-check: {name} ...", flush=True)
        try:
            ck.steps[name] = {"status": "ok", "result": fn(ck)}
        except StopCheck as exc:
            stopped = (f"stopping at step '{name}', the first GPU step: {exc}. The CPU steps above ran; "
                       "nothing was measured on a GPU." if name == FIRST_GPU_STEP else f"stopping at '{name}': {exc}")
            ck.steps[name] = {"status": "stopped", "message": str(exc)}
            break
        except Exception as exc:  # noqa: BLE001 - each step's failure is recorded; later steps may still run
            ck.steps[name] = {"status": "FAILED", "message": f"{type(exc).__name__}: {exc}"[:400]}
            ck.state["failed"] = True
            if name in ("gpu", "install", "engines"):  # the steps after these need them
                stopped = f"stopping after '{name}' failed"
                break
        ck.steps[name]["s"] = round(time.perf_counter() - t0, 1)
        res = ck.steps[name].get("result") or {}
        if res.get("pass") is False:
            ck.steps[name]["status"] = "FAILED"
    payload = {"gpu": (ck.steps.get("gpu", {}).get("result") or {}).get("gpu"), "load": machine_load(),
               "stopped": stopped, "total_s": round(ck.elapsed, 1), "steps": ck.steps}
    print(write_report(ck, payload))
    if stopped:
        print(f"gpu-check: {stopped}")
    print(f"gpu-check: results in {ck.out}/gpu_check.json and .md ({ck.elapsed:.0f} s)")
    return 1 if ck.state.get("failed") else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS / "gpu_check", help="results folder")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop before a step that would run past this")
    p.add_argument("--wheels", type=Path, help="install from this folder of wheels (no network)")
    p.add_argument("--cells", type=int, help="use only this many sample cells (a quick run)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    return run(Check(a.out.resolve(), a.budget_s, a.wheels, a.cells))


if __name__ == "__main__":
    sys.exit(main())

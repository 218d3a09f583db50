"""End-to-end cell throughput against the raw runner and against the baseline a user would write.

    python -m benchmarks.throughput [--bundle data/sample/bundle] [--batch 32] [--views 8] [--calib CELLS]
    wbc-edge bench throughput --batch 32 --views 8 --calib data/sample/cells     # FP32 and INT8

- ours: files -> decode -> impulse guard -> scale -> canonical window + resize -> the colour step the
  bundle asks for (anchoring; stain normalisation only if the bundle normalises) -> the fused graph (TTA
  views, members, view and member means inside: one runner call per batch). ORT CPU, FP32 and INT8.
- raw: the members' own graphs on an already-prepared batch of batch x views crops (the ceiling: what the
  runner alone costs for the same cells and views)
- baseline (the published notebooks' way): per image, torchstain Macenko, then PyTorch eager, one forward
  pass per TTA view and per member (needs torch and torchstain, else left out; measured last, so its
  threads cannot slow the others; --no-baseline skips it)
`e2e_over_raw` = raw time / our time for the same batch. Warm-up before timing, medians over repeats.
Writes benchmarks/results/throughput.{json,md,png}; the machine's load (a training run?) is recorded.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, markdown_table, time_median, write_results
from wbc_edge.bundle import Bundle
from wbc_edge.data.datasets import open_dataset
from wbc_edge.data.images import read_image
from wbc_edge.edge import tta
from wbc_edge.edge.classifier import EnsembleClassifier
from wbc_edge.edge.preprocess import Preprocessor, resize_batch
from wbc_edge.edge.runners import OrtRunner

PRECISION_KEYS = {"fp32": None, "int8": "ort-int8"}


class Ours:
    """The library's path for a batch of crop files (what `evaluate` and `stream --crops` run), timed per stage."""

    def __init__(self, bundle: Bundle, precision: str):
        self.pre = Preprocessor.for_bundle(bundle)  # as deployed: the colour step only where the bundle asks
        self.clf = EnsembleClassifier(bundle, "cpu", precision=precision).activate()
        self.stages: dict[str, float] = {}

    def _t(self, name, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0
        return out

    def __call__(self, paths: list[str]) -> np.ndarray:
        pre = self.pre
        imgs = self._t("decode", lambda: [read_image(p) for p in paths])
        imgs = self._t("restore", lambda: [pre.guarded(im)[0] for im in imgs])  # native size
        scales = self._t("scale", lambda: [pre.scale_of(im) for im in imgs])
        batch = self._t("resize", lambda: np.stack([pre.canonical(im, s) for im, s in zip(imgs, scales)]))
        batch = self._t("colour", pre.stain, batch)
        return self._t("classify", self.clf.predict, batch)  # views + inference + means (in the fused graph)


def _raw_seconds(bundle: Bundle, key: str | None, batch: int, views: list[str], repeats: int) -> float:
    """The members' own graphs on a prepared batch x views uint8 batch: the runner alone."""
    s = bundle.preprocess.input_size
    x = np.random.default_rng(0).integers(0, 256, (batch * len(views), s, s, 3), dtype=np.uint8)
    total = 0.0
    for m in bundle.members:
        with OrtRunner(bundle.path(m.artifacts[key] if key else m.onnx)) as r:
            total += time_median(lambda r=r: r.infer(x), repeats=repeats)
    return total


def baseline(bundle: Bundle, paths: list[str], views: list[str]):
    """Per image: torchstain Macenko (its default reference), then one eager forward per view and member."""
    import torch
    from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer

    from wbc_edge.trainer.checkpoint import load_member
    from wbc_edge.trainer.loop import to_model_input

    models = [load_member(bundle, i) for i in range(len(bundle.members))]
    norm = NumpyMacenkoNormalizer()
    pp = bundle.preprocess

    def run():
        out = []
        with torch.no_grad():
            for p in paths:
                img = resize_batch([read_image(p)], pp.input_size, pp.interpolation)[0]
                img = norm.normalize(img, stains=False)[0]
                probs = [torch.softmax(m(to_model_input(tta.view(img[None], v), pp.mean, pp.std, torch)), 1)
                         for m in models for v in views]
                out.append(torch.stack(probs).mean(0))
        return out
    return run


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def machine_load() -> str:
    """What else ran: a training job (its command line), else 'idle', and the 1-minute load average."""
    try:
        train = subprocess.run(["pgrep", "-af", "wbc-edge train"], capture_output=True, text=True).stdout.strip()
    except OSError:
        train = ""
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").is_file() else "?"
    return (f"a training job ran meanwhile ({train.splitlines()[0]})" if train else "idle (no training job)") + \
        f", load average {load} at start"


def prepare_bundle(src: Path, work: Path, views: list[str], calib) -> tuple[Bundle, list[str]]:
    """A copy of `src` with `views` as its TTA views, INT8 members (with --calib) and the fused graphs."""
    from wbc_edge.build.builder import build

    shutil.copytree(src, work, ignore=shutil.ignore_patterns("*.int8*", "ensemble*.onnx"))
    b = Bundle.load(work, verify=False)  # a shipped fused graph was left behind: it is built below for `views`
    b.extra.pop("fused", None)
    b.extra["tta"] = {"views": list(views)}
    b.save()
    precisions = ["fp32"]
    if calib:
        build(work, "ort-int8", calib=calib, n_calib=128, max_f1_drop=1.0)
        precisions.append("int8")
    return build(work, "onnx", fuse=True), precisions


def measure(bundle: Bundle, precision: str, paths: list[str], views: list[str], repeats: int) -> dict:
    ours = Ours(bundle, precision)
    # warm-up, kept out of the stages: first-call costs, and the slide's red-cell scale, which is pooled
    # over its first cells (about 50 crops) and then frozen: steady state is what a long run sees
    for _ in range(20):
        ours(paths)
        if ours.pre.slides is None or "" in ours.pre.slides._frozen:
            break
    ours.stages.clear()
    t = time_median(lambda: ours(paths), repeats=repeats, warmup=0)
    raw_t = _raw_seconds(bundle, PRECISION_KEYS[precision], len(paths), views, repeats)
    n = len(paths)
    return {"precision": precision, "batch": n, "views": len(views), "members": len(bundle.members),
            "graph": ours.clf.runners[0].name.split(":")[-1], "ours_cells_s": n / t, "raw_cells_s": n / raw_t,
            "e2e_over_raw": raw_t / t, **{f"ms_{k}": 1000 * v / repeats / n for k, v in ours.stages.items()}}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    names = [r["precision"].upper() for r in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["raw_cells_s"] for r in rows], 0.4, label="raw runner (prepared crops)")
    ax.bar(x + 0.2, [r["ours_cells_s"] for r in rows], 0.4, label="end to end (files in)")
    for i, r in enumerate(rows):
        ax.text(i + 0.2, r["ours_cells_s"], f"{r['e2e_over_raw']:.2f}x", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, names)
    ax.set_ylabel("cells / s")
    ax.set_title(f"batch {rows[0]['batch']}, {rows[0]['views']} TTA views, ORT CPU")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("data/sample/bundle"))
    ap.add_argument("--data", default="data/sample/cells")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--views", type=int, default=8, choices=sorted(tta.PRESETS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calib", default=None, help="build ORT INT8 with these cells (default: FP32 only)")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the per-image torchstain + PyTorch baseline (it needs torch and torchstain)")
    ap.add_argument("--quick", action="store_true", help="batch 4, 2 views, 1 repeat")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.repeats, a.views = 4, 1, 2
    views = tta.PRESETS[a.views]
    ds = open_dataset(a.data)
    paths = [ds.samples[i].path for i in np.random.default_rng(0).permutation(len(ds))[:a.batch]]
    load = machine_load()
    with tempfile.TemporaryDirectory() as tmp:
        bundle, precisions = prepare_bundle(a.bundle, Path(tmp) / "bundle", views, a.calib)
        rows = [measure(bundle, p, paths, views, a.repeats) for p in precisions]
        if a.baseline and _has("torch") and _has("torchstain"):
            base_t = time_median(baseline(bundle, paths, views), repeats=max(1, a.repeats // 3))
            for r in rows:
                r.update(baseline_cells_s=a.batch / base_t, speedup_vs_baseline=r["ours_cells_s"] * base_t / a.batch)
    name = "throughput"
    table = (f"Bundle {a.bundle} ({bundle.members[0].arch}, {bundle.preprocess.input_size}px, "
             f"{len(bundle.members)} member(s)), {a.batch} cells from {a.data}; views {views}. Machine load: {load}. "
             "ours = files in, probabilities out (decode, impulse guard, scale, window + resize, the bundle's colour "
             "step, the fused graph with the views and means inside); raw = the member graphs alone on prepared "
             "batch x views crops. ms_* = ms per cell in each stage of ours (classify = views + inference + means)."
             "\n\n" + markdown_table(rows) + f"\n\n![throughput]({name}.png)")
    write_results(name, {"rows": rows, "views": views, "load": load}, table, a.out)
    plot(rows, Path(a.out) / f"{name}.png")
    print(table)
    return {"rows": rows}


if __name__ == "__main__":
    main()

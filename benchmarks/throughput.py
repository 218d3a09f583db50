"""End-to-end cell throughput against the raw backbone and against the baseline a user would write.

    python -m benchmarks.throughput [--bundle data/sample/bundle] [--batch 32] [--views 8] [--quick]

- ours: files -> decode -> salt-and-pepper check/restore -> resize -> batched Macenko -> TTA views
  -> one runner call per batch per member -> view/member mean (ORT CPU, FP32 and INT8 if built)
- raw: the same runner on an already-prepared batch of batch x views crops (the ceiling)
- baseline (the published notebooks' way): per image, torchstain Macenko, then PyTorch eager, one
  forward pass per TTA view and per member
Warm-up before timing, medians over repeats. Writes benchmarks/results/throughput.{json,md}.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, markdown_table, time_median, write_results
from wbc_edge.bundle import Bundle
from wbc_edge.data.datasets import open_dataset
from wbc_edge.data.images import read_image
from wbc_edge.edge import quality, stain, tta
from wbc_edge.edge.preprocess import Preprocessor, resize_batch
from wbc_edge.edge.runners import OrtRunner


class Ours:
    """The library's path for a batch of crop files, with per-stage timing."""

    def __init__(self, bundle: Bundle, views: list[str], graph_key: str | None, ref: stain.StainReference):
        self.bundle, self.views = bundle, views
        self.runners = [OrtRunner(bundle.path(m.artifacts[graph_key] if graph_key else m.onnx)) for m in bundle.members]
        for r in self.runners:
            r.activate()
        self.weights = np.asarray([m.weight for m in bundle.members]) / sum(m.weight for m in bundle.members)
        self.pre = Preprocessor.for_bundle(bundle)  # the deployed path, with the stain step always on
        self.pre.stain_ref, self.pre.guard = ref, quality.ImpulseGuard()
        self.stages: dict[str, float] = {}

    def _t(self, name, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0
        return out

    def __call__(self, paths: list[str]) -> np.ndarray:
        imgs = self._t("decode", lambda: [read_image(p) for p in paths])
        imgs = self._t("restore", lambda ims: [self.pre.guarded(im)[0] for im in ims], imgs)  # native size
        scales = self._t("scale", lambda ims: [self.pre.scale_of(im) for im in ims], imgs)
        batch = self._t("resize", lambda: np.stack([self.pre.canonical(im, sc) for im, sc in zip(imgs, scales)]))
        batch = self._t("stain", self.pre.stain, batch)
        views = self._t("tta", tta.expand, batch, self.views)
        probs = [self._t("inference", r.infer, views) for r in self.runners]
        return self._t("ensemble", lambda: sum(w * tta.merge(p, len(self.views)) for w, p in zip(self.weights, probs)))


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


def run_sweep(bundle: Bundle, ds, precisions, ref, repeats: int) -> list[dict]:
    rows = []
    s = bundle.preprocess.input_size
    for batch in (1, 8, 32, 64):
        paths = [ds.samples[i].path for i in np.random.default_rng(1).permutation(len(ds))[:batch]]
        for n_views in (1, 2, 4, 8):
            for name, key in precisions:
                ours = Ours(bundle, tta.PRESETS[n_views], key, ref)
                t = time_median(lambda: ours(paths), repeats=repeats)
                x = np.random.default_rng(0).integers(0, 256, (batch * n_views, s, s, 3), dtype=np.uint8)
                raw_t = sum(time_median(lambda r=r: r.infer(x), repeats=repeats) for r in ours.runners)
                rows.append({"precision": name, "batch": batch, "views": n_views, "ours_cells_s": batch / t,
                             "raw_cells_s": batch / raw_t, "e2e_over_raw": raw_t / t})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", type=Path, default=Path("data/sample/bundle"))
    ap.add_argument("--data", default="data/sample/cells")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--views", type=int, default=8, choices=sorted(tta.PRESETS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calib", default=None, help="build ORT INT8 with these cells (default: skip INT8)")
    ap.add_argument("--sweep", action="store_true", help="also sweep batch 1/8/32/64 x views 1/2/4/8 (no baseline)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.repeats, a.views = 4, 1, 2
    views = tta.PRESETS[a.views]
    ds = open_dataset(a.data)
    paths = [ds.samples[i].path for i in np.random.default_rng(0).permutation(len(ds))[:a.batch]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "bundle"
        shutil.copytree(a.bundle, work)
        bundle = Bundle.load(work)
        precisions = [("fp32", None)]
        if a.calib:
            from wbc_edge.build.builder import build

            bundle = build(work, "ort-int8", calib=a.calib, n_calib=128, max_f1_drop=1.0)
            precisions.append(("int8", "ort-int8"))
        base_t = time_median(baseline(bundle, paths, views), repeats=max(1, a.repeats // 2))
        ref = stain.StainReference.from_dict(bundle.extra["stain"]["reference"]) if "stain" in bundle.extra \
            else stain.fit_reference(resize_batch([read_image(p) for p in paths], bundle.preprocess.input_size))
        for name, key in precisions:
            ours = Ours(bundle, views, key, ref)
            ours(paths)  # warm-up (first-call costs such as loading compiled kernels), kept out of the stages
            ours.stages.clear()
            t = time_median(lambda: ours(paths), repeats=a.repeats, warmup=0)
            stages = {k: 1000 * v / a.repeats / len(paths) for k, v in ours.stages.items()}  # ms per cell
            s = bundle.preprocess.input_size
            x = np.random.default_rng(0).integers(0, 256, (a.batch * len(views), s, s, 3), dtype=np.uint8)
            raw_t = sum(time_median(lambda r=r: r.infer(x), repeats=a.repeats) for r in ours.runners)
            rows.append({"precision": name, "batch": a.batch, "views": len(views), "members": len(bundle.members),
                         "ours_cells_s": a.batch / t, "raw_cells_s": a.batch / raw_t, "e2e_over_raw": raw_t / t,
                         "baseline_cells_s": a.batch / base_t, "speedup_vs_baseline": base_t / t,
                         **{f"ms_{k}": v for k, v in stages.items()}})
        sweep = run_sweep(bundle, ds, precisions, ref, a.repeats) if a.sweep else []
    table = (f"Bundle {a.bundle} ({bundle.members[0].arch}, {bundle.preprocess.input_size}px), cells from {a.data}; "
             f"views {views}. Baseline: per-image torchstain + PyTorch eager, one pass per view and member. "
             "ms_* = ms per cell in each stage of ours.\n\n" + markdown_table(rows))
    if sweep:
        table += "\n\n## Sweep (ours vs the raw runner)\n\n" + markdown_table(sweep)
    write_results("throughput", {"rows": rows, "views": views, "sweep": sweep}, table, a.out)
    print(table)
    return {"rows": rows}


if __name__ == "__main__":
    main()

"""Stain normalisation and image quality on real PBC cells, measured side by side in one run.

    python -m benchmarks.bench_stain_quality [--batch 256] [--quick]

- batched Macenko (ours, NumPy) vs torchstain's per-image NumPy Macenko: images/s and MPix/s
- stain-vector stability across images; colour distance of a lab stain shift before/after
  normalisation (per-crop estimates and slide-level pooled estimates)
- the cost of each degradation (severity 2) and of salt-and-pepper detection + restoration
- salt-and-pepper detector precision/recall and PSNR/SSIM gain of the restorer
Writes benchmarks/results/stain_quality.{json,md}.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks._common import RESULTS, markdown_table, time_median, write_results
from wbc_edge.data import degrade
from wbc_edge.data.datasets import from_image_folder
from wbc_edge.edge import quality, stain

ROOT = Path(__file__).resolve().parents[1]
TORCHSTAIN_REF = stain.StainReference(np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]),
                                      np.array([1.9705, 1.0308]))


def load_cells(n: int) -> tuple[np.ndarray, str]:
    shared = ROOT.parent / "shared" / "data" / "pbc-176"
    src = shared if shared.is_dir() else ROOT / "data" / "sample" / "cells"
    ds = from_image_folder(src, ["SNE", "BNE", "LY", "MO", "EO", "BA", "MMY", "MY", "PMY"])
    idx = np.random.default_rng(0).permutation(len(ds))[:n]
    x, _, _ = ds.subset(np.sort(idx)).load(176, progress=False)
    return x, str(src)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004; Gaussian window sigma 1.5) over channels, via OpenCV filters."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a, b = a.astype(np.float64), b.astype(np.float64)
    blur = lambda x: cv2.GaussianBlur(x, (11, 11), 1.5)  # noqa: E731
    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma ** 2, blur(b * b) - mb ** 2, blur(a * b) - ma * mb
    return float((((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))).mean())


def psnr(a, b) -> float:
    return float(10 * np.log10(255 ** 2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


def macenko_speed(x: np.ndarray, repeats: int) -> dict:
    from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer

    ts = NumpyMacenkoNormalizer()
    ours = time_median(lambda: stain.normalise_batch(x, TORCHSTAIN_REF), repeats=repeats)
    theirs = time_median(lambda: [ts.normalize(im, stains=False) for im in x], repeats=max(1, repeats // 2))
    mpix = x.shape[0] * x.shape[1] * x.shape[2] / 1e6
    return {"batch": len(x), "ours_img_s": len(x) / ours, "ours_mpix_s": mpix / ours,
            "torchstain_img_s": len(x) / theirs, "torchstain_mpix_s": mpix / theirs, "speedup": theirs / ours}


def stain_stability(x: np.ndarray) -> dict:
    m, c, ok = stain.estimate_stains(x)
    out = {"ok_fraction": float(ok.mean())}
    for k, name in enumerate(("nuclear", "eosin")):
        v = m[ok, :, k]
        med = np.median(v, axis=0)
        cos = v @ (med / np.linalg.norm(med))
        out[f"{name}_cos_to_median_p50"] = float(np.median(cos))
        out[f"{name}_cos_to_median_p05"] = float(np.percentile(cos, 5))
    return out


def lab_shift(x: np.ndarray, ref) -> list[dict]:
    def pooled(b):
        m, c, ok = stain.estimate_stains(b)
        return np.median(m[ok], 0), np.median(c[ok], 0)

    def dist(p, q):
        return float(np.linalg.norm(p.astype(float).mean((1, 2)) - q.astype(float).mean((1, 2)), axis=1).mean())
    rows = []
    for sev in (1, 2, 3, 4):
        shifted = np.concatenate([degrade.apply(x[i:i + 1], "stain_shift", sev, np.random.default_rng(7))
                                  for i in range(len(x))])  # one draw for every cell: one other lab
        per_crop = dist(stain.normalise_batch(shifted, ref)[0], stain.normalise_batch(x, ref)[0])
        slide = dist(stain.normalise_batch(shifted, ref, pooled(shifted))[0],
                     stain.normalise_batch(x, ref, pooled(x))[0])
        rows.append({"severity": sev, "before": dist(shifted, x), "after_per_crop": per_crop, "after_slide": slide})
    return rows


def degradation_costs(x: np.ndarray, repeats: int) -> list[dict]:
    rows = []
    for kind in degrade.KINDS:
        t = time_median(lambda: degrade.apply(x, kind, 2, np.random.default_rng(0)), repeats=repeats)
        rows.append({"stage": f"degrade:{kind}", "ms_per_img": 1000 * t / len(x)})
    noisy = degrade.apply(x, "salt_pepper", 2, np.random.default_rng(0))
    rows.append({"stage": "s&p detect (clean)", "ms_per_img": 1000 * time_median(lambda: quality.detect(x), repeats=repeats) / len(x)})
    rows.append({"stage": "s&p detect+restore (noisy)",
                 "ms_per_img": 1000 * time_median(lambda: quality.restore(noisy), repeats=repeats) / len(x)})
    return rows


def salt_pepper_quality(x: np.ndarray) -> dict:
    rng = np.random.default_rng(1)
    is_noisy = rng.random(len(x)) < 0.5
    sev = rng.integers(1, 5, len(x))
    mixed = x.copy()
    for i in np.flatnonzero(is_noisy):
        mixed[i] = degrade.apply(x[i:i + 1], "salt_pepper", int(sev[i]), rng)[0]
    restored, fired = quality.restore(mixed)
    tp, fp, fn = (fired & is_noisy).sum(), (fired & ~is_noisy).sum(), (~fired & is_noisy).sum()
    noisy_idx = np.flatnonzero(is_noisy)
    return {"n": len(x), "n_noisy": int(is_noisy.sum()), "precision": float(tp / max(tp + fp, 1)),
            "recall": float(tp / max(tp + fn, 1)),
            "psnr_noisy": float(np.mean([psnr(mixed[i], x[i]) for i in noisy_idx])),
            "psnr_restored": float(np.mean([psnr(restored[i], x[i]) for i in noisy_idx])),
            "ssim_noisy": float(np.mean([ssim(mixed[i], x[i]) for i in noisy_idx])),
            "ssim_restored": float(np.mean([ssim(restored[i], x[i]) for i in noisy_idx])),
            "clean_untouched": bool(np.array_equal(restored[~is_noisy], x[~is_noisy]))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.repeats = 16, 1
    x, src = load_cells(max(a.batch, 64))
    xb = x[:a.batch]
    ref = stain.fit_reference(x)
    res = {"source": src, "macenko": macenko_speed(xb, a.repeats), "stability": stain_stability(x),
           "lab_shift": lab_shift(x[:128], ref), "costs": degradation_costs(xb[:64], a.repeats),
           "salt_pepper": salt_pepper_quality(x[:128])}
    md = ["## Batched Macenko vs torchstain (per-image loop), 176 px crops\n", markdown_table([res["macenko"]]),
          "\n## Stain-vector stability across real cells\n", markdown_table([res["stability"]]),
          "\n## Lab stain shift: mean-colour distance to the original set (grey levels)\n",
          markdown_table(res["lab_shift"]),
          "\n## Cost per image (severity 2; batch of 64)\n", markdown_table(res["costs"]),
          "\n## Salt-and-pepper: detector and adaptive-median restorer (half the cells noisy, severity 1-4)\n",
          markdown_table([res["salt_pepper"]]), f"\nCells: {src}"]
    write_results("stain_quality", res, "\n".join(md), a.out)
    print("\n".join(md))
    return res


if __name__ == "__main__":
    main()

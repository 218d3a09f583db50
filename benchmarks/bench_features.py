"""Morphology features for a batch of real crops: the batched Numba kernels vs a per-crop OpenCV loop.

    python -m benchmarks.bench_features [--quick] [--batch 256] [--repeats 5]

Both run in the same process on the same batch of real 176-px PBC crops (../shared/data/pbc-176, an
even draw over the classes; data/sample/cells when that is absent or with --quick). The baseline is
what one would write first: per crop, Otsu with cv2.threshold, connectedComponentsWithStats,
findContours / convexHull / convexityDefects / moments, distanceTransform for lobes, cv2.mean for
OD. It computes the same kinds of features (not bit-identical ones); the agreement of a few is
reported so that the speed comparison is between comparable work. Writes
benchmarks/results/features.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import cv2
import numba
import numpy as np

from benchmarks._common import markdown_table, time_median, write_results
from wbc_edge.data.images import read_image
from wbc_edge.edge.refine import features as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "pbc-176"
SAMPLE = ROOT / "data" / "sample" / "cells"


def load_batch(n: int, quick: bool) -> tuple[np.ndarray, str]:
    """`n` crops drawn round-robin over the class folders (sorted, so the draw is repeatable)."""
    base = SAMPLE if quick or not SHARED.is_dir() else SHARED
    folders = sorted(p for p in base.iterdir() if p.is_dir())
    files = [sorted(f.glob("*.jpg")) for f in folders]
    picked, i = [], 0
    while len(picked) < n and any(i < len(f) for f in files):
        picked += [f[i] for f in files if i < len(f)]
        i += 1
    crops = [read_image(p) for p in picked[:n]]
    return np.ascontiguousarray(np.stack(crops)), str(base)


# --- the per-crop OpenCV baseline ---------------------------------------------------------------------

def _otsu8(values: np.ndarray) -> float:
    """Otsu threshold of a float array via cv2 on an 8-bit rescale."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.inf
    q = ((values - lo) * (255.0 / (hi - lo))).astype(np.uint8).reshape(-1, 1)
    t, _ = cv2.threshold(q, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return lo + (t + 1) * (hi - lo) / 255.0


def _nucleus_cv(score: np.ndarray) -> np.ndarray:
    s = score.shape[0]
    fg = (score >= _otsu8(score)).astype(np.uint8)
    n, lab, stats, cent = cv2.connectedComponentsWithStats(fg, connectivity=8)
    ok = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= F.MIN_NUCLEUS_AREA]
    if not ok:
        return np.zeros_like(fg)
    d = {i: np.hypot(*(cent[i] + 0.5 - s / 2)) for i in ok}
    near = [i for i in ok if d[i] <= s / 4]
    main = max(near, key=lambda i: stats[i, cv2.CC_STAT_AREA]) if near else min(ok, key=d.get)
    radius = {i: np.sqrt(stats[i, cv2.CC_STAT_AREA] / np.pi) for i in ok}
    keep = {main}
    for _ in range(4):
        new = {i for i in ok if i not in keep and any(
            np.hypot(*(cent[i] - cent[k])) - radius[i] - radius[k] <= F.KEEP_GAP for k in keep)}
        if not new:
            break
        keep |= new
    mask = np.isin(lab, list(keep)).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(mask, contours, -1, 1, thickness=-1)  # fills holes
    return mask


def _cell_cv(od: np.ndarray, nucleus: np.ndarray) -> np.ndarray:
    t = _otsu8(od[nucleus == 0])
    fg = ((cv2.blur(od, (3, 3)) >= t) | (nucleus > 0)).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))) | nucleus
    n, lab = cv2.connectedComponents(fg, connectivity=8)
    ids = np.unique(lab[(nucleus > 0) & (lab > 0)])
    return np.isin(lab, ids).astype(np.uint8)


def _radial_cv(pts: np.ndarray, cy: float, cx: float) -> tuple[float, float]:
    dy, dx = pts[:, 1] + 0.5 - cy, pts[:, 0] + 0.5 - cx
    k = np.minimum(((np.arctan2(dy, dx) + np.pi) * F.N_ANGLES / (2 * np.pi)).astype(int), F.N_ANGLES - 1)
    r = np.full(F.N_ANGLES, -1.0)
    np.maximum.at(r, k, np.hypot(dy, dx) + 0.5)
    idx = np.arange(F.N_ANGLES)
    ok = r >= 0
    r = np.interp(idx, idx[ok], r[ok], period=F.N_ANGLES)
    spec = np.abs(np.fft.rfft(r)) / F.N_ANGLES
    spike = np.sqrt(np.sum(2 * spec[F.SPIKE_HARMONIC:F.N_ANGLES // 2] ** 2)) / r.mean()
    return r.std() / r.mean(), spike


def opencv_features(crop: np.ndarray) -> np.ndarray:
    """One crop's features the plain way (columns as FEATURE_NAMES)."""
    od3 = F.OD_LUT[crop]
    od = od3.mean(axis=2)
    nucleus = _nucleus_cv(cv2.blur(od3[..., 1] - od3[..., 2], (3, 3)))
    out = np.zeros(F.N_FEATURES, np.float32)
    if not nucleus.any():
        return out
    cell = _cell_cv(od, nucleus)
    cyto = (cell > 0) & (nucleus == 0)
    contours, _ = cv2.findContours(nucleus, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = np.vstack(contours).reshape(-1, 2)
    area = float(nucleus.sum())
    hull_area = cv2.contourArea(cv2.convexHull(pts))
    big = max(contours, key=cv2.contourArea)
    defects = cv2.convexityDefects(big, cv2.convexHull(big, returnPoints=False)) if len(big) > 3 else None
    depth = 0.0 if defects is None or defects.size == 0 else defects.reshape(-1, 4)[:, 3].max() / 256.0
    m = cv2.moments(nucleus, binaryImage=True)
    cy, cx = m["m01"] / m["m00"] + 0.5, m["m10"] / m["m00"] + 0.5
    a, b, c = m["mu20"] / m["m00"], m["mu11"] / m["m00"], m["mu02"] / m["m00"]
    root = np.sqrt(((a - c) / 2) ** 2 + b ** 2)
    ecc = np.sqrt(max(0.0, 1 - ((a + c) / 2 - root) / max((a + c) / 2 + root, 1e-12)))
    radial_cv, spike = _radial_cv(pts, cy, cx)
    dt = cv2.distanceTransform(nucleus, cv2.DIST_L2, 3)
    lobes = cv2.connectedComponents((dt >= 0.6 * dt.max()).astype(np.uint8))[0] - 1
    mc = cv2.moments(cell, binaryImage=True)
    offset = np.hypot(cy - mc["m01"] / mc["m00"] - 0.5, cx - mc["m10"] / mc["m00"] - 0.5)
    lap = np.abs(cv2.Laplacian(od, cv2.CV_32F, ksize=1))
    inner_n = cv2.erode(nucleus, np.ones((3, 3), np.uint8)) > 0
    inner_c = cv2.erode(cyto.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    n_od, c_od = od[nucleus > 0].mean(), od[cyto].mean() if cyto.any() else 0.0
    vals = [area, float(cell.sum()), area / cell.sum(), area / max(hull_area, 1),
            depth / np.sqrt(area / np.pi), radial_cv, spike, lobes, ecc, offset / np.sqrt(cell.sum() / np.pi),
            n_od, c_od,
            lap[inner_c].mean() / c_od if inner_c.any() and c_od else 0.0,
            lap[inner_n].mean() / n_od if inner_n.any() else 0.0]
    out[:] = vals
    return out


def opencv_loop(crops: np.ndarray) -> np.ndarray:
    return np.stack([opencv_features(c) for c in crops])


# --- the benchmark ------------------------------------------------------------------------------------

def stage_times(crops: np.ndarray, repeats: int) -> dict[str, float]:
    """Median ms per stage of the batched pipeline (to see where the time goes)."""
    nuclear, od = F.stain_maps(crops)
    nucleus, cell = F.segment(nuclear, od)
    st = F.region_stats(nucleus, cell, od)
    prof = F.radial_profiles(nucleus, F.nucleus_centroids(st))
    stages = {"stain_maps": lambda: F.stain_maps(crops), "segment": lambda: F.segment(nuclear, od),
              "region_stats": lambda: F.region_stats(nucleus, cell, od),
              "radial_profiles": lambda: F.radial_profiles(nucleus, F.nucleus_centroids(st)),
              "profile_features": lambda: F.profile_features(prof),
              "shape_stats": lambda: F.shape_stats(nucleus)}
    return {k: 1000 * time_median(fn, repeats=repeats, warmup=1) for k, fn in stages.items()}


def cpu_ms(fn) -> float:
    """CPU time of one call, all threads (on a shared machine wall time also counts others' load)."""
    t0 = time.process_time()
    fn()
    return 1000 * (time.process_time() - t0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 sample crops, 1 repeat: a smoke test")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    a = ap.parse_args(argv)
    n, repeats = (16, 1) if a.quick else (a.batch, a.repeats)
    crops, source = load_batch(n, a.quick)

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    ours = F.morphology_features(crops)  # first call: loads (or compiles) the kernels
    first_call_s = time.perf_counter() - t0
    t_ours = time_median(lambda: F.morphology_features(crops), repeats=repeats, warmup=1)
    base = opencv_loop(crops)
    t_base = time_median(lambda: opencv_loop(crops), repeats=repeats, warmup=1)
    cpu_ours, cpu_base = cpu_ms(lambda: F.morphology_features(crops)), cpu_ms(lambda: opencv_loop(crops))

    found = (ours[:, 0] > 0) & (base[:, 0] > 0)
    agree = {name: float(np.corrcoef(ours[found, i], base[found, i])[0, 1]) if found.sum() > 2 else None
             for i, name in enumerate(F.FEATURE_NAMES) if name in ("nucleus_area", "nc_ratio", "eccentricity",
                                                                  "nucleus_od", "solidity")}
    rows = [
        {"method": "batched Numba kernels (wbc_edge.edge.refine)", "crops": len(crops),
         "ms_per_batch": 1000 * t_ours, "crops_per_s": len(crops) / t_ours, "cpu_ms_per_batch": cpu_ours,
         "crops_per_cpu_s": 1000 * len(crops) / cpu_ours},
        {"method": "per-crop Python/OpenCV loop", "crops": len(crops),
         "ms_per_batch": 1000 * t_base, "crops_per_s": len(crops) / t_base, "cpu_ms_per_batch": cpu_base,
         "crops_per_cpu_s": 1000 * len(crops) / cpu_base},
    ]
    stages = stage_times(crops, repeats)
    payload = {"source": source, "crop_size": int(crops.shape[1]), "numba_threads": numba.get_num_threads(),
               "opencv_threads": cv2.getNumThreads(), "repeats": repeats, "first_call_s": first_call_s,
               "rows": rows, "speedup": t_base / t_ours, "stage_ms": stages,
               "nucleus_found": {"ours": float((ours[:, 0] > 0).mean()),
                                 "opencv": float((base[:, 0] > 0).mean())},
               "pearson_ours_vs_opencv": agree, "goal_crops_per_s": 1000,
               "load_avg_1min": {"before": load_before, "after": os.getloadavg()[0]}}
    table = markdown_table(rows, ["method", "crops", "ms_per_batch", "crops_per_s", "cpu_ms_per_batch",
                                  "crops_per_cpu_s"])
    table += f"\n\nSpeed-up {t_base / t_ours:.1f}x; Numba threads {numba.get_num_threads()} " \
             f"(os.cpu_count() {os.cpu_count()}); 1-min load average {load_before:.1f} before, " \
             f"{os.getloadavg()[0]:.1f} after (other work on the machine slows wall time); " \
             f"crops from {source}.\n\nStages (ms per batch): " + \
             ", ".join(f"{k} {v:.1f}" for k, v in stages.items()) + \
             "\n\nAgreement with the OpenCV loop (Pearson r over crops where both found a nucleus): " + \
             ", ".join(f"{k} {v:.2f}" for k, v in agree.items() if v is not None)
    write_results("features", payload, table, a.out)
    print(table)
    return payload


if __name__ == "__main__":
    main()

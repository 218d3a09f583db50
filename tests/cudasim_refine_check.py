"""CUDA kernels of edge.refine against the CPU kernels on tiny inputs; exits non-zero on a mismatch.

Run by tests/test_refine_cuda.py in a subprocess with NUMBA_ENABLE_CUDASIM=1 (the simulator must be
chosen before numba.cuda is first imported, hence a fresh process), or in-process on a real GPU.
"""
import sys
from pathlib import Path

import cv2
import numpy as np

from wbc_edge.data.images import read_image
from wbc_edge.edge.refine import cuda_kernels as C
from wbc_edge.edge.refine import features as F

ROOT = Path(__file__).resolve().parents[1]
S = 14  # the simulator runs every GPU thread as a Python thread: keep it tiny


def tiny_crops() -> np.ndarray:
    """Two real cells shrunk to S px, and one synthetic crop with saturated and black pixels."""
    cells = ROOT / "data" / "sample" / "cells"
    real = [cv2.resize(read_image(sorted((cells / c).glob("*.jpg"))[0]), (S, S), interpolation=cv2.INTER_AREA)
            for c in ("SNE", "LY")]
    synthetic = np.random.default_rng(0).integers(0, 256, (S, S, 3), dtype=np.uint8)
    synthetic[0, :3] = (0, 0, 0)
    synthetic[1, :3] = (255, 255, 255)
    return np.ascontiguousarray(np.stack(real + [synthetic]))


def tiny_masks() -> tuple[np.ndarray, np.ndarray]:
    """Nuclei: a disc, an ellipse touching the crop's edge, a ring with a hole, nothing."""
    yy, xx = np.mgrid[:S, :S] + 0.5
    disc = np.hypot(yy - 7, xx - 7) <= 4
    edge = ((yy - 3) / 3) ** 2 + ((xx - 7) / 6) ** 2 <= 1
    ring = (np.hypot(yy - 7, xx - 7) <= 5) & (np.hypot(yy - 7, xx - 7) > 2)
    nucleus = np.stack([disc, edge, ring, np.zeros_like(disc)]).astype(np.uint8)
    cell = np.stack([np.hypot(yy - 7, xx - 7) <= 6.5] * 4).astype(np.uint8)
    return nucleus, cell


def check(name: str, ok: bool) -> bool:
    print(f"{'OK  ' if ok else 'FAIL'} {name}")
    return ok


P = 20  # crops for the product path: big enough for a nucleus to be segmented, small for the simulator


def pair_cells(per_class: int, skip: int = 0) -> tuple[np.ndarray, list[str]]:
    """Real SNE and BNE cells (a refinement pair) shrunk to P px, and their classes."""
    cells, crops, labels = ROOT / "data" / "sample" / "cells", [], []
    for c in ("SNE", "BNE"):
        for path in sorted((cells / c).glob("*.jpg"))[skip:skip + per_class]:
            crops.append(cv2.resize(read_image(path), (P, P), interpolation=cv2.INTER_AREA))
            labels.append(c)
    return np.ascontiguousarray(np.stack(crops)), labels


def product_path() -> list[bool]:
    """Refiner.for_bundle(bundle, True, 'cuda') -> phase 3 computes its features with the CUDA kernels on
    the device batch; the refined classes and every recorded change equal the CPU refiner's."""
    from wbc_edge.bundle import Bundle
    from wbc_edge.edge.refine.models import MorphologyModel
    from wbc_edge.edge.refine.refiner import Refiner

    bundle = Bundle.load(ROOT / "data" / "sample" / "bundle")
    fit_x, fit_y = pair_cells(8, skip=3)  # the per-class models, fitted on other cells than those refined
    model = MorphologyModel.fit(F.morphology_features(fit_x), fit_y, bundle.classes)
    bundle.extra["refine"] = {"morphology": {"enabled": True, "model": model.to_dict(), "pairs": [["SNE", "BNE"]],
                                             "close": 0.25, "outliers": {}}}
    crops, _ = pair_cells(3)
    probs = np.full((len(crops), len(bundle.classes)), 0.01, np.float32)
    probs[:, bundle.classes.index("SNE")], probs[:, bundle.classes.index("BNE")] = 0.5, 0.4  # all close calls
    cpu, gpu = Refiner.for_bundle(bundle, True, "cpu"), Refiner.for_bundle(bundle, True, "cuda")
    (pred_c, ch_c), (pred_g, ch_g) = cpu(probs, crops), gpu(probs, crops)
    switched = sum(bool(c) for c in ch_c)
    print(f"     product path: {switched} of {len(crops)} close calls switched to BNE")
    feats_c, nuc_c, cell_c = F.morphology_features(crops, return_masks=True)
    feats_g, nuc_g, cell_g = C.morphology_features_cuda(crops, return_masks=True)
    return [check("Refiner(device='cuda') runs the CUDA features", gpu.features_device == "cuda"
                  and cpu.features_device == "cpu"),
            check("morphology_features_cuda == morphology_features", np.array_equal(nuc_c, nuc_g)
                  and np.array_equal(cell_c, cell_g) and np.allclose(feats_c, feats_g, rtol=1e-5, atol=1e-6)
                  and (feats_c[:, 0] > 0).any()),
            check("refined classes and changes equal the CPU path", np.array_equal(pred_c, pred_g) and ch_c == ch_g
                  and 0 < switched < len(crops))]


def main() -> int:
    crops = tiny_crops()
    results = product_path()
    nuclear, od = F.stain_maps(crops)
    nuclear_g, od_g = C.stain_maps_cuda(crops)
    results.append(check("stain_maps", np.array_equal(nuclear, nuclear_g) and np.array_equal(od, od_g)))
    exclude = (nuclear > np.median(nuclear)).astype(np.uint8)
    for ex in (None, exclude):
        for step in (1, 2):
            cpu, gpu = F.otsu_thresholds(nuclear, ex, step), C.otsu_thresholds_cuda(nuclear, ex, step)
            same = np.array_equal(cpu, gpu)
            results.append(check(f"otsu (mask={ex is not None}, step={step})", same))
    flat = np.ones((1, S, S), np.float32)  # one class only: inf on both
    results.append(check("otsu of a flat map", np.isinf(C.otsu_thresholds_cuda(flat)).all()
                         and np.isinf(F.otsu_thresholds(flat)).all()))
    nucleus, cell = tiny_masks()
    od4 = np.concatenate([od, od[:1]])
    st, st_g = F.region_stats(nucleus, cell, od4), C.region_stats_cuda(nucleus, cell, od4)
    results.append(check("region_stats", np.allclose(st, st_g, rtol=1e-12, atol=1e-12)))
    centroids = F.nucleus_centroids(st)
    for bins in (8, 16):
        cpu = F.radial_profiles(nucleus, centroids, bins)
        gpu = C.radial_profiles_cuda(nucleus, centroids, bins)
        same = np.array_equal(cpu, gpu)
        results.append(check(f"radial_profiles ({bins} bins)", same))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())

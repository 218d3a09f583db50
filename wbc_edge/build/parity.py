"""Parity checks with tolerances tied to precision (Polygraphy-style), for tests and `build --check`."""
from __future__ import annotations

import numpy as np

from ..edge.runners import OrtRunner

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # max abs difference of probabilities; INT8 is judged by top-1


def ort_probs(path, images: np.ndarray, batch: int = 64) -> np.ndarray:
    with OrtRunner(path) as r:
        return np.concatenate([r.infer(images[i:i + batch]) for i in range(0, len(images), batch)])


def torch_vs_ort(bundle, images: np.ndarray) -> list[dict]:
    """Per member: max |PyTorch - ONNX Runtime| FP32 probabilities on uint8 `images` (needs torch)."""
    from ..trainer.checkpoint import load_member
    from ..trainer.loop import predict_torch

    pp = bundle.preprocess
    out = []
    for i, m in enumerate(bundle.members):
        diff = float(np.abs(predict_torch(load_member(bundle, i), images, pp.mean, pp.std)
                            - ort_probs(bundle.path(m.onnx), images)).max())
        out.append({"member": m.name, "check": "torch-vs-ort", "max_abs": diff, "ok": diff <= TOLERANCE["fp32"]})
    return out


def fused_vs_members(bundle, images: np.ndarray) -> dict:
    """The fused ensemble graph against the weighted mean of its members run one by one, each on the
    views the fused graph has built in (stacked here, averaged here)."""
    from ..edge import tta

    views = bundle.extra["fused"].get("views", ["id"])
    x = tta.expand(images, views)
    w = np.asarray([m.weight for m in bundle.members], np.float64)
    mean = sum(wi * tta.merge(ort_probs(bundle.path(m.onnx), x), len(views))
               for wi, m in zip(w / w.sum(), bundle.members))
    diff = float(np.abs(ort_probs(bundle.path(bundle.extra["fused"]["onnx"]), images) - mean).max())
    return {"check": "fused-vs-members", "max_abs": diff, "ok": diff <= TOLERANCE["fp32"]}

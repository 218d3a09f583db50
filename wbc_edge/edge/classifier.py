"""The ensemble classifier: bundle members x TTA views, averaged with the bundle's weights."""
from __future__ import annotations

import numpy as np

from ..bundle import Bundle
from . import tta
from .confidence import apply_temperature
from .runners import Runner, open_runner
from .stain import StainReference, bundle_stain, prepare_crops


class EnsembleClassifier:
    """uint8 crops (any size) -> (B, C) probabilities; one runner call per member per chunk."""

    def __init__(self, bundle: Bundle, device: str = "cpu", views: list[str] | None = None,
                 precision: str = "fp32", max_batch: int = 256, threads: int | None = None,
                 artifact: str | None = None, fused: bool = True, calibrated: bool = True):
        self.bundle, self.device, self.precision = bundle, device, precision
        # the bundle's confidence temperature (1: none); calibrated=False gives the raw ensemble mean
        self.temperature = float((bundle.extra.get("confidence") or {}).get("temperature", 1.0)) if calibrated else 1.0
        self.artifact = artifact or (None if precision == "fp32" else f"ort-{precision}")
        # one engine call for the whole ensemble when the bundle has a fused FP32 graph
        self.fused = fused and self.artifact is None and "fused" in bundle.extra
        self.views = views or bundle.extra.get("tta", {}).get("views", ["id"])
        self.max_batch, self.threads = max_batch, threads
        weights = np.asarray([m.weight for m in bundle.members], np.float64)
        self.weights = weights / weights.sum()
        self.runners: list[Runner] = []
        ref = bundle_stain(bundle)  # the model was trained on normalised cells: same step, same reference
        self.stain = StainReference.from_dict(ref) if ref else None

    def _graph(self, member) -> str:
        if self.artifact is None:
            return member.onnx
        if self.artifact not in member.artifacts:
            raise ValueError(f"member {member.name!r} has no {self.artifact} graph; "
                             f"run `wbc-edge build --target {self.artifact}`")
        return member.artifacts[self.artifact]

    def activate(self) -> "EnsembleClassifier":
        if self.fused:
            self.runners = [open_runner(self.bundle.path(self.bundle.extra["fused"]["onnx"]), self.device,
                                        threads=self.threads)]
            self.weights = np.ones(1)
            return self
        self.runners = [open_runner(self.bundle.path(self._graph(m)), self.device, threads=self.threads)
                        for m in self.bundle.members]
        return self

    def deactivate(self) -> None:
        for r in self.runners:
            r.deactivate()
        self.runners = []

    __enter__ = activate

    def __exit__(self, *exc):
        self.deactivate()
        return False

    def predict(self, crops) -> np.ndarray:
        pp = self.bundle.preprocess
        batch = prepare_crops(crops, pp.input_size, pp.interpolation, self.stain)
        chunk = max(1, self.max_batch // len(self.views))
        if not len(batch):
            return np.zeros((0, len(self.bundle.classes)), np.float32)
        probs = np.concatenate([self._predict_chunk(batch[i:i + chunk]) for i in range(0, len(batch), chunk)])
        return probs if self.temperature == 1.0 else apply_temperature(probs, self.temperature)

    def _predict_chunk(self, batch: np.ndarray) -> np.ndarray:
        views = tta.expand(batch, self.views)
        probs = sum(w * tta.merge(r.infer(views), len(self.views)) for w, r in zip(self.weights, self.runners))
        return probs.astype(np.float32)

"""Learned restoration at run time: the quality gate, then the bundle's restorer graph on the gated cells.

The bundle's `restore` section names an ONNX graph (uint8 NHWC canonical cells in, uint8 NHWC out, the
same size; trained by `wbc-edge train-restorer`, wbc_edge/trainer/restorer.py) and the gate's
thresholds (edge/quality.py `QualityGate`). The step runs inside the one preprocessor on canonical cells,
before the colour step, so training-time fitting, `evaluate` and `stream` restore the same cells the
same way. Only ONNX Runtime runs here (no torch); cells the gate passes are returned bit-identical.

    restore: {onnx: restorer.onnx, enabled: true, gate: {min_sharpness, max_unevenness, ...}}
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .quality import SCORES, QualityGate
from .runners import OrtRunner

RESTORED = "learned"  # the value of a row's `restored` field when the restorer changed the cell


@dataclass
class GateResult:
    """Per cell: whether it was restored, and its quality scores (sharpness, unevenness)."""

    restored: np.ndarray  # (B,) bool
    scores: np.ndarray  # (B, 3) float: edge/quality.py SCORES

    def row(self, i: int) -> dict:
        """The JSON fields of cell i (every row carries its scores; restored cells say so)."""
        return {"quality": {**{k: round(float(v), 4) for k, v in zip(SCORES, self.scores[i])},
                            "restore": bool(self.restored[i])}}

    @classmethod
    def empty(cls, n: int = 0) -> "GateResult":
        return cls(np.zeros(n, bool), np.full((n, len(SCORES)), np.nan))


class RestoreStep:
    """Gate + restorer: uint8 BxSxSx3 canonical cells -> (cells, GateResult). The ORT session opens at
    the first gated cell, so clean streams never load the graph."""

    def __init__(self, onnx_path, gate: QualityGate, threads: int | None = None, enabled: bool = True):
        self.onnx_path, self.gate, self.threads, self.enabled = onnx_path, gate, threads, enabled
        self.runner: OrtRunner | None = None

    @classmethod
    def for_bundle(cls, bundle) -> "RestoreStep | None":
        section = bundle.extra.get("restore")
        if not section or not section.get("enabled", True):
            return None
        return cls(bundle.path(section["onnx"]), QualityGate(**section["gate"]))

    def restore(self, batch: np.ndarray) -> np.ndarray:
        """The restorer graph on every cell of `batch` (no gate)."""
        if self.runner is None:
            runner = OrtRunner(self.onnx_path, "cpu", self.threads)
            runner.activate()
            self.runner = runner
        return self.runner.infer(batch)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, GateResult]:
        if not len(batch):
            return batch, GateResult.empty()
        fired, scores = self.gate(batch)
        if not self.enabled or not fired.any():
            return batch, GateResult(np.zeros(len(batch), bool), scores)
        out = batch.copy()
        out[fired] = self.restore(np.ascontiguousarray(batch[fired]))
        return out, GateResult(fired, scores)

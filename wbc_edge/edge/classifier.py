"""The ensemble classifier: bundle members x TTA views, averaged with the bundle's weights.

With a fused graph (`wbc-edge build --target onnx --fuse`) that holds this run's views, one runner call
takes the uint8 cells and returns the averaged probabilities: no view copies, no per-member calls.

With --device cuda and runners that work on device memory (TensorRT; ORT CUDA with IO binding), the
host-to-device boundary is `upload`: a batch is copied to the GPU once, the caller's colour step (the
preprocessor's xp code), the TTA views, every runner, the weighted mean and the temperature run on CuPy
arrays, and `predict` brings the probabilities back once. Otherwise every step is NumPy, as on CPU."""
from __future__ import annotations

import logging

import numpy as np

from ..bundle import Bundle
from ..xp import device_xp, to_numpy
from . import tta
from .confidence import apply_temperature
from .runners import Runner, open_runner

log = logging.getLogger("wbc_edge.classifier")


class EnsembleClassifier:
    """Model-input cells (uint8 BxSxSx3 from the bundle's `Preprocessor`) -> (B, C) probabilities; one
    runner call per member per chunk."""

    def __init__(self, bundle: Bundle, device: str = "cpu", views: list[str] | None = None,
                 precision: str = "fp32", max_batch: int = 256, threads: int | None = None,
                 artifact: str | None = None, fused: bool = True, calibrated: bool = True,
                 server: str | None = None, spin: bool = True):
        self.bundle, self.device, self.precision = bundle, device, precision
        # the bundle's confidence temperature (1: none); calibrated=False gives the raw ensemble mean
        self.temperature = bundle.temperature if calibrated else 1.0
        # the ONNX graph each runner loads: FP32, or the INT8 Q/DQ graph. On CUDA, FP16 and INT8 run the
        # member's TensorRT engine (`_engine`) when one is built; the ONNX graph is the ORT fallback.
        cuda_fp16 = device == "cuda" and precision == "fp16"
        self.artifact = artifact or (None if precision == "fp32" or cuda_fp16 else f"ort-{precision}")
        # checked here, before any runner starts or any output is made (the bundle's own are checked at load)
        self.views = tta.check_views(views) if views is not None else bundle.views
        # one engine call for the whole ensemble (views and members inside) when the bundle has a fused
        # graph for this precision; an explicit `artifact` (the INT8 check against FP32) runs the members
        self.fused_graph, self.views_inside = self._fused(fused and artifact is None)
        self.fused = self.fused_graph is not None
        # `grpc://HOST:PORT[/MODEL]`: one Triton model runs members and views (checked against the bundle)
        self.server = server
        if server:
            if precision != "fp32" or artifact:
                raise ValueError(f"--precision {precision} runs in this process; with --server the server's "
                                 "model decides (choose one with grpc://HOST:PORT/MODEL)")
            self.fused_graph, self.fused, self.views_inside = None, False, True
        # spin=False: the runner's threads sleep between calls (a stream's other threads share the cores)
        self.max_batch, self.threads, self.spin = max_batch, threads, spin
        weights = np.asarray([m.weight for m in bundle.members], np.float64)
        if not (np.isfinite(weights).all() and (weights >= 0).all() and 0 < weights.sum() < np.inf):
            raise ValueError(f"{bundle.root}: member weights {weights.tolist()} cannot be averaged")
        self.weights = weights / weights.sum()
        self.runners: list[Runner] = []
        self.xp = np  # where the batch lives between `upload` and `predict`'s answer (set by activate)

    def _fused(self, wanted: bool) -> tuple[str | None, bool]:
        """(the fused graph to run or None, whether it applies this run's TTA views itself). A fused graph
        with other views than this run's is not used (its views are built in), unless it has only the
        identity (older fused graphs): then the views are stacked here, as for the members."""
        spec = self.bundle.extra.get("fused") if wanted else None
        # on CUDA, FP16/INT8 run each member's TensorRT engine; the fused graph is for ORT
        if not spec or (self.device == "cuda" and self.precision != "fp32"):
            return None, False
        graph = spec["onnx"] if self.artifact is None else spec.get("artifacts", {}).get(self.artifact)
        inside = list(spec.get("views", ["id"]))
        if graph is None or inside not in (self.views, ["id"]):
            return None, False
        return graph, inside == self.views and inside != ["id"]

    def _graph(self, member) -> str:
        if self.artifact is None:
            return member.onnx
        # on CUDA an INT8 TensorRT build's own S8S8 Q/DQ graph also serves as the ORT fallback
        alternatives = [self.artifact] + (["trt-int8-onnx"] if self.device == "cuda" and self.artifact == "ort-int8"
                                          else [])
        for key in alternatives:
            if key in member.artifacts:
                return member.artifacts[key]
        raise ValueError(f"member {member.name!r} has no {self.artifact} graph; "
                         f"run `wbc-edge build --target {self.artifact}`")

    def _engine(self, member):
        """The member's TensorRT engine for this precision on CUDA (`build --target trt-fp16|trt-int8`)."""
        if self.device != "cuda" or self.precision not in ("fp16", "int8"):
            return None
        engine = member.artifacts.get(f"trt-{self.precision}")
        return self.bundle.path(engine) if engine else None

    def activate(self) -> "EnsembleClassifier":
        if self.server:
            from .triton_runner import TritonRunner  # tritonclient only on this path (extra `triton`)

            runner = TritonRunner(self.server, self.bundle, self.views)
            runner.activate()
            self.runners, self.weights = [runner], np.ones(1)
            return self
        if self.fused:
            self.runners = [open_runner(self.bundle.path(self.fused_graph), self.device, threads=self.threads,
                                        spin=self.spin)]
            self.weights = np.ones(1)
        else:
            self.runners = [open_runner(self.bundle.path(self._graph(m)), self.device,
                                        engine_path=self._engine(m), threads=self.threads, spin=self.spin)
                            for m in self.bundle.members]
        self.xp = self._array_module()
        return self

    def _array_module(self):
        """CuPy when this is a CUDA run and every runner takes device memory, else NumPy (said once when a
        runner is on the GPU; a chain that fell back to the CPU has said so itself)."""
        if self.device != "cuda" or not any(str(r.device).startswith("cuda") for r in self.runners):
            return np
        xp, why = device_xp("cuda")
        if xp is not np and not all(r.on_device for r in self.runners):
            host = ", ".join(r.name for r in self.runners if not r.on_device)
            xp, why = np, f"runner(s) {host} take host arrays"
        if xp is np:
            log.warning("--device cuda: colour step, TTA views and ensemble mean on the CPU (%s)", why)
        return xp

    def upload(self, batch):
        """The one host -> device copy of a batch (the same array when this run is on the host)."""
        return self.xp.asarray(batch)

    @property
    def server_report(self) -> dict | None:
        """The remote runner's record (model, checksum, requests, outages), kept up to date; None in-process."""
        return self.runners[0].report if self.server and self.runners else None

    @property
    def runner_name(self) -> str:
        """What runs the ensemble, every member's runner (or the one fused/remote graph's)."""
        return ", ".join(r.name for r in self.runners)

    def deactivate(self) -> None:
        for r in self.runners:
            r.deactivate()
        self.runners = []

    __enter__ = activate

    def __exit__(self, *exc):
        self.deactivate()
        return False

    def predict(self, batch) -> np.ndarray:
        """(B, C) NumPy probabilities of model-input cells (NumPy, or CuPy from `upload`)."""
        size = self.bundle.preprocess.input_size
        batch = self.upload(batch)
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
            raise ValueError(f"expected model-input cells (uint8 Bx{size}x{size}x3 from "
                             f"Preprocessor.for_bundle), got {batch.dtype} {batch.shape}")
        chunk = max(1, self.max_batch // len(self.views))
        if not len(batch):
            return np.zeros((0, len(self.bundle.classes)), np.float32)
        probs = self.xp.concatenate([self._predict_chunk(batch[i:i + chunk])
                                     for i in range(0, len(batch), chunk)])
        probs = probs if self.temperature == 1.0 else apply_temperature(probs, self.temperature)
        return to_numpy(probs)  # the one device -> host copy: the probabilities

    def _predict_chunk(self, batch: np.ndarray) -> np.ndarray:
        if self.views_inside:  # the fused graph stacks the views and averages views and members itself
            return self.runners[0].infer(batch).astype(np.float32, copy=False)
        views = batch if self.views == ["id"] else tta.expand(batch, self.views)
        # every runner answers in the batch's module: CuPy only when all of them are on the device (activate)
        probs = sum(float(w) * tta.merge(r.infer(views), len(self.views))
                    for w, r in zip(self.weights, self.runners))
        return probs.astype(np.float32, copy=False)

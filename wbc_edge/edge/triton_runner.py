"""Remote runner: the bundle's classifier on a Triton Inference Server, through tritonclient's gRPC API.

The server's model is the one `wbc-edge build --target triton` wrote: the whole ensemble (members,
weights, TTA views) in one graph, uint8 cells in, probabilities out. Preprocessing stays on the client
(the bundle's `Preprocessor`), so the server only ever sees model-input cells. Before the first cell is
sent, and again after every reconnect, the server's model checksum (in its config `parameters`) must
equal the one computed from the local bundle: a client never mixes results of two models.

A batch larger than the server's `max_batch_size` goes out as several requests in flight at once
(`async_infer`); the server's dynamic batcher joins requests of many clients. When the server goes away
the runner retries with exponential back-off: only the requests without an answer are sent again, and
each cell's answer is taken once, so no cell is lost or duplicated; the outage is kept in `report`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
from urllib.parse import urlparse

import numpy as np

from .._optional import require
from .runners import Runner, RunnerError

log = logging.getLogger("wbc_edge.triton")

MODEL = "wbc_edge"  # the model name `build --target triton` writes (`grpc://HOST:PORT/NAME` picks another)
# config.pbtxt `parameters` the repository writer sets and this runner checks
PARAM_SHA = "wbc_edge_model_sha256"
PARAM_BUNDLE = "wbc_edge_bundle_digest"
PARAM_VIEWS = "wbc_edge_views"
PARAM_CLASSES = "wbc_edge_classes"
PARAM_INPUT_SIZE = "wbc_edge_input_size"


def model_identity(bundle, views) -> dict:
    """What decides the served model's output for a cell: classes, input size, TTA views, and each
    member's graph (sha256 of its ONNX file, which holds the preprocessing) and ensemble weight."""
    from ..bundle import sha256

    return {"classes": list(bundle.classes), "input_size": int(bundle.preprocess.input_size),
            "views": list(views),
            "members": [{"name": m.name, "onnx_sha256": sha256(bundle.path(m.onnx)), "weight": float(m.weight)}
                        for m in bundle.members]}


def model_sha256(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def bundle_digest(bundle) -> str | None:
    """The manifest's own digest (`checksums["manifest.json"]`): which bundle, exactly, a repository came from."""
    from ..bundle import SELF, read_manifest

    return (read_manifest(bundle.root).get("checksums") or {}).get(SELF)


def parse_server(url: str) -> tuple[str, str]:
    """`grpc://HOST:PORT[/MODEL]` -> ("HOST:PORT", MODEL); ValueError naming the problem otherwise."""
    parsed = urlparse(url if "://" in url else f"grpc://{url}")
    if parsed.scheme != "grpc":
        raise ValueError(f"--server {url}: only gRPC is supported (grpc://HOST:PORT[/MODEL])")
    if not parsed.hostname or not parsed.port:
        raise ValueError(f"--server {url}: expected grpc://HOST:PORT[/MODEL]")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"{host}:{parsed.port}", parsed.path.strip("/") or MODEL


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())


class ServerMismatch(RunnerError):
    """The server's model is not the bundle's (never retried)."""


class TritonRunner(Runner):
    """`Runner` over a Triton server; `views_inside`: the TTA views the served graph averages."""

    def __init__(self, url: str, bundle, views, timeout_s: float = 60.0, outage_limit_s: float = 300.0,
                 backoff_s: float = 0.25, max_backoff_s: float = 4.0):
        super().__init__()
        self.url = url
        self.address, self.model = parse_server(url)
        self.identity = model_identity(bundle, views)
        self.expected = model_sha256(self.identity)
        self.bundle_digest = bundle_digest(bundle)
        self.views_inside = list(views)
        self.timeout_s, self.outage_limit_s = timeout_s, outage_limit_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.name = f"triton:{self.address}/{self.model}"
        self.client = None
        # kept up to date in place: stream's summary.json and evaluate's metrics.json hold this dict
        self.report = {"url": url, "model": self.model, "model_sha256": self.expected, "requests": 0,
                       "requests_resent": 0, "outages": []}

    # ---- lifecycle --------------------------------------------------------------------------------
    def activate(self) -> None:
        self._grpc = require("tritonclient.grpc", "triton")
        self._connect()
        try:
            self._check()
        except ServerMismatch:
            raise
        except Exception as exc:  # noqa: BLE001 - tritonclient's and grpc's errors, one line with the server
            raise RunnerError(f"Triton server {self.url}: {_message(exc)}") from exc
        self.active = True

    def deactivate(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        super().deactivate()

    def _connect(self) -> None:
        if self.client is not None:
            self.client.close()  # a fresh channel: grpc's own reconnect back-off can reach minutes
        self.client = self._grpc.InferenceServerClient(self.address)

    def _check(self) -> None:
        """The served model's config: our checksum, uint8 SxSx3 in, C probabilities out; else refuse."""
        if not self.client.is_model_ready(self.model, client_timeout=self.timeout_s):
            raise RunnerError(f"model {self.model!r} is not ready on {self.address}")
        cfg = self.client.get_model_config(self.model, as_json=True, client_timeout=self.timeout_s)["config"]
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        served = params.get(PARAM_SHA)
        if served != self.expected:
            raise ServerMismatch(f"Triton server {self.url}: model {self.model!r} is not this bundle's: "
                                 + self._difference(params))
        (inp,), (out,) = cfg["input"], cfg["output"]
        size = self.identity["input_size"]
        if inp["data_type"] != "TYPE_UINT8" or [int(d) for d in inp["dims"]] != [size, size, 3]:
            raise ServerMismatch(f"Triton server {self.url}: model {self.model!r} takes {inp['data_type']} "
                                 f"{inp['dims']}, expected TYPE_UINT8 [{size}, {size}, 3]")
        self.input_name, self.output_name = inp["name"], out["name"]
        self.max_batch = max(1, int(cfg.get("max_batch_size", 0)))
        self.device = f"Triton {self.address} {self.model} ({cfg.get('backend') or cfg.get('platform')})"
        self.report.update({"bundle_digest_served": params.get(PARAM_BUNDLE), "bundle_digest": self.bundle_digest,
                            "max_batch_size": self.max_batch,
                            "backend": cfg.get("backend") or cfg.get("platform")})

    def _difference(self, params: dict) -> str:
        """Why the served model differs, in the user's terms."""
        if PARAM_SHA not in params:
            return ("its config carries no wbc_edge checksum "
                    "(build the repository with `wbc-edge build --target triton`)")
        ours = self.identity
        reasons = []
        if params.get(PARAM_CLASSES) and json.loads(params[PARAM_CLASSES]) != ours["classes"]:
            reasons.append(f"classes {params[PARAM_CLASSES]} vs the bundle's {ours['classes']}")
        if params.get(PARAM_VIEWS) and json.loads(params[PARAM_VIEWS]) != ours["views"]:
            reasons.append(f"TTA views {params[PARAM_VIEWS]} vs {ours['views']} here (rebuild the repository "
                           "with these views, or run with the served ones)")
        detail = "; ".join(reasons) or "other member graphs or weights"
        return f"checksum {params[PARAM_SHA][:12]} vs the bundle's {self.expected[:12]} ({detail})"

    # ---- inference --------------------------------------------------------------------------------
    def _infer(self, batch: np.ndarray) -> np.ndarray:
        if not len(batch):
            return np.zeros((0, len(self.identity["classes"])), np.float32)
        chunks = [batch[i:i + self.max_batch] for i in range(0, len(batch), self.max_batch)]
        results: list[np.ndarray | None] = [None] * len(chunks)
        todo = list(range(len(chunks)))
        outage = None
        while True:
            errors = self._send(chunks, todo, results)
            todo = [i for i in todo if results[i] is None]
            if not todo:
                break
            outage = self._wait_for_server(errors, outage, len(todo))
        if outage is not None:
            self._end_outage(outage)
        return np.concatenate(results)

    def _send(self, chunks, todo: list[int], results: list) -> dict:
        """Every chunk in `todo` as one request, all in flight at once; answers land in `results` by index."""
        grpc, done, errors = self._grpc, threading.Semaphore(0), {}

        def callback(i, result=None, error=None):
            try:
                if error is None:
                    results[i] = result.as_numpy(self.output_name)
                else:
                    errors[i] = error
            except Exception as exc:  # noqa: BLE001 - a malformed answer counts as failed, never hangs us
                errors[i] = exc
            finally:
                done.release()

        for i in todo:
            inp = grpc.InferInput(self.input_name, list(chunks[i].shape), "UINT8")
            inp.set_data_from_numpy(chunks[i])
            try:
                self.client.async_infer(self.model, [inp], functools.partial(callback, i),
                                        outputs=[grpc.InferRequestedOutput(self.output_name)],
                                        client_timeout=self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - a request that could not even be sent is retried
                errors[i] = exc
                done.release()
        for _ in todo:  # every request ends: an answer, an error, or tritonclient's own client_timeout
            done.acquire()
        self.report["requests"] += len(todo)
        return errors

    def _healthy(self) -> bool:
        try:
            return bool(self.client.is_server_ready(client_timeout=2.0)
                        and self.client.is_model_ready(self.model, client_timeout=2.0))
        except Exception:  # noqa: BLE001 - no answer is the answer
            return False

    def _wait_for_server(self, errors: dict, outage: dict | None, n_left: int) -> dict:
        """After failed requests: an error from a healthy server is raised; a server that went away is
        waited for (back-off, a fresh channel, the model checked again) up to `outage_limit_s`."""
        first = _message(next(iter(errors.values()))) if errors else "no answer"
        if outage is None:
            if self._healthy():
                raise RunnerError(f"Triton server {self.url}: {first}")
            outage = {"start": _now(), "t0": time.monotonic(), "error": first, "retries": 0}
            log.warning("Triton server %s unreachable (%s); retrying", self.url, first)
        delay = self.backoff_s
        while True:
            outage["retries"] += 1
            waited = time.monotonic() - outage["t0"]
            if waited > self.outage_limit_s:
                self._end_outage(outage, recovered=False)
                raise RunnerError(f"Triton server {self.url}: unreachable for {waited:.0f} s ({outage['error']}); "
                                  f"{n_left} request(s) unanswered")
            time.sleep(delay)
            delay = min(2 * delay, self.max_backoff_s)
            self._connect()
            if not self._healthy():
                continue
            try:
                self._check()  # the server that came back must still serve the bundle's model
            except ServerMismatch:
                raise
            except Exception as exc:  # noqa: BLE001 - gone again while we asked: keep waiting
                log.info("Triton server %s not back yet (%s)", self.url, _message(exc))
                continue
            self.report["requests_resent"] += n_left
            return outage

    def _end_outage(self, outage: dict, recovered: bool = True) -> None:
        seconds = round(time.monotonic() - outage.pop("t0"), 3)
        outage.update({"end": _now(), "seconds": seconds, "recovered": recovered})
        self.report["outages"].append(outage)
        if recovered:
            log.warning("Triton server %s back after %.1f s (%d retries)", self.url, seconds, outage["retries"])

    def statistics(self) -> dict:
        """The server's own counts for this model: requests, executions, and the batch sizes it formed."""
        stats = self.client.get_inference_statistics(self.model, as_json=True, client_timeout=self.timeout_s)
        return stats.get("model_stats", [{}])[0]


def _message(exc: BaseException) -> str:
    msg = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    return " ".join(str(msg).split())[:300] or type(exc).__name__

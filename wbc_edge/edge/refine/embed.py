"""Embedding models for refinement phase 2 (semantic verification) and their class prototypes.

An embedder is a deployable ONNX graph like a member's: raw uint8 NHWC crops in (`images`), the
preprocessing inside, and an L2-normalisable feature vector out (`embedding`). It can come from

  member[:N]     member N of the bundle itself, cut before its classifier (no torch needed)
  bundle:DIR     member 0 of another wbc-edge bundle (an independent model), with its preprocessing
  onnx:FILE      a wbc-edge deployable classifier graph (cut) or an embedding graph (used as is)
  timm:NAME[@WEIGHTS]
                 any timm backbone without its head (pretrained weights from the hub, or a local
                 file after '@'); needs the `train` extra
  hf:DIR         a MedSigLIP/SigLIP/CLIP-style image encoder saved with transformers
                 (`save_pretrained`), from a local directory; needs the `embed-hf` extra

Prototypes are k-means centres (OpenCV) of each class's normalised embeddings of training cells.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..._optional import require
from ...build.surgery import EMBEDDING, INPUT, OUTPUT, add_io_processing, embedding_graph, set_metadata
from ..preprocess import Preprocessor, resize_batch
from ..stain import StainReference, bundle_stain


class EmbedderError(ValueError):
    pass


@dataclass
class EmbedSpec:
    """What an embedder needs besides its graph: how crops are prepared for it."""
    source: str
    input_size: int
    interpolation: str = "area"
    stain: dict | None = None  # a StainReference dict when the embedder expects normalised cells

    def to_dict(self) -> dict:
        return {"source": self.source, "input_size": self.input_size, "interpolation": self.interpolation,
                "stain": self.stain}


def _bundle_spec(bundle, source: str) -> EmbedSpec:
    return EmbedSpec(source, bundle.preprocess.input_size, bundle.preprocess.interpolation, bundle_stain(bundle))


def _from_onnx_file(path: Path, source: str) -> tuple[onnx.ModelProto, EmbedSpec]:
    if not path.is_file():
        raise EmbedderError(f"{source}: {path} not found")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a damaged file
        raise EmbedderError(f"{source}: {path} is not a readable ONNX file ({exc})") from exc
    ins, outs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if ins != [INPUT] or outs not in ([OUTPUT], [EMBEDDING]):
        raise EmbedderError(f"{source}: {path} is not a wbc-edge graph (inputs {ins}, outputs {outs}; expected "
                            f"'{INPUT}' -> '{OUTPUT}' or '{EMBEDDING}')")
    size = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    if outs == [OUTPUT]:
        model = embedding_graph(model)
    return model, EmbedSpec(source, int(size))


def _export_torch(module, input_size: int, mean, std, tmp: Path) -> onnx.ModelProto:
    from ...build.export import export_member

    raw = export_member(module, tmp / "embed.raw.onnx", input_size)
    return add_io_processing(onnx.load(str(raw)), mean, std, softmax=False)


def _from_timm(spec: str, tmp: Path) -> tuple[onnx.ModelProto, EmbedSpec]:
    timm = require("timm", "train")
    name, _, weights = spec.partition("@")
    kwargs = {"pretrained_cfg_overlay": {"file": weights}} if weights else {}
    model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)  # num_classes=0: pooled features
    cfg = model.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    return (_export_torch(model, size, cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)),
                          tmp), EmbedSpec(f"timm:{spec}", size, "area"))


def _from_hf(directory: Path, tmp: Path) -> tuple[onnx.ModelProto, EmbedSpec]:
    torch = require("torch", "train")
    transformers = require("transformers", "embed-hf")
    if not (directory / "config.json").is_file():
        raise EmbedderError(f"hf:{directory}: no config.json (expected a transformers save_pretrained directory)")
    pp_file = directory / "preprocessor_config.json"
    pp = json.loads(pp_file.read_text()) if pp_file.is_file() else {}
    size = pp.get("size", {})
    size = int(size.get("height", size.get("shortest_edge", 224)) if isinstance(size, dict) else size or 224)
    mean, std = pp.get("image_mean", (0.5, 0.5, 0.5)), pp.get("image_std", (0.5, 0.5, 0.5))
    encoder = transformers.AutoModel.from_pretrained(str(directory)).eval()

    class ImageFeatures(torch.nn.Module):
        """The image tower's pooled embedding (get_image_features for two-tower models)."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            if hasattr(self.m, "get_image_features"):
                out = self.m.get_image_features(pixel_values=x)
                return out if isinstance(out, torch.Tensor) else out.pooler_output
            return self.m(pixel_values=x).pooler_output

    return _export_torch(ImageFeatures(encoder), size, mean, std, tmp), EmbedSpec(f"hf:{directory}", size, "area")


SOURCES = ("member", "bundle", "onnx", "timm", "hf")


def check_source(source: str) -> None:
    """Fail at once (before any fitting) on a source of an unknown kind or without its argument."""
    kind, _, arg = source.partition(":")
    if kind not in SOURCES:
        raise EmbedderError(f"unknown embedding source {source!r}; use member[:N], bundle:DIR, onnx:FILE, "
                            "timm:NAME[@WEIGHTS] or hf:DIR")
    if kind == "member" and arg and not arg.isdigit():
        raise EmbedderError(f"embedding source {source!r}: the member is given by its index, e.g. member:1")
    if kind != "member" and not arg:
        raise EmbedderError(f"embedding source {source!r} needs its argument after '{kind}:'")
    if kind in ("bundle", "onnx", "hf") and not Path(arg).exists():
        raise EmbedderError(f"embedding source {source!r}: {arg} does not exist")


def make_embedder(bundle, source: str, out_path, tmp: Path) -> EmbedSpec:
    """Write the embedding graph for `source` (see the module doc) to `out_path`; return its spec."""
    check_source(source)
    kind, _, arg = source.partition(":")
    if kind == "member":
        n = int(arg or 0)
        if not 0 <= n < len(bundle.members):
            raise EmbedderError(f"{source}: the bundle has {len(bundle.members)} member(s)")
        model = embedding_graph(onnx.load(str(bundle.path(bundle.members[n].onnx))))
        # the crops it gets are already this bundle's model input (stain step included): no second one
        spec = EmbedSpec(source, bundle.preprocess.input_size, bundle.preprocess.interpolation)
    elif kind == "bundle":
        from ...bundle import Bundle

        other = Bundle.load(arg)
        model = embedding_graph(onnx.load(str(other.path(other.members[0].onnx))))
        spec = _bundle_spec(other, source)
    elif kind == "onnx":
        model, spec = _from_onnx_file(Path(arg), source)
    elif kind == "timm":
        model, spec = _from_timm(arg, tmp)
    else:
        model, spec = _from_hf(Path(arg), tmp)
    model = set_metadata(model, {"role": "embedding", **spec.to_dict()})
    onnx.checker.check_model(model, full_check=True)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    return spec


class Embedder:
    """The classifier bundle's model-input cells -> (N, D) L2-normalised embeddings, through any runner.
    An embedder of another size or stain (an independent model) adapts them to its own input."""

    def __init__(self, onnx_path, spec: EmbedSpec, device: str = "cpu", threads: int | None = None,
                 max_batch: int = 128):
        self.onnx_path, self.spec, self.device, self.threads, self.max_batch = onnx_path, spec, device, threads, max_batch
        # an independent embedder (another size or stain) adapts the classifier's model input to its own
        self.pre = Preprocessor(spec.input_size, spec.interpolation,
                                stain=StainReference.from_dict(spec.stain) if spec.stain else None)
        self.runner = None

    def __enter__(self):
        from ..runners import open_runner

        self.runner = open_runner(self.onnx_path, self.device, threads=self.threads)
        return self

    def __exit__(self, *exc):
        if self.runner is not None:
            self.runner.deactivate()
            self.runner = None
        return False

    def __call__(self, crops) -> np.ndarray:
        if self.runner is None:
            raise RuntimeError("Embedder used outside its `with` block")
        batch = self.pre.stain(resize_batch(crops, self.spec.input_size, self.spec.interpolation))
        if not len(batch):
            return np.zeros((0, 0), np.float32)
        out = np.concatenate([self.runner.infer(batch[i:i + self.max_batch])
                              for i in range(0, len(batch), self.max_batch)]).astype(np.float32)
        return l2_normalise(out.reshape(len(out), -1))


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_prototypes(emb: np.ndarray, labels: np.ndarray, n_classes: int, per_class: int = 3,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prototypes (P, D) unit vectors, their class indices (P,)): k-means centres of each class's
    embeddings (a class can look several ways: band vs segmented shapes, smudged vs intact)."""
    import cv2

    cv2.setRNGSeed(seed)
    protos, owners = [], []
    for c in range(n_classes):
        x = np.ascontiguousarray(emb[labels == c], np.float32)
        if not len(x):
            continue
        k = min(per_class, len(x))
        if k == 1:
            centres = x.mean(0, keepdims=True)
        else:
            criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 100, 1e-4)
            centres = cv2.kmeans(x, k, None, criteria, 4, cv2.KMEANS_PP_CENTERS)[2]
        protos.append(l2_normalise(centres))
        owners.extend([c] * len(centres))
    return np.concatenate(protos).astype(np.float32), np.asarray(owners, np.int64)


def class_similarity(emb: np.ndarray, protos: np.ndarray, owners: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, C) cosine similarity of each embedding to its nearest prototype of each class (-inf: no prototype)."""
    sim = emb @ protos.T
    out = np.full((len(emb), n_classes), -np.inf, np.float32)
    for c in np.unique(owners):
        out[:, c] = sim[:, owners == c].max(1)
    return out


def class_rank(sim: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """1-based rank of `classes[i]` among row i's class similarities (1: the nearest class)."""
    own = sim[np.arange(len(sim)), classes]
    return 1 + (sim > own[:, None]).sum(1)

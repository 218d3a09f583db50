"""The bundle: a directory with `manifest.json` and the files it names (weights, ONNX graphs, engines).

Every stage reads preprocessing, classes, members and ensemble weights from here, so a model cannot
be run with the wrong normalisation. Weights are safetensors (never pickle); every file is checksummed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__

FORMAT = "wbc-edge-bundle"
FORMAT_VERSION = 1  # bump on incompatible manifest changes; load() refuses newer versions


class BundleError(ValueError):
    """A bundle that cannot be used as it is; the message names the bundle and the problem."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Preprocess:
    input_size: int
    mean: list[float]
    std: list[float]
    interpolation: str = "area"

    def to_dict(self) -> dict:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}


@dataclass
class Member:
    name: str
    arch: str
    weights: str | None = None  # safetensors file, relative to the bundle
    onnx: str | None = None  # FP32 ONNX graph with uint8 NHWC input and softmax output
    weight: float = 1.0  # weight in the ensemble mean
    fold: int | None = None
    arch_kwargs: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)  # other builds, e.g. {"ort-int8": "m0.int8.onnx"}


@dataclass
class Bundle:
    root: Path
    classes: list[str]
    preprocess: Preprocess
    members: list[Member]
    extra: dict = field(default_factory=dict)  # stain, tta, refine, calibration, priors, training...

    # ---- files -------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_manifest(self) -> dict:
        files = {f for m in self.members for f in (m.weights, m.onnx, *m.artifacts.values()) if f}
        files = sorted(files | set(self.extra_files()))
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "wbc_edge_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "classes": list(self.classes), "preprocess": self.preprocess.to_dict(),
            "members": [m.__dict__.copy() for m in self.members],
            **copy.deepcopy(self.extra),
            "checksums": {f: sha256(self.path(f)) for f in files if self.path(f).exists()},
        }

    def extra_files(self) -> list[str]:
        """Files named outside the members: the fused graph, refinement phase 2's embedder and prototypes."""
        verify = self.extra.get("refine", {}).get("verify", {})
        return [f for f in (self.extra.get("fused", {}).get("onnx"), verify.get("onnx"), verify.get("prototypes")) if f]

    def save(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_path.write_text(json.dumps(self.to_manifest(), indent=2) + "\n")
        return self.manifest_path

    @classmethod
    def load(cls, root, verify: bool = True) -> "Bundle":
        root = Path(root)
        manifest = read_manifest(root)
        known = {"format", "format_version", "wbc_edge_version", "created", "classes", "preprocess",
                 "members", "checksums"}
        try:
            bundle = cls(root=root, classes=list(manifest["classes"]),
                         preprocess=Preprocess(**manifest["preprocess"]),
                         members=[Member(**m) for m in manifest["members"]],
                         extra={k: v for k, v in manifest.items() if k not in known})
        except (KeyError, TypeError) as exc:
            raise BundleError(f"{root}: malformed manifest.json ({exc})") from exc
        if verify:
            bundle.verify(manifest.get("checksums", {}))
        return bundle

    def verify(self, checksums: dict) -> None:
        """Every file the manifest names exists and matches its checksum."""
        for m in self.members:
            for f in (m.weights, m.onnx, *m.artifacts.values()):
                if f and not self.path(f).exists():
                    raise BundleError(f"{self.root}: member {m.name!r} names {f!r}, which is missing")
        for f in self.extra_files():
            if not self.path(f).exists():
                raise BundleError(f"{self.root}: the manifest names {f!r}, which is missing")
        for f, digest in checksums.items():
            if self.path(f).exists() and sha256(self.path(f)) != digest:
                raise BundleError(f"{self.root}: {f} does not match its checksum (corrupt or replaced)")


def read_manifest(root: Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{root}: not a bundle (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: invalid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a wbc-edge bundle (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {version} is newer than this wbc-edge "
                          f"({__version__}) understands ({FORMAT_VERSION}); upgrade wbc-edge")
    return manifest

"""The bundle: a directory with `manifest.json` and the files it names (weights, ONNX graphs, engines).

Every stage reads preprocessing, classes, members and ensemble weights from here, so a model cannot
be run with the wrong normalisation. Weights are safetensors (never pickle); every file is checksummed,
and so is the manifest itself (`checksums["manifest.json"]`: a digest of its canonical JSON without
that entry). The manifest is read once into typed dataclasses and validated at load: types and ranges
of every field the runtime reads, file names confined to the bundle directory, and classes, input size
and member list checked against each graph's own metadata. Every refusal is a `BundleError` naming the
bundle and the field.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath, PureWindowsPath

from . import __version__

FORMAT = "wbc-edge-bundle"
FORMAT_VERSION = 1  # bump on incompatible manifest changes; load() refuses newer versions
SELF = "manifest.json"  # the checksums entry that holds the manifest's own digest
TRUST_ENV = "WBC_EDGE_TRUST_UNSIGNED"  # "1": run bundles without a manifest digest (`--trust-unsigned`)
TEMPERATURE_RANGE = (1e-3, 1e3)  # beyond it softmax(log p / T) under/overflows to NaN or is meaningless
MAX_INPUT_SIZE = 4096  # model input side in pixels; far above any cell crop, below an allocation bomb
MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # becomes `<name>.onnx`: no separators, no `..`

log = logging.getLogger("wbc_edge.bundle")


class BundleError(ValueError):
    """A bundle that cannot be used as it is; the message names the bundle and the problem."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces) without its own digest entry;
    the file checksums are inside what it covers, so none can be dropped or changed unnoticed."""
    body = dict(manifest)
    if isinstance(body.get("checksums"), dict):
        body["checksums"] = {k: v for k, v in body["checksums"].items() if k != SELF}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def trusts_unsigned(trust_unsigned: bool | None = None) -> bool:
    """The caller's choice, else the environment's (`wbc-edge --trust-unsigned` sets it for every command)."""
    if trust_unsigned is not None:
        return trust_unsigned
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


# ---- field checks: each raises BundleError naming the bundle and the field --------------------------
def _fail(where, name: str, problem: str):
    raise BundleError(f"{where}: manifest field {name!r} {problem}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is no integer


def _is_number(v) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # a JSON integer too large for a float
        return False


def _dict(where, name: str, v, default=None) -> dict:
    if v is None and default is not None:
        return default
    if not isinstance(v, dict):
        _fail(where, name, f"must be an object, got {v!r:.60}")
    return v


def file_name_problem(name) -> str | None:
    """Why `name` cannot name a file inside a bundle (None: it can): a relative path without `..`."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if "\\" in name or "\0" in name or PureWindowsPath(name).drive:
        return "must be a plain relative path (no backslash, drive or NUL)"
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        return "must stay inside the bundle directory (no absolute path, no '..')"
    return None


def _file(where, name: str, v) -> None:
    problem = file_name_problem(v)
    if problem:
        _fail(where, name, f"{problem}, got {v!r:.80}")


@dataclass
class Preprocess:
    input_size: int
    mean: list[float]
    std: list[float]
    interpolation: str = "area"

    def to_dict(self) -> dict:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    def validate(self, where) -> None:
        from .edge.preprocess import INTERPOLATIONS  # the resize flags the preprocessor knows

        if not _is_int(self.input_size) or not 1 <= self.input_size <= MAX_INPUT_SIZE:
            _fail(where, "preprocess.input_size",
                  f"must be a positive integer <= {MAX_INPUT_SIZE}, got {self.input_size!r:.40}")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if not isinstance(v, list) or len(v) != 3 or not all(_is_number(x) for x in v):
                _fail(where, f"preprocess.{key}", f"must be 3 finite numbers (R, G, B), got {v!r:.60}")
        if min(self.std) <= 0:
            _fail(where, "preprocess.std", f"must be > 0 (it divides), got {self.std}")
        if not isinstance(self.interpolation, str) or self.interpolation not in INTERPOLATIONS:
            _fail(where, "preprocess.interpolation",
                  f"must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r:.40}")


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

    def files(self) -> list[str]:
        return [f for f in (self.weights, self.onnx, *self.artifacts.values()) if f]

    def validate(self, where, i: int) -> None:
        at = f"members[{i}]"
        if not isinstance(self.name, str) or not MEMBER_NAME.fullmatch(self.name):
            _fail(where, f"{at}.name", "must be letters, digits, '_', '.' or '-' (it names files in the "
                                       f"bundle: no path separators, no '..'), got {self.name!r:.60}")
        if not isinstance(self.arch, str) or not self.arch:
            _fail(where, f"{at}.arch", f"must be a non-empty string, got {self.arch!r:.60}")
        if self.onnx is None:  # every runner, build target and the fused graph start from it
            _fail(where, f"{at}.onnx", "must name the member's ONNX graph (it is missing)")
        for key in ("weights", "onnx"):
            if getattr(self, key) is not None:
                _file(where, f"{at}.{key}", getattr(self, key))
        if not _is_number(self.weight) or self.weight < 0:
            _fail(where, f"{at}.weight", f"must be a finite number >= 0, got {self.weight!r:.40}")
        if self.fold is not None and not _is_int(self.fold):
            _fail(where, f"{at}.fold", f"must be an integer or null, got {self.fold!r:.40}")
        _dict(where, f"{at}.arch_kwargs", self.arch_kwargs)
        for key, f in _dict(where, f"{at}.artifacts", self.artifacts).items():
            _file(where, f"{at}.artifacts.{key}", f)

    @classmethod
    def from_dict(cls, d, where, i: int) -> "Member":
        d = _dict(where, f"members[{i}]", d)
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        missing = [k for k in ("name", "arch") if k not in d]
        if unknown or missing:
            _fail(where, f"members[{i}]", f"has unknown keys {unknown}" if unknown else f"lacks {missing}")
        return cls(**d)


def _validate_classes(where, classes) -> None:
    if not isinstance(classes, list) or not classes:
        _fail(where, "classes", f"must be a non-empty list of class codes, got {classes!r:.60}")
    if not all(isinstance(c, str) and c for c in classes):
        _fail(where, "classes", f"must hold non-empty strings only, got {classes!r:.80}")
    if len(set(classes)) != len(classes):
        _fail(where, "classes", f"must not repeat a code, got {classes}")


def _validate_members(where, members: list[Member]) -> None:
    if not members:
        _fail(where, "members", "must name at least one model (it is empty)")
    for i, m in enumerate(members):
        m.validate(where, i)
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        _fail(where, "members", f"must not repeat a name (they name files), got {names}")
    total = math.fsum(m.weight for m in members)
    if not (0 < total < math.inf):
        _fail(where, "members[].weight", f"must not all be 0 (the ensemble mean divides by their sum), "
                                         f"got {[m.weight for m in members]}")


def _check_view_list(where, name: str, views) -> None:
    from .edge.tta import VIEWS  # the view names the runtime can apply

    if not isinstance(views, list) or not views or not all(isinstance(v, str) and v in VIEWS for v in views):
        _fail(where, name, f"must be a non-empty list of views among {list(VIEWS)}, got {views!r:.80}")


def _validate_runtime_sections(where, extra: dict) -> None:
    """The sections the classifier reads besides classes, preprocessing and members."""
    _check_view_list(where, "tta.views", _dict(where, "tta", extra.get("tta", {})).get("views", ["id"]))
    t = _dict(where, "confidence", extra.get("confidence"), default={}).get("temperature", 1.0)
    lo, hi = TEMPERATURE_RANGE
    if not _is_number(t) or not lo <= t <= hi:
        _fail(where, "confidence.temperature", f"must be a finite number in [{lo:g}, {hi:g}] "
                                               f"(probabilities are divided by it in log space), got {t!r:.40}")


def _validate_fused(where, extra: dict, members: list[Member]) -> None:
    if "fused" not in extra:
        return
    fused = _dict(where, "fused", extra["fused"])
    _file(where, "fused.onnx", fused.get("onnx"))
    names = [m.name for m in members]
    if fused.get("members", names) != names:
        _fail(where, "fused.members", f"{fused.get('members')!r:.80} differs from the members {names}; "
                                      "rebuild it with `wbc-edge build --target onnx --fuse`")
    for key, f in _dict(where, "fused.artifacts", fused.get("artifacts", {})).items():
        _file(where, f"fused.artifacts.{key}", f)
    _check_view_list(where, "fused.views", fused.get("views", ["id"]))
    weights = fused.get("weights", [m.weight for m in members])
    if not _close_lists(weights, [m.weight for m in members]):
        _fail(where, "fused.weights", f"{weights!r:.80} differ from the members' weights "
                                      f"{[m.weight for m in members]}: the fused graph has them built in; "
                                      "rebuild it with `wbc-edge build --target onnx --fuse`")


def _validate_restore(where, extra: dict) -> None:
    """The learned restorer (edge/restore.py): its graph and the quality gate's thresholds."""
    if "restore" not in extra:
        return
    restore = _dict(where, "restore", extra["restore"])
    _file(where, "restore.onnx", restore.get("onnx"))
    if not isinstance(restore.get("enabled", True), bool):
        _fail(where, "restore.enabled", f"must be true or false, got {restore.get('enabled')!r:.40}")
    gate = _dict(where, "restore.gate", restore.get("gate"))
    for key in ("min_sharpness", "max_unevenness", "max_tilt"):
        if key == "max_tilt" and key not in gate:
            continue
        if not _is_number(gate.get(key)) or gate[key] < 0:
            _fail(where, f"restore.gate.{key}", f"must be a finite number >= 0, got {gate.get(key)!r:.40}")


def _close_lists(a, b) -> bool:
    return (isinstance(a, list) and len(a) == len(b)
            and all(_is_number(x) and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b)))


def _validate_checksums(where, checksums) -> dict:
    checksums = _dict(where, "checksums", checksums)
    for f, digest in checksums.items():
        _file(where, f"checksums.{f}", f)
        if not isinstance(digest, str):
            _fail(where, f"checksums.{f}", f"must be a hex digest string, got {digest!r:.40}")
    return checksums


# ---- graph metadata: what each ONNX graph says about itself (set by build.surgery.set_metadata) -------
def graph_metadata(path: Path) -> dict:
    """The graph's metadata_props as a dict, read without its external weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own decode errors for a bad file
        raise BundleError(f"{path}: not a readable ONNX graph ({type(exc).__name__}: {exc})") from exc
    return {p.key: p.value for p in model.metadata_props}


def _meta_json(meta: dict, key: str, path):
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, TypeError) as exc:
        raise BundleError(f"{path}: its metadata {key!r} is not valid JSON ({exc})") from exc


@dataclass
class Bundle:
    root: Path
    classes: list[str]
    preprocess: Preprocess
    members: list[Member]
    extra: dict = field(default_factory=dict)  # stain, tta, refine, calibration, priors, training...

    # ---- files -------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """`name` inside the bundle; a name that would leave the directory is refused (a manifest is
        input: `build` and every reader resolve names through here)."""
        problem = file_name_problem(os.fspath(name) if isinstance(name, os.PathLike) else name)
        if problem:
            raise BundleError(f"{self.root}: file name {name!r:.80} {problem}")
        return self.root / name

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    # ---- typed views of the runtime sections (kept in `extra`, which fitting code edits) -----------
    @property
    def views(self) -> list[str]:
        """The TTA views the bundle asks for (default: the identity only)."""
        return list(self.extra.get("tta", {}).get("views", ["id"]))

    @property
    def temperature(self) -> float:
        """The confidence temperature (1: none fitted)."""
        return float((self.extra.get("confidence") or {}).get("temperature", 1.0))

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> "Bundle":
        """Types and ranges of every field the runtime reads, file names confined to the bundle."""
        where = self.root
        _validate_classes(where, self.classes)
        if not isinstance(self.preprocess, Preprocess):
            _fail(where, "preprocess", "must be an object")
        self.preprocess.validate(where)
        _validate_members(where, self.members)
        _validate_runtime_sections(where, self.extra)
        _validate_fused(where, self.extra, self.members)
        _validate_restore(where, self.extra)
        verify = _dict(where, "refine", self.extra.get("refine", {})).get("verify", {})
        for key in ("onnx", "prototypes"):
            if _dict(where, "refine.verify", verify).get(key) is not None:
                _file(where, f"refine.verify.{key}", verify[key])
        return self

    def check_graphs(self) -> None:
        """Each ONNX graph's own metadata (classes, preprocessing, member names) agrees with the manifest:
        a manifest edited apart from its graphs would relabel every cell or feed the wrong size."""
        for m in self.members:
            for f in dict.fromkeys(f for f in (m.onnx, *m.artifacts.values()) if f and f.endswith(".onnx")):
                self._check_graph(f, graph_metadata(self.path(f)), m.name)
        fused = self.extra.get("fused", {})
        for f in [fused["onnx"], *fused.get("artifacts", {}).values()] if fused else []:
            self._check_fused_graph(f, graph_metadata(self.path(f)))
        if self.extra.get("restore"):
            self._check_restorer_graph(self.extra["restore"]["onnx"])

    def _check_restorer_graph(self, name: str) -> None:
        """The restorer graph says it is one and takes cells of the manifest's input size."""
        meta = graph_metadata(self.path(name))
        if meta.get("kind") != "restorer":
            raise BundleError(f"{self.root}: {name} (restore.onnx) is not a restorer graph (its metadata 'kind' is "
                              f"{meta.get('kind')!r}); re-train it with `wbc-edge train-restorer`")
        size = _meta_json(meta, "input_size", name) if "input_size" in meta else None
        if size != self.preprocess.input_size:
            raise BundleError(f"{self.root}: {name} restores {size}-px cells, the manifest's "
                              f"preprocess.input_size is {self.preprocess.input_size}; re-train the restorer")

    def _check_fused_graph(self, name: str, meta: dict) -> None:
        """A fused graph has the members, their weights and the TTA views built in: all must be the manifest's."""
        self._check_graph(name, meta, None)
        rebuild = "rebuild it with `wbc-edge build --target onnx --fuse`"
        names = [m.name for m in self.members]
        if "members" in meta and _meta_json(meta, "members", name) != names:
            raise BundleError(f"{self.root}: {name} fuses members {meta['members']}, the manifest lists {names}; "
                              f"{rebuild}")
        weights = [m.weight for m in self.members]
        if "ensemble_weights" in meta and not _close_lists(_meta_json(meta, "ensemble_weights", name), weights):
            raise BundleError(f"{self.root}: {name} has weights {meta['ensemble_weights']} built in, the "
                              f"manifest's members say {weights}; {rebuild}")
        views = self.extra["fused"].get("views", ["id"])
        if "views" in meta and _meta_json(meta, "views", name) != views:
            raise BundleError(f"{self.root}: {name} has TTA views {meta['views']} built in, the manifest's "
                              f"'fused.views' say {views}; {rebuild}")

    def _check_graph(self, name: str, meta: dict, member: str | None) -> None:
        where = f"{self.root}: {name}"
        if "classes" not in meta:
            raise BundleError(f"{where} carries no wbc-edge metadata (classes); rebuild it with `wbc-edge build`")
        classes = _meta_json(meta, "classes", name)
        if classes != self.classes:
            raise BundleError(f"{where} was trained on classes {classes} but the manifest's 'classes' are "
                              f"{self.classes} (order matters: output i is class i)")
        if member is not None and meta.get("member", member) != member:
            # a warning, not a refusal: a graph reused for a second member (same classes, same input) runs
            # correctly; only the names in its metadata are off
            log.warning("%s was exported as member %r, the manifest runs it as %r", where, meta["member"], member)
        if "preprocess" in meta:
            self._check_graph_preprocess(where, _meta_json(meta, "preprocess", name))

    def _check_graph_preprocess(self, where: str, graph: dict) -> None:
        ours = self.preprocess.to_dict()
        if not isinstance(graph, dict):
            raise BundleError(f"{where}: its metadata 'preprocess' is not an object")
        for key in ("input_size", "interpolation"):
            if key in graph and graph[key] != ours[key]:
                raise BundleError(f"{where} expects preprocess.{key} {graph[key]!r}, the manifest says "
                                  f"{ours[key]!r}")
        for key in ("mean", "std"):
            if key in graph and not _close_lists(graph[key], ours[key]):
                raise BundleError(f"{where} normalises with {key} {graph[key]}, the manifest says {ours[key]}")

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_manifest(self) -> dict:
        files = {f for m in self.members for f in m.files()}
        files = sorted(files | set(self.extra_files()))
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "wbc_edge_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "classes": list(self.classes), "preprocess": self.preprocess.to_dict(),
            "members": [m.__dict__.copy() for m in self.members],
            **copy.deepcopy(self.extra),
            "checksums": {f: sha256(self.path(f)) for f in files if self.path(f).exists()},
        }
        # signed over the JSON as it will be read back (tuples -> lists, keys -> strings)
        manifest = json.loads(json.dumps(manifest))
        manifest["checksums"][SELF] = manifest_digest(manifest)
        return manifest

    def extra_files(self) -> list[str]:
        """Files named outside the members: the fused graph, refinement phase 2's embedder and prototypes."""
        verify = self.extra.get("refine", {}).get("verify", {})
        fused = self.extra.get("fused", {})
        restore = self.extra.get("restore") or {}  # the learned restorer's graph (edge/restore.py)
        return [f for f in (fused.get("onnx"), *fused.get("artifacts", {}).values(), verify.get("onnx"),
                            verify.get("prototypes"), restore.get("onnx")) if f]

    def save(self) -> Path:
        self.validate()  # a bundle that load() would refuse is never written
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_path.write_text(json.dumps(self.to_manifest(), indent=2) + "\n")
        return self.manifest_path

    @classmethod
    def load(cls, root, verify: bool = True, trust_unsigned: bool | None = None) -> "Bundle":
        """Read, type and validate the manifest; with `verify`, also its own digest, every file's checksum
        and each graph's metadata. An unsigned bundle (no manifest digest) is refused unless
        `trust_unsigned` (None: the WBC_EDGE_TRUST_UNSIGNED environment variable)."""
        root = Path(root)
        manifest = read_manifest(root)
        bundle = cls.from_manifest(root, manifest).validate()
        checksums = _validate_checksums(root, manifest.get("checksums", {}))
        if verify:
            bundle.verify_manifest(manifest, trusts_unsigned(trust_unsigned))
            bundle.verify(checksums, trusts_unsigned(trust_unsigned))
            bundle.check_graphs()
        return bundle

    @classmethod
    def from_manifest(cls, root: Path, manifest: dict) -> "Bundle":
        known = {"format", "format_version", "wbc_edge_version", "created", "classes", "preprocess",
                 "members", "checksums"}
        pp = _dict(root, "preprocess", manifest.get("preprocess"))
        unknown = sorted(set(pp) - {f.name for f in fields(Preprocess)})
        missing = [k for k in ("input_size", "mean", "std") if k not in pp]
        if unknown or missing:
            _fail(root, "preprocess", f"has unknown keys {unknown}" if unknown else f"lacks {missing}")
        members = manifest.get("members")
        if not isinstance(members, list):
            _fail(root, "members", f"must be a list of members, got {members!r:.60}")
        return cls(root=root, classes=manifest.get("classes"), preprocess=Preprocess(**pp),
                   members=[Member.from_dict(m, root, i) for i, m in enumerate(members)],
                   extra={k: v for k, v in manifest.items() if k not in known})

    def verify_manifest(self, manifest: dict, trust_unsigned: bool = False) -> None:
        """The manifest's own digest: present (or the user trusts unsigned bundles) and matching."""
        digest = (manifest.get("checksums") or {}).get(SELF)
        if digest is None:
            if not trust_unsigned:
                raise BundleError(f"{self.root}: unsigned bundle: manifest.json carries no checksum of itself "
                                  f"(checksums[{SELF!r}]), so edits to it cannot be detected; re-save it with "
                                  f"wbc-edge, or run it anyway with --trust-unsigned ({TRUST_ENV}=1)")
            log.warning("%s: unsigned bundle, run because unsigned bundles are trusted", self.root)
        elif digest != manifest_digest(manifest):
            raise BundleError(f"{self.root}: manifest.json was changed after it was saved (it does not match "
                              f"its own checksum); restore it, or re-save it with wbc-edge")

    def verify(self, checksums: dict, trust_unsigned: bool = True) -> None:
        """Every file the manifest names exists and matches its checksum (and has one, unless unsigned
        bundles are trusted)."""
        for m in self.members:
            for f in m.files():
                if not self.path(f).exists():
                    raise BundleError(f"{self.root}: member {m.name!r} names {f!r}, which is missing")
        for f in self.extra_files():
            if not self.path(f).exists():
                raise BundleError(f"{self.root}: the manifest names {f!r}, which is missing")
        unsummed = [f for f in [*(f for m in self.members for f in m.files()), *self.extra_files()]
                    if f not in checksums]
        if unsummed and not trust_unsigned:
            raise BundleError(f"{self.root}: {unsummed[0]} has no checksum in manifest.json, so a replaced file "
                              f"cannot be detected; re-save the bundle, or pass --trust-unsigned")
        for f, digest in checksums.items():
            if f != SELF and self.path(f).exists() and sha256(self.path(f)) != digest:
                raise BundleError(f"{self.root}: {f} does not match its checksum (corrupt or replaced)")


def read_manifest(root: Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{root}: not a bundle (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: must be a JSON object, got {type(manifest).__name__} ({manifest!r:.40})")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a wbc-edge bundle (format={manifest.get('format')!r:.40})")
    version = manifest.get("format_version")
    if not _is_int(version) or version < 1:
        raise BundleError(f"{path}: manifest field 'format_version' must be an integer >= 1, got {version!r:.40}")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {version} is newer than this wbc-edge "
                          f"({__version__}) understands ({FORMAT_VERSION}); upgrade wbc-edge")
    return manifest

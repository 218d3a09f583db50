"""The refinement stage after the ensemble: switchable phases, every change recorded per cell.

Phases (each configured in the bundle's `refine` section, each with `enabled`):
  boost       per-class logit offsets fitted for macro-F1 on validation cells (phase 1)
  verify      semantic verification (phase 2): a switch to a rarer class, proposed by phase 1 or 3,
              stands only if the class is among the `rank` nearest classes of the cell's embedding
              (nearest prototype per class); otherwise the switch is undone and the veto recorded
  morphology  confusion pairs decided by per-class morphology models (phase 3; needs the crops)
"""
from __future__ import annotations

import json
import logging
import tempfile
import threading
from pathlib import Path

import numpy as np

from ...data.datasets import load_bundle_cells
from ..confidence import calibrated_validation
from .boost import adjusted, fit_offsets

log = logging.getLogger("wbc_edge.refine")


def features_for(device: str):
    """(morphology-feature function, where it runs): the CUDA kernels for device 'cuda' where numba.cuda
    has a GPU (or the simulator, NUMBA_ENABLE_CUDASIM=1), else the fused CPU kernel; a CUDA request that
    cannot be met is said once in the log, as the runner chain does."""
    if device == "cuda":
        try:
            from numba import cuda

            if cuda.is_available():
                from .cuda_kernels import morphology_features_cuda

                return morphology_features_cuda, "cuda"
            reason = "numba.cuda finds no CUDA GPU"
        except Exception as exc:  # noqa: BLE001 - a broken CUDA driver/toolkit raises its own types
            reason = f"{type(exc).__name__}: {exc}"
        log.warning("--device cuda: refinement features on the CPU (%s)", reason)
    from .features import morphology_features

    return morphology_features, "cpu"


class Refiner:
    def __init__(self, config: dict | None, classes: list[str], root=None, device: str = "cpu"):
        self.config, self.classes = config or {}, list(classes)
        boost = self.config.get("boost", {})
        self.offsets = np.asarray(boost["offsets"]) if boost.get("enabled") and "offsets" in boost else None
        bio = self.config.get("morphology", {})
        self.bio = bio if bio.get("enabled") else None
        self.features_device = None  # where phase 3's features run ("cpu"/"cuda"); None: phase 3 is off
        if self.bio is not None:  # parsed once here: __call__ runs per stream micro-batch
            from .models import MorphologyModel

            self._model = MorphologyModel.from_dict(self.bio["model"])
            self._pairs = [tuple(p) for p in self.bio["pairs"]]
            self._outliers = {k: tuple(v) for k, v in self.bio.get("outliers", {}).items()}
            # phase 3's features: Numba CUDA kernels on the device batch with device 'cuda', else the CPU
            self._features, self.features_device = features_for(device)
        verify = self.config.get("verify", {})
        self.verify = verify if verify.get("enabled") else None
        if self.verify is not None and root is None:
            raise ValueError("refinement phase 2 (verify) needs the bundle directory for its embedder")
        priors = (self.verify or {}).get("priors")
        self._rarer = np.asarray(priors) if priors and self.verify.get("direction", "rarer") == "rarer" else None
        self.root, self.device = (Path(root) if root is not None else None), device
        self._embedder = self._protos = None
        self._lock = threading.Lock()  # the stream's workers may share one refiner

    @classmethod
    def for_bundle(cls, bundle, enabled: bool = True, device: str = "cpu") -> "Refiner":
        """The bundle's refinement as configured (or none at all with enabled=False)."""
        return cls(bundle.extra.get("refine") if enabled else None, bundle.classes, bundle.root, device)

    @property
    def active(self) -> bool:
        return self.offsets is not None or self.bio is not None

    def __call__(self, probs: np.ndarray, crops=None) -> tuple[np.ndarray, list[list[dict]]]:
        """(refined class indices, per-cell list of changes {phase, from, to})."""
        pred = probs.argmax(1)
        changes: list[list[dict]] = [[] for _ in range(len(probs))]
        cache: dict[int, np.ndarray] = {}
        if self.offsets is not None:
            new = adjusted(probs, self.offsets)
            for i in np.flatnonzero(new != pred):
                changes[i].append({"phase": "boost", "from": self.classes[pred[i]], "to": self.classes[new[i]]})
            pred = self._verified(pred, new, crops, changes, cache)
        if self.bio is not None and crops is not None and len(crops):
            from .biofilter import bio_filter

            feats: dict[int, np.ndarray] = {}
            # a device batch (CuPy) stays where it is; anything else is one host array
            batch = crops if hasattr(crops, "__cuda_array_interface__") else np.asarray(crops)

            def feats_of(idx):  # only the cells a pair may switch (a close call), each computed once
                todo = [i for i in idx if i not in feats]
                if todo:
                    feats.update(zip(todo, self._features(batch[np.asarray(todo)])))
                return np.stack([feats[i] for i in idx])

            new, bio_changes = bio_filter(probs, pred, feats_of, self._model, self.classes, self._pairs,
                                          self.bio["close"], self._outliers)
            for c, extra in zip(changes, bio_changes):
                c.extend(extra)
            pred = self._verified(pred, new, crops, changes, cache)
        return pred, changes

    # ---- phase 2 -----------------------------------------------------------------------------
    def _checked(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        """Cells whose switch phase 2 must confirm: to a class rarer (by training prior) than the old one."""
        moved = after != before
        if self._rarer is not None:
            moved &= self._rarer[after] < self._rarer[before]
        return np.flatnonzero(moved)

    def _open_embedder(self):
        from .embed import Embedder, EmbedSpec

        spec = EmbedSpec(**self.verify["spec"])
        self._embedder = Embedder(self.root / self.verify["onnx"], spec, self.device).__enter__()
        with np.load(self.root / self.verify["prototypes"], allow_pickle=False) as z:
            self._protos = (z["prototypes"], z["owners"])

    def _verified(self, before, after, crops, changes, cache) -> np.ndarray:
        if self.verify is None:
            return after
        idx = self._checked(before, after)
        if not len(idx):
            return after
        if crops is None:
            raise ValueError("refinement phase 2 (verify) needs the cell crops")
        from .embed import class_rank, class_similarity

        with self._lock:
            if self._embedder is None:
                self._open_embedder()
        todo = [i for i in idx if i not in cache]
        if todo:
            cache.update(zip(todo, self._embedder([crops[i] for i in todo])))
        sim = class_similarity(np.stack([cache[i] for i in idx]), *self._protos, len(self.classes))
        ranks = class_rank(sim, after[idx])
        out = after.copy()
        for i, r in zip(idx, ranks):
            changes[i][-1]["embedding_rank"] = int(r)
            if r > self.verify["rank"]:  # the embedding does not back the rarer class: undo the switch
                out[i] = before[i]
                changes[i].append({"phase": "verify", "from": self.classes[after[i]], "to": self.classes[before[i]],
                                   "embedding_rank": int(r)})
        return out

    def close(self) -> None:
        if self._embedder is not None:
            self._embedder.__exit__()
            self._embedder = None


def fit_refinement(bundle, val_data, progress: bool = False, val=None) -> dict:
    """Fit phase 1 on labelled validation cells with the bundle's own runner; enable it only if it
    raises validation macro-F1. Stores the result in the bundle manifest."""

    _, y, probs = calibrated_validation(bundle, val_data, val, progress)
    # Fit on one half of the validation cells, check on the other: offsets tuned for macro-F1 overfit
    # easily, and a phase that does not help on cells it was not fitted on stays off.
    half = fit_half(y)
    offsets, fit = fit_offsets(probs[half], y[half])
    from ... import metrics

    k = probs.shape[1]
    check = {"check_macro_f1_before": metrics.macro_f1(y[~half], probs[~half].argmax(1), range(k)),
             "check_macro_f1_after": metrics.macro_f1(y[~half], adjusted(probs[~half], offsets), range(k))}
    boost = {"enabled": check["check_macro_f1_after"] > check["check_macro_f1_before"],
             "offsets": offsets.round(4).tolist(), "fitted_on": str(val_data), "n_val": int(len(y)), **fit, **check}
    bundle.extra.setdefault("refine", {})["boost"] = boost
    bundle.save()
    return json.loads(json.dumps(boost))


def fit_half(y: np.ndarray) -> np.ndarray:
    """Every other cell of each class: the half phase 1 is fitted on (the rest checks it)."""
    half = np.zeros(len(y), bool)
    for c in np.unique(y):
        half[np.flatnonzero(y == c)[::2]] = True
    return half


def fit_morphology(bundle, morph_data, val_data, pairs=None, close: float | None = None, progress: bool = False,
                   val=None) -> dict:
    """Fit per-class morphology models on `morph_data` (training cells), decide on `val_data` whether
    the phase-3 filter raises macro-F1 on top of the phases already enabled; store it in the bundle."""
    from ... import metrics
    from .biofilter import CLOSE, DEFAULT_OUTLIERS, DEFAULT_PAIRS, active_pairs, bio_filter, pair_confusion
    from .features import morphology_features
    from .models import MorphologyModel

    pairs = [tuple(p) for p in (pairs or DEFAULT_PAIRS)]
    xm, ym = load_bundle_cells(bundle, morph_data, progress)
    model = MorphologyModel.fit(morphology_features(xm), [bundle.classes[i] for i in ym], bundle.classes)
    xv, yv, probs = calibrated_validation(bundle, val_data, val, progress)
    config = {k: v for k, v in bundle.extra.get("refine", {}).items() if k != "morphology"}
    refiner = Refiner(config, bundle.classes, bundle.root)
    base = refiner(probs, xv)[0]
    refiner.close()
    feats, k = morphology_features(xv), range(len(bundle.classes))
    # how close the rare class must be: given, or the best of a small grid on the validation cells
    grid = [close] if close is not None else [CLOSE, 0.5, 0.8]
    outliers = dict(DEFAULT_OUTLIERS)
    runs = {c: bio_filter(probs, base, feats, model, bundle.classes, pairs, c, outliers)[0] for c in grid}
    close = max(grid, key=lambda c: metrics.macro_f1(yv, runs[c], k))
    after = runs[close]
    used = active_pairs(pairs, bundle.classes, model, outliers)
    rules = {name: list(rule) for name, rule in outliers.items() if tuple(name.split("/")) in used}
    result = {"pairs": [list(p) for p in used], "close": close, "outliers": rules,
              "fitted_on": str(morph_data), "n_fit": int(len(ym)),
              "checked_on": str(val_data), "n_val": int(len(yv)),
              "val_macro_f1_before": metrics.macro_f1(yv, base, k), "val_macro_f1_after": metrics.macro_f1(yv, after, k),
              "pairs_before": pair_confusion(yv, base, bundle.classes, used),
              "pairs_after": pair_confusion(yv, after, bundle.classes, used)}
    result["enabled"] = result["val_macro_f1_after"] > result["val_macro_f1_before"]
    bundle.extra.setdefault("refine", {})["morphology"] = {**result, "model": model.to_dict()}
    bundle.save()
    return result


VERIFY_DIR = "refine"


def fit_verification(bundle, proto_data, val_data, source: str = "member", per_class: int = 3,
                     ranks=(1, 2, 3), progress: bool = False, val=None) -> dict:
    """Phase 2: build the embedder (`source`, see `embed.make_embedder`), fit class prototypes on
    `proto_data` (training cells), choose the rank on `val_data` and store it in the bundle.

    The rank is chosen with the proposing phases (1 and 3, where fitted) switched on, because those
    are the switches it vets; it is enabled only if it raises validation macro-F1 over the phases as
    enabled.
    """
    from ... import metrics
    from ...data.datasets import load_labelled
    from ..preprocess import Preprocessor
    from .embed import Embedder, fit_prototypes, make_embedder

    k = range(len(bundle.classes))
    onnx_name, proto_name = f"{VERIFY_DIR}/embed.onnx", f"{VERIFY_DIR}/prototypes.npz"
    with tempfile.TemporaryDirectory() as tmp:
        spec = make_embedder(bundle, source, bundle.path(onnx_name), Path(tmp))
    xp, yp = load_labelled(proto_data, bundle.classes, Preprocessor.for_bundle(bundle), progress)[:2]
    with Embedder(bundle.path(onnx_name), spec) as emb:
        protos, owners = fit_prototypes(emb(xp), yp, len(bundle.classes), per_class)
    np.savez(bundle.path(proto_name), prototypes=protos, owners=owners)

    xv, yv, probs = calibrated_validation(bundle, val_data, val, progress)
    refine = {k_: v for k_, v in bundle.extra.get("refine", {}).items() if k_ != "verify"}
    forced = {name: {**cfg, "enabled": True} for name, cfg in refine.items()}
    priors = bundle.extra.get("class_priors")
    verify = {"onnx": onnx_name, "prototypes": proto_name, "spec": spec.to_dict(), "per_class": per_class,
              "n_prototypes": int(len(protos)), "direction": "rarer",
              "priors": [float(priors[c]) for c in bundle.classes] if priors else None,
              "fitted_on": str(proto_data), "n_fit": int(len(yp)), "checked_on": str(val_data), "n_val": int(len(yv))}

    def score(config, rank=None):
        cfg = {**config, **({"verify": {**verify, "enabled": True, "rank": rank}} if rank else {})}
        refiner = Refiner(cfg, bundle.classes, bundle.root)
        pred, changes = refiner(probs, xv)
        refiner.close()
        vetoed = sum(any(c["phase"] == "verify" for c in ch) for ch in changes)
        return metrics.macro_f1(yv, pred, k), vetoed

    forced_none = score(forced)[0]
    by_rank = {r: score(forced, r) for r in ranks}
    rank = max(ranks, key=lambda r: (by_rank[r][0], -r))
    before, after = score(refine)[0], score(refine, rank)[0]
    verify.update(rank=rank, enabled=after > before, val_macro_f1_before=before, val_macro_f1_after=after,
                  val_macro_f1_proposers_on=forced_none,
                  by_rank={str(r): {"val_macro_f1_proposers_on": f, "vetoed": v} for r, (f, v) in by_rank.items()})
    bundle.extra.setdefault("refine", {})["verify"] = verify
    bundle.save()
    return json.loads(json.dumps({k_: v for k_, v in verify.items() if k_ != "priors"}))


PHASES = ("boost", "verify", "morphology")


def select_phases(bundle, val_data, progress: bool = False, val=None) -> dict:
    """Enable the subset of the fitted phases that scores best on the validation cells phase 1 was not
    fitted on (ties: fewer phases). Phases are fitted one at a time; they interact (phase 2 only
    vets what 1 and 3 propose), so the final on/off choice is made jointly."""
    from itertools import combinations

    from ... import metrics

    refine = bundle.extra.get("refine", {})
    fitted = [p for p in PHASES if p in refine]
    x, y, probs = calibrated_validation(bundle, val_data, val, progress)
    check = ~fit_half(y) if "boost" in fitted else np.ones(len(y), bool)
    x, y, probs = x[check], y[check], probs[check]
    scores = {}
    for n in range(len(fitted) + 1):
        for subset in combinations(fitted, n):
            if subset == ("verify",):
                continue  # vets switches, proposes none: the same as no refinement
            cfg = {p: {**refine[p], "enabled": p in subset} for p in fitted}
            refiner = Refiner(cfg, bundle.classes, bundle.root)
            pred = refiner(probs, x)[0] if subset else probs.argmax(1)
            refiner.close()
            scores["+".join(subset) or "none"] = metrics.macro_f1(y, pred, range(len(bundle.classes)))
    best = max(scores, key=lambda k: (round(scores[k], 9), -len(k.split("+")) if k != "none" else 1))
    for p in fitted:
        refine[p]["enabled"] = p in best.split("+")
    refine["selection"] = {"checked_on": str(val_data), "n_check": int(len(y)), "macro_f1": scores, "chosen": best}
    bundle.save()
    return refine["selection"]

"""`wbc-edge adapt`: calibrate a bundle to a new site on its unlabelled cells, optionally tune the head on a
handful of labelled ones, and write the result as a new bundle (the source bundle is never changed).

1. AdaBN (Li et al. 2016): every BatchNorm's running mean/variance is re-estimated on the site's cells,
   pooled over the whole site. Not per patient or slide: per-slide statistics absorb that slide's class
   mix (a slide full of neutrophils is "normalised away") and measured worse.
2. The site's Macenko stain reference is fitted and recorded (`adapt.stain_reference`).
3. With labels (at most MAX_SHOTS per class), only the classifier head is refitted, on the adapted
   backbone's cached pre-logit features; classes without labels keep their rows.

Each member is then exported exactly as the trainer exports it (safetensors + deployable ONNX), so the
new bundle runs without torch. Artifacts built from the old graphs (INT8, TensorRT engines, the fused
ensemble graph) are stale and left out; `wbc-edge build` makes them again.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from .._optional import require
from ..bundle import Bundle, BundleError, read_manifest
from ..data.datasets import CellDataset, LoadError, Sample, open_dataset
from ..edge.preprocess import Preprocessor
from ..outdir import LOCK_NAME, owns_output
from ..taxonomy import FIVE_PART

log = logging.getLogger("wbc_edge.adapt")

MAX_SHOTS = 20  # beyond a few-shot handful, train a model on the site's cells instead
# A 5-part lab's NE is a neutrophil of unstated maturity; most are segmented, so it teaches the model's
# mature class. Every other part (LY, MO, EO, BA) is a model class of the same name.
MATURE = {"NE": "SNE"}
# few-shot head fit: full batch (the data is small), a little weight decay. Chosen by 5-fold CV inside 100
# labelled Chula training cells (lr 1e-3 underfits: CV accuracy 0.55 vs 0.71 at 1e-2; weight decay 1e-2: 0.54)
HEAD_STEPS, HEAD_LR, HEAD_WEIGHT_DECAY = 300, 1e-2, 1e-4


@dataclass
class SiteCells:
    """A site's cells through the bundle's preprocessor: `x` is model input (stain step applied), `raw`
    the same canonical cells before the stain step (what a stain reference is fitted on)."""
    source: str
    x: np.ndarray
    raw: np.ndarray
    labels: list = field(default_factory=list)  # per kept cell, the dataset's label (may be None)
    errors: list[LoadError] = field(default_factory=list)


def read_cells(bundle: Bundle, ds: CellDataset, source, pixel_size=None,
               same_scale: bool = True) -> SiteCells:
    """Read and prepare `ds` with the bundle's preprocessor, keeping the cells before its stain step too."""
    pre = Preprocessor.for_bundle(bundle, pixel_size, same_scale)
    reference, pre.stain_ref = pre.stain_ref, None  # the stain step runs once, below, on the same cells
    raw, kept, errors, _ = pre.load(ds)
    pre.stain_ref = reference
    for e in errors:
        log.warning("skipping unreadable image %s: %s", e.path, e.reason)
    return SiteCells(str(source), pre.stain(raw), raw, [ds.samples[i].label for i in kept], errors)


# ---- AdaBN -------------------------------------------------------------------------------------------
def bn_layers(model) -> list:
    torch = require("torch", "train")
    return [m for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def bn_state(model) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(m.running_mean.numpy().copy(), m.running_var.numpy().copy()) for m in bn_layers(model)]


def reestimate_bn(model, x: np.ndarray, mean, std, batch_size: int = 64, seed: int = 0):
    """Recompute every BatchNorm's running statistics on `x` (uint8 model input), in place.

    Only the BN layers run in train mode (dropout and drop-path stay off), with momentum=None: a
    cumulative average over the batches. Batches are a shuffled, near-equal split of the whole site, so
    each is a sample of the site's class mix and the average of their variances is the pooled one."""
    torch = require("torch", "train")
    from ..trainer.loop import to_model_input

    if len(x) < 2:
        raise ValueError(f"BatchNorm statistics need at least 2 cells, got {len(x)}")
    layers = bn_layers(model)
    model.eval()
    if not layers:  # per-cell normalisation (GroupNorm members): no site statistics to re-estimate
        return model
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    order = np.random.default_rng(seed).permutation(len(x))
    with torch.no_grad():
        for idx in np.array_split(order, -(-len(x) // batch_size)):
            model(to_model_input(x[np.sort(idx)], mean, std, torch))
    return model.eval()


def bn_shift(before: list, after: list) -> dict:
    """How far the statistics moved: mean |change| of the running means (raw, and in units of the old
    standard deviation) and mean |log ratio| of the running variances, over all BN channels."""
    if not before:
        return {"bn_layers": 0}
    mb, vb = (np.concatenate([s[k] for s in before]) for k in (0, 1))
    ma, va = (np.concatenate([s[k] for s in after]) for k in (0, 1))
    eps = 1e-5
    return {"bn_layers": len(before), "bn_channels": int(len(mb)),
            "mean_abs_change": float(np.abs(ma - mb).mean()),
            "mean_abs_change_in_sd": float((np.abs(ma - mb) / np.sqrt(vb + eps)).mean()),
            "var_abs_log_ratio": float(np.abs(np.log((va + eps) / (vb + eps))).mean())}


# ---- what the site's cells get ---------------------------------------------------------------------
def prediction_summary(bundle: Bundle, x: np.ndarray) -> dict:
    """The bundle's classifier (runtime graphs, TTA, temperature) on the site's cells: mean top-1
    probability, mean per-cell entropy, entropy (bits) of the predicted-class mix, predicted counts."""
    from ..edge.classifier import EnsembleClassifier

    with EnsembleClassifier(bundle) as clf:
        p = clf.predict(x).astype(np.float64)
    pred = p.argmax(1)
    n = np.bincount(pred, minlength=len(bundle.classes))
    mix = n / max(len(pred), 1)
    counts = {bundle.classes[i]: int(c) for i, c in enumerate(n) if c}
    return {"mean_max_prob": float(p.max(1).mean()),
            "mean_entropy": float(-(p * np.log2(np.clip(p, 1e-12, 1))).sum(1).mean()),
            "predicted_class_entropy": float(-(mix[mix > 0] * np.log2(mix[mix > 0])).sum()) + 0.0,  # not -0.0
            "predicted": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}


# ---- few-shot labels -------------------------------------------------------------------------------
def model_class(label, classes) -> str | None:
    """The model class a label teaches: itself, or for a 5-part code the model lacks, its mature class."""
    if label in classes:
        return label
    fine = MATURE.get(label)
    return fine if fine in classes and FIVE_PART.get(fine) == label else None


def labelled_dataset(source, classes) -> tuple[CellDataset, dict]:
    """The labelled cells whose label maps to a model class (relabelled to it), checked against MAX_SHOTS
    before any image is read; labels with no model class are listed in the report, never silently lost."""
    ds = open_dataset(source)
    mapped = [model_class(s.label, classes) for s in ds.samples]
    skipped: dict[str, int] = {k: len(v) for k, v in ds.skipped.items()}
    for s, c in zip(ds.samples, mapped):
        if c is None:
            skipped[str(s.label)] = skipped.get(str(s.label), 0) + 1
    keep = [i for i, c in enumerate(mapped) if c is not None]
    counts = {c: mapped.count(c) for c in classes if c in mapped}
    over = {c: n for c, n in counts.items() if n > MAX_SHOTS}
    if over:
        raise ValueError(f"{source}: --labels is few-shot, at most {MAX_SHOTS} labelled cells per class; got "
                         f"{', '.join(f'{c} {n}' for c, n in over.items())}. Pass a subset "
                         "(or train on them).")
    if not keep:
        raise ValueError(f"{source}: no label maps to a model class ({', '.join(classes)}); "
                         f"labels: {skipped}")
    if skipped:
        log.warning("%s: labels with no model class, skipped: %s", source, skipped)
    sub = CellDataset([Sample(ds.samples[i].path, mapped[i], ds.samples[i].group) for i in keep], ds.root,
                      list(counts))
    return sub, {"labels": str(source), "per_class": counts, "skipped_labels": skipped,
                 "mapped": {k: v for k, v in MATURE.items() if k in {s.label for s in ds.samples}}}


def pre_logits(model, x: np.ndarray, mean, std):
    """The features the classifier head reads (timm: forward_features + forward_head(pre_logits=True))."""
    torch = require("torch", "train")
    from ..trainer.loop import to_model_input

    model.eval()
    with torch.no_grad():
        inputs = to_model_input(x, mean, std, torch)
        feats = model.forward_head(model.forward_features(inputs), pre_logits=True)
        head = model.get_classifier()
        if not isinstance(head, torch.nn.Linear) or not torch.allclose(head(feats[:8]), model(inputs[:8]),
                                                                       atol=1e-4):
            raise NotImplementedError(f"{type(model).__name__}: its head is not one Linear layer on the "
                                      "pre-logit features; few-shot head fitting does not support it")
    return feats


def fit_head(model, feats, y: np.ndarray, steps: int = HEAD_STEPS, lr: float = HEAD_LR,
             weight_decay: float = HEAD_WEIGHT_DECAY) -> dict:
    """Refit the head rows of the labelled classes on cached features (full-batch Adam from the current
    rows, class-balanced cross-entropy over all classes); the other rows are kept as they are."""
    torch = require("torch", "train")
    head = model.get_classifier()
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    rows = torch.as_tensor(np.unique(y))
    w, b = w0[rows].clone().requires_grad_(), b0[rows].clone().requires_grad_()
    yt = torch.as_tensor(y)
    counts = torch.bincount(yt, minlength=len(w0)).float()
    balance = torch.where(counts > 0, counts.sum() / counts.clamp(min=1) / len(rows), torch.zeros(()))
    logits = lambda: (feats @ w0.T + b0).index_copy(1, rows, feats @ w.T + b)  # noqa: E731
    acc_before = float((logits().argmax(1) == yt).float().mean())
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(logits(), yt, weight=balance)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        head.weight[rows], head.bias[rows] = w, b
        acc_after = float((logits().argmax(1) == yt).float().mean())
    return {"n": int(len(y)), "rows": [int(r) for r in rows], "steps": steps, "lr": lr,
            "weight_decay": weight_decay, "final_loss": loss.item(), "train_accuracy_before": acc_before,
            "train_accuracy_after": acc_after,
            "weight_change": float((head.weight.detach() - w0).norm() / w0.norm())}


def fit_labelled_head(model, bundle: Bundle, shots: SiteCells, steps: int = HEAD_STEPS) -> dict:
    """`fit_head` on the labelled cells seen through the bundle's TTA views (what its runtime averages)."""
    from ..edge import tta

    views = bundle.extra.get("tta", {}).get("views", ["id"])
    y = np.asarray([bundle.classes.index(label) for label in shots.labels], np.int64)
    feats = pre_logits(model, tta.expand(shots.x, views), bundle.preprocess.mean, bundle.preprocess.std)
    return {"views": list(views), **fit_head(model, feats, np.tile(y, len(views)), steps)}


# ---- the new bundle --------------------------------------------------------------------------------
def stale_files(bundle: Bundle) -> set[str]:
    """Files built from the old member graphs: INT8 graphs, engines, the fused ensemble graph."""
    fused = bundle.extra.get("fused", {})
    built = {f for m in bundle.members for f in m.artifacts.values()} | set(fused.get("artifacts", {}).values())
    return built | ({fused["onnx"]} if fused.get("onnx") else set()) | {"engines"}


def copy_bundle(bundle: Bundle, out) -> tuple[Bundle, list[str]]:
    """A copy of `bundle` in `out` without its stale artifacts (and without their manifest entries)
    -> (the copy, not yet saved; what was dropped)."""
    out, src = Path(out), bundle.root.resolve()
    if out.resolve() == src:
        raise ValueError(f"{out}: adapt writes a new bundle; --out must not be the source bundle")
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; choose a new --out directory")
    stale = stale_files(bundle)
    shutil.copytree(src, out, dirs_exist_ok=True,
                    ignore=lambda d, names: [n for n in names if os.path.relpath(Path(d) / n, src) in stale])
    new = Bundle.load(out, verify=False)  # the copied checksums still name the stale files
    dropped = [f"{m.name}:{k}" for m in new.members for k in m.artifacts]
    for m in new.members:
        m.artifacts = {}
    dropped += [k for k in ("fused", "calibration", "parity") if new.extra.pop(k, None) is not None]
    return new, dropped


def adapt_member(src: Bundle, new: Bundle, i: int, site: SiteCells, shots: SiteCells | None,
                 batch_size: int, seed: int, head_steps: int) -> dict:
    """AdaBN (+ the few-shot head) for member `i`, exported into `new` as the trainer exports members."""
    from ..trainer.checkpoint import load_member
    from ..trainer.loop import export_member_files

    pp, m = src.preprocess, new.members[i]
    model = load_member(src, i)
    before = bn_state(model)
    reestimate_bn(model, site.x, pp.mean, pp.std, batch_size, seed)
    record = {"member": m.name, **bn_shift(before, bn_state(model))}
    if not before:
        log.warning("member %s (%s) has no BatchNorm layers: no statistics to re-estimate (it normalises "
                    "each cell by itself)", m.name, m.arch)
    if shots is not None:
        record["head"] = fit_labelled_head(model, src, shots, head_steps)
    exported = export_member_files(new.root, model, m.name, m.arch, new.classes, pp, m.fold)
    for old, now in ((m.weights, exported.weights), (m.onnx, exported.onnx)):
        if old and old != now:  # a copied file no manifest entry names any more
            new.path(old).unlink(missing_ok=True)
    m.weights, m.onnx = exported.weights, exported.onnx
    return record


def site_stain_reference(site: SiteCells) -> dict:
    """The site's Macenko reference, recorded only. The bundle's `stain.reference` is what its model was
    trained to see: a normalising bundle keeps normalising the site's cells to it (replacing it with the
    site's own would undo the normalisation), and a non-normalising one describes its training set."""
    from ..edge.stain import fit_reference

    try:
        return fit_reference(site.raw).to_dict()
    except ValueError as exc:  # pale or unstained crops: nothing to fit, adaptation itself still holds
        log.warning("%s: no stain reference fitted: %s", site.source, exc)
        return {"error": str(exc)}


def provenance(src: Bundle, new: Bundle, site: SiteCells, members: list, dropped: list, parity: list,
               scale_per: str, pixel_size) -> dict:
    """The new bundle's `adapt` section: where it came from, on what, and what changed on the site's cells."""
    return {
        "source_bundle": str(src.root.resolve()), "source_created": read_manifest(src.root).get("created"),
        "cells": {"path": site.source, "n": int(len(site.x)),
                  "unreadable": [e.__dict__ for e in site.errors]},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wbc_edge_version": __version__,
        "method": "AdaBN: BatchNorm running statistics re-estimated on the site's cells, pooled over it",
        "scale_per": scale_per, "pixel_size": pixel_size, "members": members,
        "predictions_before": prediction_summary(src, site.x),
        "predictions_after": prediction_summary(new, site.x),
        "stain_reference": site_stain_reference(site), "stain_reference_replaced": False,
        "dropped": dropped, "parity": parity,
        "kept": "confidence temperature, refinement and class priors were fitted before adaptation",
        **({"previous": src.extra["adapt"]} if "adapt" in src.extra else {}),
    }


@owns_output("out")
def adapt(bundle_dir, cells, out, labels=None, pixel_size: float | None = None, scale_per: str = "slide",
          batch_size: int = 64, seed: int = 0, head_steps: int = HEAD_STEPS) -> Bundle:
    """Write `out`: the bundle in `bundle_dir` adapted to the site of `cells` (and `labels`, few-shot)."""
    require("torch", "train")
    from ..build.parity import torch_vs_ort

    src = Bundle.load(bundle_dir)
    few = labelled_dataset(labels, src.classes) if labels else None  # refused before any work
    same_scale = scale_per == "slide"
    site = read_cells(src, open_dataset(cells), cells, pixel_size, same_scale)
    if len(site.x) < 2:
        e = site.errors
        why = f" ({len(e)} unreadable, e.g. {e[0].path}: {e[0].reason})" if e else ""
        raise ValueError(f"{cells}: {len(site.x)} readable cell(s){why}; adaptation needs the site's cells")
    shots = read_cells(src, few[0], labels, pixel_size, same_scale) if few else None
    new, dropped = copy_bundle(src, out)
    if dropped:
        log.warning("left out of %s (built from the old graphs, stale now): %s; rebuild them with "
                    "`wbc-edge build %s --target ...`", out, ", ".join(dropped), out)
    members = [adapt_member(src, new, i, site, shots, batch_size, seed, head_steps)
               for i in range(len(src.members))]
    parity = torch_vs_ort(new, site.x[:16])  # the saved weights reloaded vs the new graphs
    new.extra["adapt"] = provenance(src, new, site, members, dropped, parity, scale_per, pixel_size)
    if few:
        new.extra["adapt"]["few_shot"] = {**few[1], "n": int(len(shots.x)),
                                          "unreadable": [e.__dict__ for e in shots.errors]}
    new.save()
    if not all(p["ok"] for p in parity):
        raise BundleError(f"{out}: exported graphs disagree with their PyTorch members: {parity}")
    from ..edge.drift import fit_site

    fit_site(new, cells)  # the drift monitor now compares this site with itself, not with the training lab
    return new

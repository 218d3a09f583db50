"""The training loop: data -> member -> epochs -> best checkpoint -> ONNX -> bundle.

Kept as small composable steps (prepare_data, fit, write_bundle) so later recipes (decoupled
two-stage, k-fold ensembles) reuse them rather than replace them.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .._optional import require
from ..bundle import Bundle, Member, Preprocess
from ..data.datasets import CellDataset, open_dataset
from ..data.splits import train_val_split
from ..taxonomy import WBC_CODES
from . import augment
from .config import TrainConfig
from .members import MEMBERS, create_member, member_preprocess
from .samplers import SAMPLERS

log = logging.getLogger("wbc_edge.trainer")


@dataclass
class Prepared:
    classes: list[str]
    x_train: np.ndarray  # uint8 NxSxSx3
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    val_paths: list[str]
    errors: list  # LoadError rows: unreadable files, reported, never silently dropped


def select_dataset(cfg: TrainConfig) -> CellDataset:
    ds = open_dataset(cfg.data)
    classes = cfg.classes or [c for c in ds.classes if c in WBC_CODES]
    ds = ds.filter_classes(classes)
    if cfg.exclude_from:
        names = {p.name for p in Path(cfg.exclude_from).rglob("*") if p.is_file()}
        ds = ds.exclude_names(names)
    if cfg.max_per_class:
        rng = np.random.default_rng(cfg.seed)
        labels = np.asarray(ds.labels)
        keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:cfg.max_per_class] for c in classes])
        ds = ds.subset(np.sort(keep))
    if not len(ds):
        raise ValueError(f"{cfg.data}: no images of classes {classes}")
    return ds


def prepare_data(cfg: TrainConfig, input_size: int) -> Prepared:
    ds = select_dataset(cfg)
    classes = list(ds.classes)
    y = np.asarray([classes.index(s.label) for s in ds.samples])
    groups = [s.group for s in ds.samples]
    tr, va = train_val_split(y, cfg.val_fraction, cfg.seed, groups)
    x_tr, kept_tr, err_tr = ds.subset(tr).load(input_size, progress=cfg.progress)
    x_va, kept_va, err_va = ds.subset(va).load(input_size, progress=cfg.progress)
    for e in err_tr + err_va:
        log.warning("skipping unreadable image %s: %s", e.path, e.reason)
    return Prepared(classes, x_tr, y[tr][kept_tr], x_va, y[va][kept_va],
                    [ds.samples[i].path for i in va[kept_va]], err_tr + err_va)


def to_model_input(batch_u8: np.ndarray, mean, std, torch, gen=None, jitter: float = 0.0):
    """uint8 NHWC -> normalised float NCHW, with D4 + colour jitter when `gen` is given (training)."""
    x = torch.from_numpy(batch_u8).permute(0, 3, 1, 2).float().div_(255.0)
    if gen is not None:
        x = augment.random_d4(x, gen)
        if jitter:
            x = augment.colour_jitter(x, gen, jitter)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def predict_torch(model, x_u8: np.ndarray, mean, std, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities of `model` on a uint8 batch, eval mode, no augmentation."""
    torch = require("torch", "train")
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x_u8), batch_size):
            out.append(torch.softmax(model(to_model_input(x_u8[i:i + batch_size], mean, std, torch)), 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + np.cos(np.pi * t))


def fit(model, data: Prepared, cfg: TrainConfig, mean, std, hooks=(), log_path: Path | None = None):
    """Train `model` with instance-balanced sampling and cross-entropy; returns (best_state, history)."""
    torch = require("torch", "train")
    from .. import metrics

    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(data.y_train) // cfg.batch_size)
    total, warmup = steps_per_epoch * cfg.epochs, int(steps_per_epoch * cfg.warmup_epochs)
    best, best_state, history, step = -1.0, None, [], 0
    for epoch in range(cfg.epochs):
        model.train()
        order = SAMPLERS["instance"](data.y_train, rng)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not cfg.progress)
        losses, t0 = [], time.perf_counter()
        for b in bar:
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            xb = augment.apply_uint8_hooks(data.x_train[idx], list(hooks), rng)
            x = to_model_input(xb, mean, std, torch, gen, cfg.colour_jitter)
            y = torch.from_numpy(data.y_train[idx])
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, cfg.lr)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        probs = predict_torch(model, data.x_val, mean, std)
        rep = metrics.classification_report(data.y_val, probs.argmax(1), list(range(len(data.classes))))
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_macro_f1": rep["macro_f1"],
               "val_balanced_accuracy": rep["balanced_accuracy"], "seconds": time.perf_counter() - t0,
               "images_per_s": steps_per_epoch * cfg.batch_size / (time.perf_counter() - t0)}
        history.append(row)
        log.info("epoch %d: %s", epoch + 1, json.dumps(row))
        if log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if rep["macro_f1"] > best:
            best = rep["macro_f1"]
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return best_state, history


def plot_learning_curve(history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(ep, [h["val_macro_f1"] for h in history], "s-", color="tab:orange", label="val macro-F1")
    ax2.set_ylabel("macro-F1")
    ax2.set_ylim(0, 1)
    fig.legend(loc="lower center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def train(cfg: TrainConfig) -> Bundle:
    """Train one member per the config and write a complete bundle (weights, ONNX, manifest)."""
    torch = require("torch", "train")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    size = cfg.input_size or MEMBERS[cfg.member]["input_size"]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = prepare_data(cfg, size)
    model = create_member(cfg.member, len(data.classes), cfg.pretrained, cfg.pretrained_file)
    mean, std = member_preprocess(model)
    (out / "train_log.jsonl").unlink(missing_ok=True)
    best_state, history = fit(model, data, cfg, mean, std, log_path=out / "train_log.jsonl")
    model.load_state_dict(best_state)
    summary = {"config": cfg.to_dict(), "history": history, "seconds": time.perf_counter() - t0,
               "n_train": int(len(data.y_train)), "n_val": int(len(data.y_val)),
               "unreadable": [e.__dict__ for e in data.errors],
               "best_val_macro_f1": max(h["val_macro_f1"] for h in history)}
    plot_learning_curve(history, out / "learning_curve.png")
    (out / "val_split.txt").write_text("\n".join(data.val_paths) + "\n")
    priors = np.bincount(data.y_train, minlength=len(data.classes)) / len(data.y_train)
    return write_bundle(out, model, cfg.member, data.classes, Preprocess(size, mean, std),
                        extra={"tta": {"views": list(cfg.tta_views)}, "training": summary,
                               "class_priors": dict(zip(data.classes, map(float, priors)))})


def write_bundle(out: Path, model, arch: str, classes, pp: Preprocess, extra: dict, name: str = "m0") -> Bundle:
    """Save weights (safetensors), export + surgery to a deployable ONNX, write the manifest."""
    from ..build.export import export_member
    from ..build.surgery import build_member_graph
    from .checkpoint import save_weights

    save_weights(model, out / f"{name}.safetensors")
    raw = export_member(model, out / f"{name}.raw.onnx", pp.input_size)
    build_member_graph(raw, out / f"{name}.onnx", pp.mean, pp.std,
                       {"classes": classes, "preprocess": pp.to_dict(), "member": name, "arch": arch})
    member = Member(name=name, arch=arch, weights=f"{name}.safetensors", onnx=f"{name}.onnx",
                    artifacts={"raw-onnx": f"{name}.raw.onnx"})
    bundle = Bundle(out, list(classes), pp, [member], extra)
    bundle.save()
    return bundle

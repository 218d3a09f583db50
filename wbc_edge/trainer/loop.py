"""The training loop: data -> members (recipes of one or two stages) -> checkpoints -> ONNX -> bundle.

Built from small steps (load_pool, recipe_stages, run_epochs, export_member_files) so recipes,
k-fold ensembles and resume share one loop.
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
from ..edge.quality import bundle_quality
from ..bundle import Bundle, Member, Preprocess
from ..data.datasets import open_dataset
from ..data.splits import kfold_indices, train_val_split
from ..taxonomy import WBC_CODES
from . import augment
from .checkpoint import load_checkpoint, save_checkpoint, save_weights
from .config import TrainConfig
from .members import MEMBERS, create_member, member_preprocess
from .samplers import SAMPLERS

log = logging.getLogger("wbc_edge.trainer")
RECIPES = ("ce", "decoupled", "focal-logw", "ldam-drw", "logit-adjust", "tau-norm")


@dataclass
class Pool:
    """Labelled images loaded once (uint8 NxSxSx3, canonical cells) and shared by every fold and member."""
    classes: list[str]
    x: np.ndarray
    y: np.ndarray
    paths: list[str]
    groups: list
    errors: list  # LoadError rows: unreadable files, reported, never silently dropped
    scale: dict | None = None  # the training images' physical scale (the bundle's `scale` section)

    def take(self, idx) -> tuple[np.ndarray, np.ndarray]:
        return self.x[idx], self.y[idx]


def select_dataset(source, cfg: TrainConfig, classes=None, exclude: bool = True):
    ds = open_dataset(source)
    classes = classes or cfg.classes or [c for c in ds.classes if c in WBC_CODES]
    ds = ds.filter_classes(classes)
    if exclude and cfg.exclude_from:
        ds = ds.exclude_names(held_out_names(cfg))
    if cfg.max_per_class:
        rng = np.random.default_rng(cfg.seed)
        labels = np.asarray(ds.labels)
        keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:cfg.max_per_class] for c in classes])
        ds = ds.subset(np.sort(keep))
    if not len(ds):
        raise ValueError(f"{source}: no images of classes {classes}")
    return ds


def held_out_names(cfg: TrainConfig) -> set[str]:
    """File names under `exclude_from`: cells kept unseen (e.g. the repo's sample cells)."""
    return {p.name for p in Path(cfg.exclude_from).rglob("*") if p.is_file()} if cfg.exclude_from else set()


def write_split_manifests(out: Path, pool: Pool, train_idx, val_idx) -> None:
    """train_split.csv / val_split.csv (path,label): the cells each member saw and the held-out ones,
    as manifests that `wbc-edge refine`, `build --calib/--val` and the benchmarks read directly. Paths
    are relative to the manifest's folder, as manifests are read."""
    from ..data.datasets import write_manifest

    base = Path(out).resolve()
    for name, idx in (("train_split.csv", train_idx), ("val_split.csv", val_idx)):
        write_manifest(out / name, ((os.path.relpath(Path(pool.paths[i]).resolve(), base), pool.classes[pool.y[i]])
                                    for i in idx))


def load_pool(source, cfg: TrainConfig, size: int, classes=None, scale: dict | None = None) -> Pool:
    """Read the cells at native size, measure their scale (unless given: a validation set is met at the
    training scale), and make them canonical cells with the same Preprocessor the runtime uses. The
    training set shares one magnification, so its cells are taken at exactly the measured scale."""
    from ..edge.preprocess import Preprocessor
    from ..edge.quality import ImpulseGuard
    from ..edge.scale import RBC_UM, measure_training_scale

    ds = select_dataset(source, cfg, classes)
    classes = list(ds.classes)
    images, kept, errors = ds.load(progress=cfg.progress)
    for e in errors:
        log.warning("skipping unreadable image %s: %s", e.path, e.reason)
    if not images:
        raise ValueError(f"{source}: none of the images could be read")
    scale = scale or measure_training_scale(images)
    pre = Preprocessor(size, "area", scale, guard=ImpulseGuard(bundle_quality()["impulse_threshold"]),
                       pixel_size=RBC_UM / scale["rbc_px"])
    x = pre.crops(images).batch
    y = np.asarray([classes.index(ds.samples[i].label) for i in kept], np.int64)
    return Pool(classes, x, y, [ds.samples[i].path for i in kept], [ds.samples[i].group for i in kept], errors,
                scale)


def to_model_input(batch_u8: np.ndarray, mean, std, torch, gen=None, jitter: float = 0.0):
    """uint8 NHWC -> normalised float NCHW, with D4 + colour jitter when `gen` is given (training)."""
    x = torch.from_numpy(np.ascontiguousarray(batch_u8)).permute(0, 3, 1, 2).float().div_(255.0)
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


@dataclass
class Stage:
    name: str
    epochs: int
    lr: float
    sampler: str  # key of SAMPLERS
    loss: object  # torch module: loss(logits, targets)
    frozen_backbone: bool = False
    drw_from: int | None = None  # LDAM-DRW: epoch from which class weights switch on
    drw_weights: np.ndarray | None = None


def recipe_stages(cfg: TrainConfig, counts: np.ndarray) -> list[Stage]:
    from . import losses as L

    if cfg.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {cfg.recipe!r}; choose from {', '.join(RECIPES)}")
    ce = L.FocalLoss(gamma=0.0)
    s1 = Stage("representation", cfg.epochs, cfg.lr, "instance", ce)
    if cfg.recipe in ("ce", "tau-norm"):
        return [s1]
    if cfg.recipe == "decoupled":
        hybrid = L.FocalLoss(L.effective_number_weights(counts, cfg.cb_beta), cfg.focal_gamma)
        return [s1, Stage("classifier", cfg.stage2_epochs, cfg.stage2_lr, "class", hybrid, frozen_backbone=True)]
    if cfg.recipe == "focal-logw":
        return [Stage("focal-logw", cfg.epochs, cfg.lr, "class", L.FocalLoss(L.inverse_log_weights(counts),
                                                                            cfg.focal_gamma))]
    if cfg.recipe == "ldam-drw":
        return [Stage("ldam-drw", cfg.epochs, cfg.lr, "instance", L.LDAMLoss(counts, cfg.ldam_max_margin),
                      drw_from=int(cfg.drw_start * cfg.epochs),
                      drw_weights=L.effective_number_weights(counts, cfg.cb_beta))]
    return [Stage("logit-adjust", cfg.epochs, cfg.lr, "instance", L.LogitAdjustedLoss(counts / counts.sum(),
                                                                                     cfg.la_tau))]


def enter_stage(model, stage: Stage, cfg: TrainConfig, n_classes: int):
    """Set up trainable parameters for `stage` and return its optimiser."""
    torch = require("torch", "train")
    if not stage.frozen_backbone:
        return torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=cfg.weight_decay)
    # Decoupled stage 2: the backbone is frozen *including BatchNorm statistics* (eval mode, no grad);
    # only a freshly initialised classifier learns.
    for p in model.parameters():
        p.requires_grad_(False)
    model.reset_classifier(n_classes)
    head = model.get_classifier()
    for p in head.parameters():
        p.requires_grad_(True)
    return torch.optim.AdamW(head.parameters(), lr=stage.lr, weight_decay=cfg.weight_decay)


def forward(model, x, stage: Stage):
    if not stage.frozen_backbone:
        model.train()
        return model(x)
    torch = require("torch", "train")
    model.eval()  # BatchNorm running statistics stay exactly as stage 1 left them
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    return model.get_classifier()(feats)


def run_epoch(model, stage: Stage, opt, train, ctx, epoch: int) -> list[float]:
    torch = require("torch", "train")
    cfg, gen, rng, mean, std = ctx["cfg"], ctx["gen"], ctx["rng"], ctx["mean"], ctx["std"]
    x_tr, y_tr = train
    if stage.drw_from is not None and epoch >= stage.drw_from:
        stage.loss.set_weights(stage.drw_weights)
    order = SAMPLERS[stage.sampler](y_tr, rng)
    steps = max(1, len(order) // cfg.batch_size)
    total, warmup = steps * stage.epochs, int(steps * cfg.warmup_epochs)
    bar = tqdm(range(steps), desc=f"{ctx['name']} {stage.name} {epoch + 1}/{stage.epochs}", unit="batch",
               disable=not cfg.progress, leave=False)
    losses = []
    for b in bar:
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        xb = augment.apply_uint8_hooks(x_tr[idx], ctx["hooks"], rng)
        x = to_model_input(xb, mean, std, torch, gen, cfg.colour_jitter)
        for g in opt.param_groups:
            g["lr"] = lr_at(epoch * steps + b, total, warmup, stage.lr)
        loss = stage.loss(forward(model, x, stage), torch.from_numpy(y_tr[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
    return losses


def validate(model, val, ctx) -> dict:
    from .. import metrics

    probs = predict_torch(model, val[0], ctx["mean"], ctx["std"])
    rep = metrics.classification_report(val[1], probs.argmax(1), list(range(ctx["n_classes"])))
    return {"val_macro_f1": rep["macro_f1"], "val_balanced_accuracy": rep["balanced_accuracy"]}


def run_stages(model, stages: list[Stage], train, val, ctx, ckpt: Path) -> tuple[list[dict], dict | None]:
    """Every epoch of every stage, checkpointed after each epoch; returns (history, best state)."""
    plan = [(si, e) for si, st in enumerate(stages) for e in range(st.epochs)]
    history, best, best_state, start, opt = [], -1.0, None, 0, None
    if ctx["cfg"].resume and ckpt.with_suffix(".json").exists():
        si = json.loads(ckpt.with_suffix(".json").read_text())["stage"]
        for prior in range(si + 1):  # re-enter the stages already begun (freezing is structural)
            opt = enter_stage(model, stages[prior], ctx["cfg"], ctx["n_classes"])
        meta, best_state = load_checkpoint(ckpt, model, opt, ctx["gen"], ctx["rng"])
        history, best, start = meta["history"], meta["best"], meta["next"]
        log.info("%s: resumed at epoch %d of %d", ctx["name"], start, len(plan))
    for pos in range(start, len(plan)):
        si, e = plan[pos]
        if e == 0:
            if si > 0 and best_state is not None:  # a later stage builds on the previous stage's kept state
                model.load_state_dict(best_state)
            opt, best = enter_stage(model, stages[si], ctx["cfg"], ctx["n_classes"]), -1.0
        t0 = time.perf_counter()
        losses = run_epoch(model, stages[si], opt, train, ctx, e)
        row = {"member": ctx["name"], "stage": stages[si].name, "epoch": e + 1, "train_loss": float(np.mean(losses)),
               **(validate(model, val, ctx) if val is not None else {}), "seconds": time.perf_counter() - t0}
        row["images_per_s"] = len(losses) * ctx["cfg"].batch_size / row["seconds"]
        history.append(row)
        with open(ctx["log_path"], "a") as f:
            f.write(json.dumps(row) + "\n")
        score = row.get("val_macro_f1", -1.0)
        if not ctx["cfg"].select_best or score > best or val is None:
            best, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
        save_checkpoint(ckpt, model, opt, ctx["gen"], ctx["rng"],
                        {"stage": si, "next": pos + 1, "history": history, "best": best}, best_state)
    return history, best_state


def train_member(cfg: TrainConfig, arch: str, name: str, n_classes: int, train, val, out: Path, hooks=()):
    """One member: its recipe's stages, best/last state, post-hoc tau-norm; returns (model, history, mean, std)."""
    torch = require("torch", "train")
    torch.manual_seed(cfg.seed)
    model = create_member(arch, n_classes, cfg.pretrained, cfg.pretrained_file)
    mean, std = member_preprocess(model)
    counts = np.bincount(train[1], minlength=n_classes).astype(np.float64)
    ctx = {"cfg": cfg, "gen": torch.Generator().manual_seed(cfg.seed), "rng": np.random.default_rng(cfg.seed),
           "mean": mean, "std": std, "n_classes": n_classes, "name": name, "hooks": list(hooks),
           "log_path": out / "train_log.jsonl"}
    (out / "ckpt").mkdir(exist_ok=True)
    stages = recipe_stages(cfg, counts)
    history, best_state = run_stages(model, stages, train, val, ctx, out / "ckpt" / name)
    if stages[-1].frozen_backbone:  # the checkpointed state has a re-initialised head of the same shape
        model.reset_classifier(n_classes)
    model.load_state_dict(best_state)
    if cfg.recipe == "tau-norm":
        from .losses import tau_normalise_

        tau_normalise_(model.get_classifier(), cfg.tau_norm)
        if val is not None:
            history.append({"member": name, "stage": "tau-norm", **validate(model, val, ctx)})
    return model.eval(), history, mean, std


def splits_for(pool: Pool, cfg: TrainConfig) -> list[tuple[np.ndarray, np.ndarray | None]]:
    if cfg.val_data:
        return [(np.arange(len(pool.y)), None)]
    if cfg.folds > 1:
        return kfold_indices(pool.y, cfg.folds, cfg.seed, pool.groups)
    return [train_val_split(pool.y, cfg.val_fraction, cfg.seed, pool.groups)]


def plot_learning_curve(history: list[dict], path: Path) -> Path:
    from ..metrics import new_figure  # a figure-local canvas: the caller's matplotlib backend is left alone

    fig = new_figure((6.5, 3.8))
    ax = fig.add_subplot()
    ax2 = ax.twinx()
    for member in dict.fromkeys(h["member"] for h in history):
        rows = [h for h in history if h["member"] == member and "train_loss" in h]
        x = np.arange(1, len(rows) + 1)
        ax.plot(x, [h["train_loss"] for h in rows], "o-", ms=3, label=f"{member} train loss")
        if rows and "val_macro_f1" in rows[0]:
            ax2.plot(x, [h["val_macro_f1"] for h in rows], "s--", ms=3, label=f"{member} val macro-F1")
    ax.set_xlabel("epoch (all stages)")
    ax.set_ylabel("train loss")
    ax2.set_ylabel("val macro-F1")
    ax2.set_ylim(0, 1)
    fig.legend(loc="lower center", ncol=2, fontsize=7)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    return path


def augmentation_hooks(cfg: TrainConfig) -> list:
    """uint8 batch hooks for the unseen site: another lab's stain, then scanner degradations."""
    from ..data.degrade import KINDS, degradation_hook

    hooks = []
    if cfg.site_augment > 0:  # another lab's magnification, stain and optics, on most images
        from .site_augment import site_hook

        hooks.append(site_hook(cfg.site_augment, cfg.site_parts))
    if cfg.stain_augment > 0:
        hooks.append(degradation_hook(cfg.stain_augment, 3, ["stain_shift"]))
    if cfg.degrade_p > 0:
        hooks.append(degradation_hook(cfg.degrade_p, cfg.degrade_max_severity, [k for k in KINDS if k != "stain_shift"]))
    return hooks


def stain_reference(pool: Pool, anchors: dict | None = None, n: int = 1024):
    """The training cells' Macenko reference, measured as the runtime will see them (anchored first)."""
    from ..edge.anchor import anchor
    from ..edge.stain import fit_reference

    sample = pool.x[::max(1, len(pool.x) // n)]
    return fit_reference(anchor(sample, anchors) if anchors else sample)


def stain_record(reference, normalise: bool) -> dict:
    """The training cells' Macenko reference, and whether the model was trained on normalised cells
    (then every runtime normalises crops to it before the runner; see EnsembleClassifier)."""
    return {"reference": reference.to_dict(), "normalise": normalise}


def normalise_pool(pool: Pool, colour_step) -> None:
    """The preprocessor's colour step on the loaded cells, in place (validation cells are then what the
    runtime will see)."""
    for i in range(0, len(pool.x), 512):
        pool.x[i:i + 512] = colour_step(pool.x[i:i + 512])


def colour_anchors(pool: Pool, n: int = 2048) -> dict:
    """The training cells' background and dark point (the bundle's `anchor` section)."""
    from ..edge.anchor import fit_reference

    return fit_reference(pool.x[::max(1, len(pool.x) // n)])


def train(cfg: TrainConfig, hooks=None) -> Bundle:
    """Train every (member, fold) of the config and write one ensemble bundle."""
    torch = require("torch", "train")
    hooks = augmentation_hooks(cfg) if hooks is None else hooks
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    archs = cfg.members or [cfg.member]
    size = cfg.input_size or MEMBERS[archs[0]]["input_size"]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        (out / "train_log.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    pool = load_pool(cfg.data, cfg, size)
    val_pool = load_pool(cfg.val_data, cfg, size, pool.classes, pool.scale) if cfg.val_data else None
    anchors = colour_anchors(pool) if cfg.colour_anchor else None
    reference = stain_reference(pool, anchors)
    colour_step = None
    if cfg.stain_normalise or anchors:
        # training batches: augment the raw cells (another lab's stain, scanner), *then* the
        # preprocessor's colour step (anchoring, stain normalisation), as the runtime does; validation
        # cells get it once up front
        from ..edge.preprocess import Preprocessor

        colour_step = Preprocessor(size, stain=reference if cfg.stain_normalise else None, anchor=anchors).stain
        hooks = list(hooks) + [lambda b, rng: colour_step(b)]
        normed = val_pool or Pool(pool.classes, pool.x.copy(), pool.y, pool.paths, pool.groups, [])
        normalise_pool(normed, colour_step)  # training batches stay raw until their hooks have run
    members, history, pp = [], [], None
    for arch in archs:
        for k, (tr, va) in enumerate(splits_for(pool, cfg)):
            name = f"m{len(members)}"
            val = val_pool.take(slice(None)) if val_pool else (normed if colour_step else pool).take(va)
            model, hist, mean, std = train_member(cfg, arch, name, len(pool.classes), pool.take(tr), val, out, hooks)
            if pp is not None and (pp.mean, pp.std) != (mean, std):
                raise ValueError(f"member {arch} normalises differently from {archs[0]}; one bundle needs one")
            pp = Preprocess(size, mean, std)
            members.append(export_member_files(out, model, name, arch, pool.classes, pp,
                                               fold=k if cfg.folds > 1 else None))
            history += hist
            if va is not None and k == 0 and arch == archs[0]:
                write_split_manifests(out, pool, tr, va)
    plot_learning_curve(history, out / "learning_curve.png")
    priors = np.bincount(pool.y, minlength=len(pool.classes)) / len(pool.y)
    # the kept model is the last stage's best epoch (or tau-norm's row): report that, not an earlier stage
    final = [[h for h in history if h["member"] == m.name and h["stage"] == history_last_stage(history, m.name)]
             for m in members]
    best = [max((h.get("val_macro_f1", float("nan")) for h in rows), default=None) for rows in final]
    summary = {"config": cfg.to_dict(), "history": history, "seconds": time.perf_counter() - t0,
               "n_train": int(len(pool.y)), "n_val": int(len(val_pool.y)) if val_pool else None,
               "unreadable": [e.__dict__ for e in pool.errors], "best_val_macro_f1_per_member": best,
               "best_val_macro_f1": float(np.nanmean([b for b in best if b is not None])) if any(best) else None}
    bundle = Bundle(out, list(pool.classes), pp, members,
                    {"tta": {"views": list(cfg.tta_views)}, "training": summary,
                     "stain": stain_record(reference, cfg.stain_normalise),
                     "class_priors": dict(zip(pool.classes, map(float, priors))),
                     "quality": bundle_quality(), "scale": pool.scale,
                     **({"anchor": anchors} if anchors else {})})
    bundle.save()
    held_out = cfg.val_data or (out / "val_split.csv" if cfg.folds == 1 and (out / "val_split.csv").exists() else None)
    if held_out:  # k-fold members saw each other's validation cells: no unbiased set to calibrate on there
        from ..edge.confidence import fit_bundle_temperature

        t = fit_bundle_temperature(bundle, held_out)
        log.info("confidence temperature %.3f: validation ECE %.4f -> %.4f", t["temperature"], t["ece_before"],
                 t["ece_after"])
    if (out / "train_split.csv").exists():  # what the drift monitor compares every new slide with
        from ..edge.drift import fit_drift

        fit_drift(bundle, drift_cells(out, cfg, pool.classes))
    return bundle


def drift_cells(out: Path, cfg: TrainConfig, classes) -> Path:
    """The cells the drift monitor's statistics describe: the training split plus the training data's
    objects of other labels (ERB, PLATELET: the model meets them at its home site too, so a slide
    full of them is not a new site) -> manifest path."""
    from ..data.datasets import write_manifest

    def row(sample):
        return os.path.relpath(Path(sample.path).resolve(), out.resolve()), sample.label

    full = open_dataset(cfg.data).exclude_names(held_out_names(cfg))
    rows = [row(s) for s in open_dataset(out / "train_split.csv").samples]
    return write_manifest(out / "drift_cells.csv", rows + [row(s) for s in full.samples if s.label not in classes])


def history_last_stage(history: list[dict], member: str) -> str:
    return [h["stage"] for h in history if h["member"] == member][-1]


def export_member_files(out: Path, model, name: str, arch: str, classes, pp: Preprocess, fold=None) -> Member:
    """Save weights (safetensors), export + surgery to a deployable ONNX; returns the manifest entry."""
    import tempfile

    from ..build.export import export_member
    from ..build.surgery import build_member_graph

    save_weights(model, out / f"{name}.safetensors")
    with tempfile.TemporaryDirectory() as tmp:  # the raw graph can be recovered from the deployable one
        raw = export_member(model, Path(tmp) / f"{name}.raw.onnx", pp.input_size)
        build_member_graph(raw, out / f"{name}.onnx", pp.mean, pp.std,
                           {"classes": classes, "preprocess": pp.to_dict(), "member": name, "arch": arch})
    return Member(name=name, arch=arch, weights=f"{name}.safetensors", onnx=f"{name}.onnx", fold=fold)

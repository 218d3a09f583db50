"""The learned restorer: a small U-Net trained on synthetic (clean, degraded) canonical-cell pairs, exported
to ONNX with uint8 NHWC in and out, and stored in a copy of a bundle with the quality gate's thresholds.

    wbc-edge train-restorer --data ../shared/data/pbc-176 --bundle data/sample/bundle --out NEW_BUNDLE

Pairs: PBC cells (never the held-out `exclude_from` cells) at native size, each degraded on the fly by the
project's own degradations (data/degrade.py: blur, defocus, motion, uneven light, noise, JPEG; severities
1-4; a share left clean so the restorer learns to leave good cells alone), both made canonical by the
bundle's own preprocessor at the training scale (the same window for both: the pair stays aligned), so the
restorer learns exactly the cells it will see at run time, before the colour step. Loss: L1 + SSIM
(Pix2Pix's adversarial term is left out: on 2 CPU cores a GAN does not converge in the budget, and the
classifier, not a viewer, consumes the result). The gate's thresholds are fitted on the clean training
cells (edge/quality.py `fit_gate`). Run time needs only ONNX Runtime (edge/restore.py).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._optional import require
from ..build.surgery import set_metadata
from ..data import degrade
from ..outdir import owns_output

log = logging.getLogger("wbc_edge.restorer")
RESTORE_KINDS = ("gaussian_blur", "defocus_blur", "motion_blur", "illumination", "gaussian_noise", "jpeg")
INPUT, OUTPUT = "images", "restored"
GRAPH = "restorer.onnx"


@dataclass
class RestorerConfig:
    width: int = 16  # channels at full resolution; doubled per level
    depth: int = 3  # down-samplings (128 px -> 16 px at the bottom)
    n_cells: int = 3000  # training cells (stratified by class), plus n_val held out for the log
    n_val: int = 128
    epochs: int = 8
    batch_size: int = 16
    crop: int = 96  # random aligned crops of the canonical pair (0: whole cells)
    lr: float = 5e-4  # 2e-3 collapsed to the identity after two epochs (no normalisation layers)
    ssim_weight: float = 0.2
    clean_p: float = 0.1  # share of pairs left clean (identity)
    kinds: tuple = RESTORE_KINDS  # degradations the pairs are made with (data/degrade.py KINDS)
    seed: int = 0
    threads: int | None = None
    max_minutes: float | None = None  # stop (and export) when training has run this long


# ---- the network ---------------------------------------------------------------------------------------
def build_unet(width: int = 16, depth: int = 3):
    """A small residual U-Net: float NCHW in [0, 1] -> the same, restored (input + predicted change)."""
    torch = require("torch", "train")
    nn = torch.nn

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
                             nn.Conv2d(cout, cout, 3, padding=1), nn.LeakyReLU(0.1, inplace=True))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            ch = [width * 2 ** i for i in range(depth + 1)]
            self.enc = nn.ModuleList([block(3, ch[0])] + [block(ch[i], ch[i + 1]) for i in range(depth)])
            self.down = nn.ModuleList([nn.Conv2d(ch[i], ch[i], 2, stride=2) for i in range(depth)])
            self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in range(depth)])
            self.dec = nn.ModuleList([block(2 * ch[i], ch[i]) for i in range(depth)])
            self.head = nn.Conv2d(ch[0], 3, 1)
            with torch.no_grad():  # starts near the identity (input + a small change), yet with gradients
                self.head.weight.mul_(0.1)  # reaching every layer (a zero head would stall them)
                self.head.bias.zero_()

        def forward(self, x):
            skips, h = [], self.enc[0](x - 0.5)
            for i in range(depth):
                skips.append(h)
                h = self.enc[i + 1](self.down[i](h))
            for i in reversed(range(depth)):
                h = self.dec[i](torch.cat([self.up[i](h), skips[i]], 1))
            return torch.clamp(x + self.head(h), 0.0, 1.0)

    return UNet()


def uint8_io(net):
    """uint8 NHWC (`images`) -> uint8 NHWC (`restored`), as the deployed graphs take cells: the cast,
    layout and rounding inside the graph, so every runtime rounds as the exporter did."""
    torch = require("torch", "train")

    class Uint8IO(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, images):
            x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
            y = torch.round(self.net(x) * 255.0)
            return torch.clamp(y, 0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1)

    return Uint8IO().eval()


def ssim_torch(a, b):
    """Mean SSIM of float NCHW images in [0, 1] (11x11 Gaussian window, sigma 1.5, as quality.ssim).
    Written here because none of kornia / pytorch-msssim / torchmetrics is a dependency; 10 lines."""
    torch = require("torch", "train")
    f = torch.nn.functional
    t = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-t ** 2 / (2 * 1.5 ** 2))
    g = (g / g.sum())
    win = (g[:, None] * g[None, :]).expand(a.shape[1], 1, 11, 11).contiguous()
    blur = lambda x: f.conv2d(x, win, groups=a.shape[1])  # noqa: E731 - valid region only
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma ** 2, blur(b * b) - mb ** 2, blur(a * b) - ma * mb
    return (((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))).mean()


# ---- the pairs --------------------------------------------------------------------------------------
def select_cells(data, n: int, exclude_from=None, seed: int = 0):
    """Up to n cells of `data` (stratified by class, seeded), none named like a file under `exclude_from`."""
    from ..data.datasets import open_dataset
    from ..taxonomy import WBC_CODES

    ds = open_dataset(data)
    ds = ds.filter_classes([c for c in ds.classes if c in WBC_CODES])
    if exclude_from:
        ds = ds.exclude_names({p.name for p in Path(exclude_from).rglob("*") if p.is_file()})
    if not len(ds):
        raise ValueError(f"{data}: no white-cell images to train the restorer on")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ds))
    labels = np.asarray(ds.labels)[order]
    rank = np.zeros(len(order), np.int64)  # round-robin over classes: rare classes are not crowded out
    for c in np.unique(labels):
        rank[labels == c] = np.arange(int((labels == c).sum()))
    return ds.subset(np.sort(order[np.argsort(rank, kind="stable")[:n]]))


def pair_preprocessor(bundle):
    """The bundle's preprocessor at the training scale, without a restorer: the clean and the degraded
    copy of a training cell get the same window, so a pair stays aligned pixel for pixel."""
    from ..edge.preprocess import Preprocessor
    from ..edge.scale import RBC_UM

    spec = bundle.extra.get("scale") or {}
    pre = Preprocessor.for_bundle(bundle, pixel_size=RBC_UM / spec["rbc_px"] if spec.get("rbc_px") else None)
    pre.restorer = None
    return pre


def canonical(pre, images) -> np.ndarray:
    """Native images -> canonical cells before the colour step (uint8 BxSxSx3)."""
    return np.stack([pre.crop(im)[0] for im in images])


def degraded_pairs(natives: list, pre, rng, clean_p: float = 0.1, kinds=RESTORE_KINDS):
    """(degraded canonical cells, clean canonical cells) for native images: each degraded by one kind at a
    severity uniform in 1-4, or (with probability clean_p) left clean."""
    clean = canonical(pre, natives)
    bad = []
    for im in natives:
        if rng.random() < clean_p:
            bad.append(im)
            continue
        kind, sev = kinds[rng.integers(len(kinds))], int(rng.integers(1, 5))
        bad.append(degrade.apply(im[None], kind, sev, rng)[0])
    return canonical(pre, bad), clean


# ---- training -------------------------------------------------------------------------------------
def _to_tensor(torch, batch):
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 255.0


def _random_crops(rng, a, b, size: int):
    if not size or size >= a.shape[1]:
        return a, b
    ys, xs = rng.integers(0, a.shape[1] - size + 1, len(a)), rng.integers(0, a.shape[2] - size + 1, len(a))
    return (np.stack([x[y:y + size, z:z + size] for x, y, z in zip(a, ys, xs)]),
            np.stack([x[y:y + size, z:z + size] for x, y, z in zip(b, ys, xs)]))


def train_net(natives: list, val: tuple, pre, cfg: RestorerConfig, log_path: Path | None = None):
    """The U-Net trained on fresh degraded pairs each epoch -> (net, history). Progress (pairs/s, ETA,
    validation PSNR) is logged and appended to `log_path` as JSON lines."""
    torch = require("torch", "train")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = build_unet(cfg.width, cfg.depth)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(natives) // cfg.batch_size)
    total, step = cfg.epochs * steps_per_epoch, 0
    history, t0, done = [], time.perf_counter(), 0
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        order, losses = rng.permutation(len(natives)), []
        for s in range(steps_per_epoch):
            frac = _progress(step, total, time.perf_counter() - t0, cfg.max_minutes)
            if frac >= 1:
                break
            for group in opt.param_groups:
                group["lr"] = _lr_at(frac, cfg.lr)
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            bad, good = degraded_pairs([natives[i] for i in idx], pre, rng, cfg.clean_p, cfg.kinds)
            bad, good = _random_crops(rng, bad, good, cfg.crop)
            x, y = _to_tensor(torch, bad), _to_tensor(torch, good)
            out = net(x)
            loss = (out - y).abs().mean() + cfg.ssim_weight * (1 - ssim_torch(out, y))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            done, step = done + len(idx), step + 1
        rec = _epoch_record(net, val, epoch, losses, done, time.perf_counter() - t0,
                            _progress(step, total, time.perf_counter() - t0, cfg.max_minutes))
        history.append(rec)
        log.info("restorer epoch %d/%d: loss %.4f, val PSNR %.2f dB (degraded %.2f), %.1f pairs/s, ETA %.0f s",
                 epoch, cfg.epochs, rec["loss"], rec["val_psnr"], rec["val_psnr_degraded"], rec["pairs_per_s"],
                 rec["eta_s"])
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if _progress(step, total, time.perf_counter() - t0, cfg.max_minutes) >= 1:
            if step < total:
                log.warning("restorer: time budget reached after %.1f min, epoch %d", (time.perf_counter() - t0) / 60, epoch)
            break
    return net.eval(), history


def _progress(step: int, total: int, seconds: float, max_minutes: float | None) -> float:
    """How far training is (0..1): by steps, or by time when a time budget ends it sooner; the learning
    rate follows it, so a run cut by the budget still ends with its rate decayed."""
    return max(step / max(total, 1), seconds / (60 * max_minutes) if max_minutes else 0.0)


def _lr_at(frac: float, base: float, warmup: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if frac < warmup:
        return base * (frac + 1e-3) / warmup
    return base * 0.5 * (1 + np.cos(np.pi * min(1.0, (frac - warmup) / (1 - warmup))))


def _epoch_record(net, val, epoch, losses, done, seconds, frac) -> dict:
    from ..edge.quality import psnr

    restored = run_torch(net, val[0])
    rate = done / max(seconds, 1e-9)
    return {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
            "val_psnr": float(np.mean([psnr(a, b) for a, b in zip(restored, val[1])])),
            "val_psnr_degraded": float(np.mean([psnr(a, b) for a, b in zip(val[0], val[1])])),
            "seconds": round(seconds, 1), "pairs_per_s": round(rate, 2),
            "progress": round(min(frac, 1.0), 4), "eta_s": round(seconds * (1 - min(frac, 1.0)) / max(frac, 1e-9), 1)}


def run_torch(net, batch: np.ndarray, chunk: int = 64) -> np.ndarray:
    """uint8 NHWC -> uint8 NHWC through the torch network, rounded as the exported graph rounds."""
    torch = require("torch", "train")
    io = uint8_io(net)
    with torch.no_grad():
        return np.concatenate([io(torch.from_numpy(np.ascontiguousarray(batch[i:i + chunk]))).numpy()
                               for i in range(0, len(batch), chunk)]) if len(batch) else batch.copy()


# ---- export and bundle ------------------------------------------------------------------------------
def export_onnx(net, path, size: int, metadata: dict | None = None) -> Path:
    """The restorer with uint8 NHWC IO (`images` -> `restored`, dynamic batch), metadata set, checked."""
    torch = require("torch", "train")
    onnx = require("onnx", "train")
    path = Path(path)
    dummy = torch.zeros(1, size, size, 3, dtype=torch.uint8)
    torch.onnx.export(uint8_io(net), (dummy,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                      dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=17, dynamo=False)
    model = set_metadata(onnx.load(str(path)), {"kind": "restorer", "input_size": size, **(metadata or {})})
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def restore_section(gate: dict, onnx_name: str = GRAPH, **extra) -> dict:
    """The bundle's `restore` section."""
    return {"onnx": onnx_name, "enabled": True, "gate": gate, **extra}


@owns_output("out")
def train_restorer(data, bundle_dir, out, cfg: RestorerConfig | None = None, exclude_from=None):
    """Train the restorer on `data` for the bundle at `bundle_dir` and write a copy of the bundle to `out`
    with the restorer graph and its gate (`restore` section) -> the new Bundle (saved, signed)."""
    from ..bundle import Bundle
    from ..edge.quality import fit_gate
    from ..fit.adapt import copy_bundle

    cfg = cfg or RestorerConfig()
    bundle = Bundle.load(bundle_dir)
    new, _ = copy_bundle(bundle, out)
    new.extra.pop("restore", None)
    ds = select_cells(data, cfg.n_cells + cfg.n_val, exclude_from, cfg.seed)
    images, kept, errors = ds.load(progress=False)
    for e in errors:
        log.warning("skipping unreadable image %s: %s", e.path, e.reason)
    if len(images) < 2:
        raise ValueError(f"{data}: too few readable cells to train the restorer ({len(images)})")
    pre = pair_preprocessor(bundle)
    n_val = min(cfg.n_val, len(images) // 4)
    train_imgs, val_imgs = images[n_val:], images[:n_val]
    gate = fit_gate(canonical(pre, train_imgs))  # every clean training cell passes the gate
    val = degraded_pairs(val_imgs, pre, np.random.default_rng(cfg.seed + 1), 0.0, cfg.kinds) if n_val else (
        np.zeros((0, pre.size, pre.size, 3), np.uint8),) * 2
    log.info("restorer: %d training cells, %d validation; gate %s", len(train_imgs), n_val, gate)
    net, history = train_net(train_imgs, val, pre, cfg, Path(out) / "restorer_log.jsonl")
    export_onnx(net, new.path(GRAPH), pre.size, {"preprocess": new.preprocess.to_dict()})
    new.extra["restore"] = restore_section(gate, training={
        "data": str(data), "exclude_from": str(exclude_from) if exclude_from else None, "n_train": len(train_imgs),
        "config": {**cfg.__dict__, "kinds": list(cfg.kinds)}, "history": history})
    new.save()
    return Bundle.load(out)

"""Ensemble members: a small registry over timm (timm-style `create_member(name, **overrides)`).

`None` for an override means "the library default". `pretrained=True` uses timm's own loading
(the Hugging Face hub where reachable, or `pretrained_file=` for a local weights file).
"""
from __future__ import annotations

from .._optional import require

# name -> defaults; the paper backbones first, then CPU-sized ones that train on 2 cores.
MEMBERS: dict[str, dict] = {
    "resnet50": {"input_size": 224},
    "resnet152": {"input_size": 224},
    "swin_tiny_patch4_window7_224": {"input_size": 224},  # fixed 224 input (window attention)
    "resnet18": {"input_size": 224},
    "efficientnet_b0": {"input_size": 224},
    "convnext_atto": {"input_size": 224},
    "mobilenetv3_large_100": {"input_size": 224},
    "mobilenetv3_small_100": {"input_size": 128},
    "mobilenetv3_small_050": {"input_size": 128},
}


def create_member(name: str, num_classes: int, pretrained: bool = False, pretrained_file: str | None = None,
                  **overrides):
    """A timm model for `name` with a `num_classes` head."""
    timm = require("timm", "train")
    if name not in MEMBERS:
        raise ValueError(f"unknown member {name!r}; registered: {', '.join(MEMBERS)}")
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    if pretrained_file:
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
        pretrained = True
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)


def member_preprocess(model) -> tuple[list[float], list[float]]:
    """Mean/std the backbone expects (timm's pretrained config), stored in the bundle."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return list(cfg.get("mean", (0.485, 0.456, 0.406))), list(cfg.get("std", (0.229, 0.224, 0.225)))

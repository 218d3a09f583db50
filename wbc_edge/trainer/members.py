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
    # GroupNorm variants: normalised with each cell's own statistics instead of the training site's
    # batch statistics, which do not hold at another microscope (Raabin-WBC, ResNet-50 on an unseen
    # microscope: BN 34.6 %, GN 78.0 %; Tsutsui et al. 2023)
    "mobilenetv3_small_100_gn": {"input_size": 128, "arch": "mobilenetv3_small_100", "norm": "groupnorm1"},
    "resnet18_gn": {"input_size": 224, "arch": "resnet18", "norm": "groupnorm1"},
}


def create_member(name: str, num_classes: int, pretrained: bool = False, pretrained_file: str | None = None,
                  **overrides):
    """A timm model for `name` with a `num_classes` head."""
    timm = require("timm", "train")
    if name not in MEMBERS:
        raise ValueError(f"unknown member {name!r}; registered: {', '.join(MEMBERS)}")
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    spec = MEMBERS[name]
    converted = spec.get("norm") == "groupnorm1"
    if pretrained_file and not converted:
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
        pretrained = True
    model = timm.create_model(spec.get("arch", name), pretrained=pretrained, num_classes=num_classes, **kwargs)
    if not converted:
        return model
    model = groupnorm(model)
    if pretrained_file:  # a GroupNorm member's own weights (e.g. a bundle's): they fit only after the conversion
        model.load_state_dict(require("safetensors.torch", "train").load_file(str(pretrained_file)))
    return model


def groupnorm(model):
    """Every BatchNorm (with its activation) of a timm model replaced, in place, by a one-group
    GroupNorm with the same activation: per-sample statistics, so no running statistics to go stale.
    By hand because timm builds these backbones with BatchNorm fixed in their builders."""
    import torch

    from timm.layers.norm_act import BatchNormAct2d, GroupNorm1Act

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BatchNormAct2d):
                gn = GroupNorm1Act(child.num_features, eps=child.eps, apply_act=False)
                gn.act, gn.drop = child.act, child.drop
            elif isinstance(child, torch.nn.BatchNorm2d):
                gn = torch.nn.GroupNorm(1, child.num_features, eps=child.eps)
            else:
                continue
            if child.affine:  # pretrained scale/shift carried over (only the statistics change)
                gn.weight.data.copy_(child.weight.data)
                gn.bias.data.copy_(child.bias.data)
            setattr(module, child_name, gn)
    return model


def member_preprocess(model) -> tuple[list[float], list[float]]:
    """Mean/std the backbone expects (timm's pretrained config), stored in the bundle."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return list(cfg.get("mean", (0.485, 0.456, 0.406))), list(cfg.get("std", (0.229, 0.224, 0.225)))

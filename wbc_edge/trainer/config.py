"""Training configuration: a dataclass read from YAML plus CLI overrides; unknown keys are rejected."""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    data: str = ""  # ImageFolder, manifest CSV, or folder with manifest.csv
    out: str = "runs/bundle"  # bundle directory to write
    classes: list[str] | None = None  # None: every WBC class found in the data
    member: str = "mobilenetv3_small_100"
    members: list[str] | None = None  # several backbones -> one ensemble (overrides `member`)
    folds: int = 1  # 1: one stratified hold-out split; k > 1: k-fold, one member per fold
    val_data: str | None = None  # an explicit validation set instead of a split
    input_size: int | None = None  # None: the member's default
    pretrained: bool = False
    pretrained_file: str | None = None
    recipe: str = "ce"  # ce | decoupled | focal-logw | ldam-drw | logit-adjust | tau-norm
    stage2_epochs: int = 5  # decoupled: classifier re-balancing epochs on the frozen backbone
    stage2_lr: float = 5e-3
    focal_gamma: float = 2.0
    cb_beta: float = 0.9999  # effective-number beta
    la_tau: float = 1.0  # logit-adjustment temperature
    tau_norm: float = 1.0  # tau-normalisation exponent
    ldam_max_margin: float = 0.5
    drw_start: float = 0.8  # LDAM-DRW: fraction of epochs before re-weighting starts
    select_best: bool = True  # keep the epoch with the best val macro-F1 (else the last)
    resume: bool = False  # continue from the checkpoints in `out`/ckpt
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    val_fraction: float = 0.15
    seed: int = 0
    exclude_from: str | None = None  # drop training files whose names appear under this folder
    max_per_class: int | None = None  # subsample for quick runs
    threads: int | None = None
    tta_views: list[str] = field(default_factory=lambda: ["id", "flip"])
    colour_jitter: float = 0.15
    stain_augment: float = 0.3  # probability per image of another lab's stain (stain_shift, severity 1-3)
    degrade_p: float = 0.2  # probability per image of a scanner degradation (noise, blur, light, JPEG...)
    degrade_max_severity: int = 3
    site_augment: float = 0.4  # probability per image of the site-robust chain (trainer/site_augment.py)
    site_parts: list[str] = field(default_factory=lambda: ["scale", "stain", "optics"])
    colour_anchor: bool = True  # map each cell's background and dark point to the training cells' (edge/anchor.py)
    stain_normalise: bool = False  # train (and run) on Macenko-normalised cells, reference = training set
    progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class ConfigError(ValueError):
    pass


def _check_keys(keys, source: str) -> None:
    valid = [f.name for f in fields(TrainConfig)]
    for key in keys:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")


def load_config(path=None, **overrides) -> TrainConfig:
    """YAML file (optional) then overrides (None values are ignored: 'not given on the CLI')."""
    values = {}
    if path:
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values")
        _check_keys(values, str(path))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _check_keys(overrides, "overrides")
    return TrainConfig(**{**values, **overrides})

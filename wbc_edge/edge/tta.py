"""Test-time augmentation views: elements of D4 (rotations by 90 degrees, flips) on uint8 NHWC batches."""
from __future__ import annotations

import numpy as np

from ..xp import get_xp

# name -> (quarter turns, then horizontal flip); the same group as trainer.augment.d4
VIEWS: dict[str, tuple[int, bool]] = {
    "id": (0, False), "rot90": (1, False), "rot180": (2, False), "rot270": (3, False),
    "flip": (0, True), "rot90_flip": (1, True), "rot180_flip": (2, True), "rot270_flip": (3, True),
}
PRESETS = {1: ["id"], 2: ["id", "flip"], 4: ["id", "rot90", "rot180", "rot270"], 8: list(VIEWS)}


def check_views(views) -> list[str]:
    """`views` as a list of known view names; ValueError naming the unknown ones (or an empty list)."""
    views = list(views)
    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise ValueError(f"unknown TTA views {unknown}; choose from {list(VIEWS)}" if unknown
                         else f"no TTA views given; choose from {list(VIEWS)}")
    return views


def parse_views(text: str | None) -> list[str] | None:
    """`--views id,flip` -> ["id", "flip"], checked before anything runs; None -> None (the bundle's)."""
    if text is None:
        return None
    return check_views(v.strip() for v in text.split(",") if v.strip())


def view(batch, name: str):
    """One view of a NumPy or CuPy batch (NHWC), in the batch's own array module."""
    turns, flip = VIEWS[name]
    out = get_xp(batch).rot90(batch, turns, axes=(1, 2))  # (H,W): the turn torch.rot90 makes on NCHW (2,3)
    return out[:, :, ::-1] if flip else out


def expand(batch, views: list[str]):
    """All views of the batch stacked view-major: (V*B, H, W, 3), one runner call for all of them; on
    the batch's device (NumPy or CuPy)."""
    check_views(views)
    xp = get_xp(batch)
    return xp.ascontiguousarray(xp.concatenate([view(batch, v) for v in views]))


def merge(probs: np.ndarray, n_views: int) -> np.ndarray:
    """(V*B, C) -> (B, C), mean over views."""
    return probs.reshape(n_views, -1, probs.shape[-1]).mean(axis=0)

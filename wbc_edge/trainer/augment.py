"""Training augmentations on whole batches.

uint8 hooks (stain augmentation, degradations) run on the NumPy batch before it becomes a tensor;
geometric (D4) and colour jitter run on the float tensor batch.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Uint8Hook = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def d4(x, k: int):
    """The k-th (0..7) element of the dihedral group D4 on an NCHW tensor: rot90^(k%4), then a flip."""
    torch = __import__("torch")
    y = torch.rot90(x, k % 4, dims=(2, 3))
    return torch.flip(y, dims=(3,)) if k >= 4 else y


def random_d4(x, gen):
    """Each sample gets its own random D4 view (cells have no canonical orientation)."""
    torch = __import__("torch")
    ks = torch.randint(0, 8, (x.shape[0],), generator=gen)
    out = torch.empty_like(x)
    for k in range(8):
        idx = (ks == k).nonzero(as_tuple=True)[0]
        if len(idx):
            out[idx] = d4(x[idx], k)
    return out


def colour_jitter(x, gen, strength: float = 0.15):
    """Per-sample brightness, contrast and saturation jitter on Bx3xHxW floats in [0, 1]."""
    torch = __import__("torch")
    b = x.shape[0]
    rand = lambda: 1 + strength * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)  # noqa: E731
    x = x * rand()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * rand() + mean
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * rand() + grey
    return x.clamp(0, 1)


def apply_uint8_hooks(batch: np.ndarray, hooks: list[Uint8Hook], rng: np.random.Generator) -> np.ndarray:
    for hook in hooks:
        batch = hook(batch, rng)
    return batch

"""Weights on disk as safetensors (never pickle), and loading a bundle member back into PyTorch."""
from __future__ import annotations

from pathlib import Path

from .._optional import require


def save_weights(model, path) -> Path:
    st = require("safetensors.torch", "train")
    # clone+contiguous: safetensors refuses tensors that share storage (e.g. tied or sliced weights)
    st.save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path))
    return Path(path)


def load_member(bundle, index: int = 0):
    """The PyTorch model of member `index`, weights loaded, in eval mode."""
    st = require("safetensors.torch", "train")
    from .members import create_member

    m = bundle.members[index]
    model = create_member(m.arch, len(bundle.classes), **m.arch_kwargs)
    model.load_state_dict(st.load_file(str(bundle.path(m.weights))))
    return model.eval()

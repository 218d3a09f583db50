"""Weights on disk as safetensors (never pickle), checkpoints for resume, and loading a bundle member."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .._optional import require


def _tensors(state: dict) -> dict:
    # clone+contiguous: safetensors refuses tensors that share storage (e.g. tied or sliced weights)
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def save_weights(model, path) -> Path:
    require("safetensors.torch", "train").save_file(_tensors(model.state_dict()), str(path))
    return Path(path)


def save_checkpoint(path: Path, model, opt, gen, rng: np.random.Generator, meta: dict, best_state=None) -> None:
    """Model, optimiser, RNG states and progress; tensors in safetensors, the rest in JSON beside it."""
    st = require("safetensors.torch", "train")
    tensors = {f"model.{k}": v for k, v in _tensors(model.state_dict()).items()}
    opt_state = opt.state_dict()
    for idx, state in opt_state["state"].items():
        tensors.update({f"opt.{idx}.{k}": v.detach().clone() for k, v in state.items()})
    tensors["rng.torch"] = gen.get_state()
    tensors["rng.torch_global"] = require("torch", "train").get_rng_state()  # dropout, head re-init
    if best_state is not None:
        tensors.update({f"best.{k}": v for k, v in _tensors(best_state).items()})
    st.save_file(tensors, str(path.with_suffix(".safetensors")))
    meta = {**meta, "param_groups": opt_state["param_groups"], "rng_numpy": rng.bit_generator.state}
    path.with_suffix(".json").write_text(json.dumps(meta))


def load_checkpoint(path: Path, model, opt, gen, rng: np.random.Generator) -> tuple[dict, dict | None]:
    """Restore in place; returns (meta, best_state or None)."""
    st = require("safetensors.torch", "train")
    tensors = st.load_file(str(path.with_suffix(".safetensors")))
    meta = json.loads(path.with_suffix(".json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    gen.set_state(tensors["rng.torch"])
    require("torch", "train").set_rng_state(tensors["rng.torch_global"])
    rng.bit_generator.state = meta.pop("rng_numpy")
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    return meta, best


def load_member(bundle, index: int = 0):
    """The PyTorch model of member `index`, weights loaded, in eval mode."""
    st = require("safetensors.torch", "train")
    from .members import create_member

    m = bundle.members[index]
    model = create_member(m.arch, len(bundle.classes), **m.arch_kwargs)
    model.load_state_dict(st.load_file(str(bundle.path(m.weights))))
    return model.eval()

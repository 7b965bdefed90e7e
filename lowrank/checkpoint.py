"""The compressed-model format: a base model reference + low-rank factors in safetensors + a JSON manifest.

Only the factors of replaced targets are stored (``<target>.down.weight``, ``<target>.up.weight`` and
``<target>.up.bias``: the state-dict keys of the ``LowRankLinear``); dense targets and everything else come from
the base model. Loading follows the Hugging Face pattern: load the base, swap in ``LowRankLinear`` skeletons of
the recorded ranks, then load the factor tensors strictly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .factorized import LowRankLinear
from .io import load_tensors, read_json, save_tensors, write_json
from .model import load_model, swap_in_low_rank

__all__ = ["save_compressed", "load_compressed", "factor_state"]

FACTORS = "factors.safetensors"
MANIFEST = "manifest.json"


def factor_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Tensors of every ``LowRankLinear`` in ``model`` (state-dict keys) and their ranks."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankLinear):
            ranks[name] = mod.rank
            for k, v in mod.state_dict().items():
                tensors[f"{name}.{k}"] = v
    return tensors, ranks


def save_compressed(out_dir: str | os.PathLike, model: nn.Module, base_manifest_path: str | os.PathLike,
                    extra: dict[str, Any]) -> dict[str, Any]:
    """Write ``factors.safetensors`` then ``manifest.json`` (the manifest last: its presence means complete).

    The base model is referenced by the path of its ``pretrained`` manifest, relative to ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_manifest = read_json(base_manifest_path)
    tensors, ranks = factor_state(model)
    save_tensors(out_dir / FACTORS, tensors, {"ranks": ranks})
    manifest = {
        "format": "lowrank-factors/1",
        "lowrank_version": __version__,
        "base_manifest": os.path.relpath(Path(base_manifest_path).resolve(), out_dir.resolve()),
        "base_architecture": base_manifest.get("architecture", {}),
        "factors": FACTORS,
        "ranks": ranks,
        "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", "") if tensors else None,
        "factor_bytes": int(sum(t.numel() * t.element_size() for t in tensors.values())),
        **extra,
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def load_compressed(out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> nn.Module:
    """Base model, ``LowRankLinear`` skeletons of the recorded ranks, then the stored factors (strict)."""
    out_dir = Path(out_dir)
    manifest = read_json(out_dir / MANIFEST)
    model = load_model(out_dir / manifest["base_manifest"], dtype=dtype, device="cpu")
    for name, rank in manifest["ranks"].items():
        swap_in_low_rank(model, name, int(rank))
    tensors, _ = load_tensors(out_dir / manifest["factors"])
    expected = {f"{n}.{k}" for n in manifest["ranks"] for k in model.get_submodule(n).state_dict()}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise ValueError(f"factor file {out_dir / manifest['factors']} does not match its manifest "
                         f"(missing {missing}, unexpected {extra})")
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    return model.to(device).eval()

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
from .model import load_model, model_path, replace_module, swap_in_low_rank
from .quantized_linear import QuantizedLinear
from .sharded import attach_factors, load_lazy_model, streams

__all__ = ["save_compressed", "load_compressed", "factor_state", "save_quantized", "QUANTIZED_FORMAT"]

FACTORS = "factors.safetensors"
MANIFEST = "manifest.json"
QUANTIZED = "model.safetensors"
QUANTIZED_FORMAT = "lowrank-quantized/1"


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


def _check_keys(model: nn.Module, names: Any, keys: Any, path: Path, what: str) -> None:
    """``keys`` (of the file ``path``) must be exactly the state of the modules ``names`` of ``model``."""
    expected = {f"{n}.{k}" for n in names for k in model.get_submodule(n).state_dict(keep_vars=True)}
    if set(keys) != expected:
        missing, extra = sorted(expected - set(keys))[:3], sorted(set(keys) - expected)[:3]
        raise ValueError(f"{what} {path} does not match its manifest (missing {missing}, unexpected {extra})")


def _load_module_tensors(model: nn.Module, names: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, which must be exactly the state of the modules ``names`` of ``model``."""
    tensors, _ = load_tensors(path)
    _check_keys(model, names, tensors, path, what)
    return tensors


def load_compressed(out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", lazy: bool | None = False, keep: bool = False) -> nn.Module:
    """Base model, ``LowRankLinear`` skeletons of the recorded ranks, then the stored factors (strict).

    ``lazy`` (``None`` = when the base checkpoint does not fit in host memory or on ``device``,
    :func:`lowrank.sharded.streams`): the base as a
    lazy skeleton (:func:`lowrank.sharded.load_lazy_model`) whose factor (or int8) skeletons stay on ``meta`` too;
    a block's factors are read from the factor file when the block is placed and dropped when it is released,
    so host memory holds the stem and one block, whatever the depth. The model then stays on CPU. ``keep``
    (a stage that changes the factors, refine): a block's factors stay on CPU after the block, so host memory
    holds the stem, one block's dense weights and the factors seen so far (the result), and the model can be
    saved after (:func:`lowrank.sharded.attach_factors`).
    """
    out_dir = Path(out_dir)
    manifest = read_json(out_dir / MANIFEST)
    if manifest.get("format") == QUANTIZED_FORMAT:
        return _load_quantized(out_dir, manifest, dtype, device, lazy)
    base = out_dir / manifest["base_manifest"]
    if streams(model_path(base), dtype, lazy, device=device):
        model = load_lazy_model(model_path(base), dtype)
        for name, rank in manifest["ranks"].items():
            swap_in_low_rank(model, name, int(rank))
        factors = out_dir / manifest["factors"]
        keys = attach_factors(model, factors, list(manifest["ranks"]), keep=keep)
        _check_keys(model, manifest["ranks"], keys, factors, "factor file")
        return model.eval()
    model = load_model(base, dtype=dtype, device="cpu")
    for name, rank in manifest["ranks"].items():
        swap_in_low_rank(model, name, int(rank))
    tensors = _load_module_tensors(model, manifest["ranks"], out_dir / manifest["factors"], "factor file")
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    return model.to(device).eval()


# ---- hybrid int8 / float16 targets (lowrank.quantization) -----------------------------------------------------


def save_quantized(out_dir: str | os.PathLike, model: nn.Module, base_manifest_path: str | os.PathLike,
                   accounted_bytes: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Write every ``QuantizedLinear`` of ``model`` (``model.safetensors``) then ``manifest.json``.

    The manifest records each target's rank and int8 row counts (the skeleton to load into). The tensor bytes
    must equal ``accounted_bytes`` (the byte accounting of :mod:`lowrank.quantization`); a mismatch raises before
    anything is written.
    """
    out_dir = Path(out_dir)
    tensors: dict[str, torch.Tensor] = {}
    layouts: dict[str, Any] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedLinear):
            parts = ["weight"] if mod.rank is None else ["down", "up"]
            layouts[name] = {"rank": mod.rank, "in": mod.in_features, "out": mod.out_features,
                             "bias": mod.bias is not None,
                             "int8_rows": {p: int(getattr(mod, p).q.shape[0]) for p in parts}}
            for k, v in mod.state_dict().items():
                tensors[f"{name}.{k}"] = v.contiguous()
    stored = int(sum(t.numel() * t.element_size() for t in tensors.values()))
    if stored != accounted_bytes:
        raise RuntimeError(f"quantized tensors hold {stored} bytes but {accounted_bytes} were accounted")
    out_dir.mkdir(parents=True, exist_ok=True)
    base_manifest = read_json(base_manifest_path)
    save_tensors(out_dir / QUANTIZED, tensors, {"format": QUANTIZED_FORMAT})
    manifest = {
        "format": QUANTIZED_FORMAT,
        "lowrank_version": __version__,
        "base_manifest": os.path.relpath(Path(base_manifest_path).resolve(), out_dir.resolve()),
        "base_architecture": base_manifest.get("architecture", {}),
        "factors": QUANTIZED,
        "ranks": {n: lay["rank"] for n, lay in layouts.items() if lay["rank"] is not None},
        "layouts": layouts,
        "tensor_bytes": stored,
        **extra,
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def _load_quantized(out_dir: Path, manifest: dict[str, Any], dtype: torch.dtype,
                    device: torch.device | str, lazy: bool | None = False) -> nn.Module:
    base = out_dir / manifest["base_manifest"]
    streamed = streams(model_path(base), dtype, lazy, device=device)
    model = load_lazy_model(model_path(base), dtype) if streamed else load_model(base, dtype=dtype, device="cpu")
    for name, lay in manifest["layouts"].items():
        new = QuantizedLinear(lay["in"], lay["out"], lay["rank"], lay["int8_rows"], bias=lay["bias"])
        replace_module(model, name, new.to("meta") if streamed else new)
    if streamed:  # each block's rows read with the block, in their stored dtypes
        path = out_dir / manifest["factors"]
        keys = attach_factors(model, path, list(manifest["layouts"]), cast=False)
        _check_keys(model, manifest["layouts"], keys, path, "quantized file")
        return model.eval()
    tensors = _load_module_tensors(model, manifest["layouts"], out_dir / manifest["factors"], "quantized file")
    model.load_state_dict(tensors, strict=False)  # buffers keep their stored dtypes (int8, float16, float32)
    return model.to(device).eval()

"""Use a compressed model outside the pipeline: as a transformers model, or as a plain Hugging Face folder.

:func:`load_for_inference` gives the ``transformers`` model with its ``LowRankLinear`` layers (the stored factors,
so the parameter savings are real) and its tokenizer: ``generate``, lm-eval's ``HFLM(pretrained=model)`` and
training loops work on it as on any ``PreTrainedModel``. With ``trainable=True`` the factors ``A``, ``B`` (and
nothing else) require gradients, the usual set-up for fine-tuning a compressed model.

:func:`export_hf` writes a folder that plain ``AutoModelForCausalLM.from_pretrained`` loads with no ``lowrank``
installed. A stock architecture has no low-rank layer, so each factored target is stored merged,
``W' = A B`` (the same function, the dense parameter count); keep the factor folder for the compact form.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import MANIFEST, load_compressed
from .factorized import LowRankLinear
from .io import read_json, write_json
from .model import load_model, load_tokenizer, weight_is_transposed

__all__ = ["load_for_inference", "merge_low_rank", "export_hf"]


def _base_manifest(folder: Path) -> Path:
    return folder / read_json(folder / MANIFEST)["base_manifest"]


def load_for_inference(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu", trainable: bool = False) -> tuple[nn.Module, Any]:
    """The compressed model at ``folder`` (a ``stage{s}`` folder) and its tokenizer (``None`` if it has none).

    ``trainable=True`` returns the model in train mode with only the low-rank factors requiring gradients.
    """
    folder = Path(folder)
    model = load_compressed(folder, dtype=dtype, device=device)
    try:
        tokenizer = load_tokenizer(_base_manifest(folder))
    except ValueError:
        tokenizer = None
    if trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        for mod in model.modules():
            if isinstance(mod, LowRankLinear):
                for p in mod.parameters():
                    p.requires_grad_(True)
        model.train()
    return model, tokenizer


@torch.no_grad()
def merge_low_rank(compressed: nn.Module, dense: nn.Module) -> nn.Module:
    """Copy ``A B`` (and the bias) of every ``LowRankLinear`` of ``compressed`` into the same-named module of
    ``dense`` (a freshly loaded base model of the same architecture), in its own layout (``Conv1D`` stores
    ``Wᵀ``). Returns ``dense``, whose outputs then equal ``compressed``'s up to float rounding."""
    for name, mod in compressed.named_modules():
        if not isinstance(mod, LowRankLinear):
            continue
        target = dense.get_submodule(name)
        W = (mod.up.weight.double() @ mod.down.weight.double()).to(target.weight.dtype)  # [m, n]
        target.weight.copy_(W.T if weight_is_transposed(target) else W)
        if mod.up.bias is not None:
            target.bias.copy_(mod.up.bias)
    return dense


def export_hf(folder: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write the compressed model at ``folder`` as a plain Hugging Face folder (merged weights + tokenizer).

    The folder is built beside ``out_dir`` and renamed into place, so a failure leaves nothing under ``out_dir``.
    ``lowrank_manifest.json`` in it records where it came from (ranks, method, kept fraction).
    """
    folder, out_dir = Path(folder), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or choose another output folder")
    compressed, tokenizer = load_for_inference(folder, dtype=dtype)
    dense = merge_low_rank(compressed, load_model(_base_manifest(folder), dtype=dtype))
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        dense.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_json(tmp / "lowrank_manifest.json", read_json(folder / MANIFEST))
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir

"""Use a compressed model outside the pipeline: as a transformers model, or as a plain Hugging Face folder.

:func:`load_for_inference` gives the ``transformers`` model with its ``LowRankLinear`` layers (the stored factors,
so the parameter savings are real) and its tokenizer: ``generate``, lm-eval's ``HFLM(pretrained=model)`` and
training loops work on it as on any ``PreTrainedModel``. With ``trainable=True`` the factors ``A``, ``B`` (and
nothing else) require gradients, the usual set-up for fine-tuning a compressed model.

:func:`export_hf` writes a folder that plain ``AutoModelForCausalLM.from_pretrained`` loads with no ``lowrank``
installed. A stock architecture has no low-rank layer, so each factored target is stored merged,
``W' = A B`` (the same function, the dense parameter count); keep the factor folder for the compact form.

:func:`write_lowrank_hf` writes the compact form as a self-contained folder (:mod:`lowrank.hf_format`: factors,
tokenizer, ``generation_config.json``, :func:`model_card`) that ``import lowrank`` + ``from_pretrained`` loads;
:func:`export_folder` copies such a folder (or a stage folder) out of a results tree, as it is or merged, and
``lowrank export SRC DEST [--merged] [--dtype D]`` (lowrank.cli) is its command-line hook.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import MANIFEST, load_compressed
from .factorized import LowRankLinear
from .hf_format import register, save_hf_folder
from .io import read_json, write_json
from .model import load_model, load_tokenizer, weight_is_transposed
from .quantized_linear import QuantizedLinear
from .runtime import parse_dtype

__all__ = ["load_for_inference", "merge_low_rank", "export_hf", "write_lowrank_hf", "is_lowrank_hf", "export_folder",
           "model_card"]


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


# ---- self-contained lowrank folders (lowrank.hf_format) --------------------------------------------------------


def write_lowrank_hf(folder: str | os.PathLike, out_dir: str | os.PathLike, card: str | None = None,
                     provenance: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write the compressed model at ``folder`` (a stage, ``final/`` or ``rehab/`` folder) as a self-contained
    lowrank HF folder (:func:`lowrank.hf_format.save_hf_folder`): the factors, not ``A B``, plus the tokenizer
    (when the base model has one), ``generation_config.json`` and ``card`` as ``README.md``."""
    model, tokenizer = load_for_inference(folder, dtype=dtype)
    manifest = read_json(Path(folder) / MANIFEST)
    info = {k: manifest[k] for k in ("method", "ratio", "stage", "recipe") if k in manifest}
    return save_hf_folder(model, out_dir, tokenizer=tokenizer, card=card, provenance={**info, **(provenance or {})})


def is_lowrank_hf(folder: str | os.PathLike) -> bool:
    """True for a folder whose ``config.json`` carries ``quantization_config.quant_method == "lowrank"``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    return (read_json(path).get("quantization_config") or {}).get("quant_method") == "lowrank"


def _merge_into_stock(model: nn.Module) -> nn.Module:
    """A stock model of ``model``'s architecture (no quantization_config) holding ``model``'s function with every
    factored (or int8) target merged to a dense ``W'``."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dense = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype).eval()
    replaced = {n for n, m in model.named_modules() if isinstance(m, (LowRankLinear, QuantizedLinear))}
    state = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in replaced)}
    dense.load_state_dict(state, strict=False)
    merge_low_rank(model, dense)
    with torch.no_grad():
        for name in replaced:
            mod = model.get_submodule(name)
            if isinstance(mod, QuantizedLinear):
                target = dense.get_submodule(name)
                W = mod.dense_weight(target.weight.dtype)
                target.weight.copy_(W.T if weight_is_transposed(target) else W)
                if mod.bias is not None:
                    target.bias.copy_(mod.bias)
    return dense


def export_folder(src: str | os.PathLike, out_dir: str | os.PathLike, merged: bool = False,
                  dtype: torch.dtype | str = torch.float32) -> Path:
    """Copy a compressed model out of a results tree into ``out_dir``, atomically.

    ``src`` is a lowrank HF folder (copied as it is, or merged) or a pipeline stage folder with ``manifest.json``
    (written as a lowrank HF folder, or merged). ``merged=True`` writes a plain folder with ``W' = A B`` at the
    dense size, for tools that know no factors (no ``lowrank`` needed to load it). ``dtype``: a torch dtype or its
    config name (``float32``, ``bfloat16``, ``float16``).
    """
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    src, out_dir = Path(src), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or choose another output folder")
    if is_lowrank_hf(src):
        if not merged:
            tmp = out_dir.with_name(f".{out_dir.name}.tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            try:
                shutil.copytree(src, tmp)
                os.replace(tmp, out_dir)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
            return out_dir
        from transformers import AutoModelForCausalLM, AutoTokenizer

        register()
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(src)) if (src / "tokenizer_config.json").is_file() else None
        dense = _merge_into_stock(model)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            dense.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            write_json(tmp / "lowrank_manifest.json", model.config.quantization_config.to_dict())
            os.replace(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return out_dir
    if not (src / MANIFEST).is_file():
        raise ValueError(f"{src} is neither a lowrank HF folder (config.json with quant_method 'lowrank') nor a "
                         f"stage folder with {MANIFEST}; pass results/<model>/<method>/<ratio>/hf or a stage folder")
    if merged:
        return export_hf(src, out_dir, dtype=dtype)
    return write_lowrank_hf(src, out_dir, dtype=dtype)


def model_card(base_model: str, method: str, recipe: dict[str, Any], kept_fraction: float,
               calibration: dict[str, Any], command: str, ppl: dict[str, Any] | None = None,
               dense_ppl: float | None = None, architecture: str | None = None) -> str:
    """The ``README.md`` of a lowrank folder: base model, recipe, kept fraction of the target parameters,
    calibration text, held-out perplexity (with the dense reference) and the command that made it."""
    import yaml

    front = {"library_name": "transformers", "tags": ["lowrank", "svd", "compressed", method],
             "base_model_relation": "quantized"}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {base_model}, {method}, kept {kept_fraction:.2f}", "",
             f"Low-rank (SVD) compression of `{base_model}`" + (f" ({architecture})" if architecture else "")
             + f" by the `{method}` recipe of lowrank: every factored linear is stored as "
             "two factors `W' = A B` and runs as two matmuls.", "",
             "| | |", "|---|---|",
             f"| base model | `{base_model}` |",
             f"| method | `{method}`: " + ", ".join(f"{k} `{v}`" for k, v in recipe.items()) + " |",
             f"| kept fraction of the target parameters | {kept_fraction:.4f} |"]
    if ppl is not None:
        lines.append(f"| held-out perplexity | {ppl['ppl']:.4f} ({ppl.get('windows')} windows of "
                     f"{ppl.get('seq_len')} tokens" + (f"; dense {dense_ppl:.4f}" if dense_ppl is not None else "")
                     + ") |")
        if "total_params" in ppl:
            lines.append(f"| parameters | {ppl['total_params']:,} |")
    cal = calibration.get("corpus", {})
    lines += [f"| calibration text | {cal.get('kind', '?')}: "
              + ", ".join(f"{k} `{v}`" for k, v in cal.items() if k != "kind")
              + f"; {calibration.get('n_samples')} windows of {calibration.get('seq_len')} tokens, "
              f"seed {calibration.get('seed')} |", "",
              "## Load", "", "```python", "import lowrank  # registers quant_method 'lowrank' with transformers",
              "from transformers import AutoModelForCausalLM", "",
              "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")", "```", "",
              "Without `import lowrank` loading refuses (a size mismatch on the guard key): the stock classes have "
              "no factored layers. `lowrank export SRC DEST --merged` writes a plain dense folder instead.", "",
              "## Made by", "", "```bash", command, "```", ""]
    return "\n".join(lines)

"""A compressed model as a self-contained Hugging Face folder, loaded by ``AutoModelForCausalLM.from_pretrained``.

The folder holds the base architecture's ``config.json`` plus ``quantization_config``::

    {"quant_method": "lowrank", "format": "lowrank-hf/1", "guard": "<target>.weight",
     "modules": {"<target>": {"in": n, "out": m, "rank": k, "bias": true|false,
                              "int8_rows": {"down": q_B, "up": q_A} | {"weight": q_W}   (int8 layouts only)}}}

and ``model.safetensors`` with the state dict of the compressed model: for a factored target ``W' = A B``
(``A ∈ R^{m×k}``, ``B ∈ R^{k×n}``) the keys ``<target>.down.weight`` (``B``), ``<target>.up.weight`` (``A``)
and ``<target>.up.bias``; for an int8 target its packed rows (``mask``, ``q``, ``scale``, ``f``; see
:mod:`lowrank.quantized_linear`); every other tensor dense, as in the base model. ``k (m + n)`` parameters per
factored target are stored, never ``m n``.

Loading: :class:`LowRankHfQuantizer` (registered under ``quant_method: "lowrank"`` when ``lowrank`` is imported)
swaps ``LowRankLinear`` / ``QuantizedLinear`` skeletons of the recorded shapes into the model while it is still on
the meta device, so transformers loads the factors straight into them: the dense matrices are never allocated.

Refusal without ``lowrank``: stock transformers only warns on an unknown ``quant_method`` and would load the rest,
random-initialising every missing dense ``weight``. The folder therefore also stores a one-element tensor under
``guard`` (the ``weight`` key of one replaced target); a stock model expects an ``m×n`` matrix there, so the size
mismatch makes ``from_pretrained`` raise. With ``lowrank`` the key names no parameter and is ignored.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .factorized import LowRankLinear
from .model import get_module, linear_weight, replace_module
from .quantized_linear import QuantizedLinear

__all__ = ["QUANT_METHOD", "HF_FORMAT", "LowRankQuantConfig", "LowRankHfQuantizer", "module_layouts",
           "build_skeleton", "densify_above", "register", "save_hf_folder"]

log = logging.getLogger(__name__)

QUANT_METHOD = "lowrank"
HF_FORMAT = "lowrank-hf/1"


def module_layouts(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Shape of every replaced target of ``model``: ``in`` (n), ``out`` (m), ``rank`` (k, ``None`` for a dense
    int8 target), ``bias``, and for ``QuantizedLinear`` the int8 row count of each stored matrix."""
    layouts: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankLinear):
            layouts[name] = {"in": mod.in_features, "out": mod.out_features, "rank": mod.rank,
                             "bias": mod.up.bias is not None}
        elif isinstance(mod, QuantizedLinear):
            parts = ["weight"] if mod.rank is None else ["down", "up"]
            layouts[name] = {"in": mod.in_features, "out": mod.out_features, "rank": mod.rank,
                             "bias": mod.bias is not None,
                             "int8_rows": {p: int(getattr(mod, p).q.shape[0]) for p in parts}}
    return layouts


def build_skeleton(model: nn.Module, layouts: dict[str, dict[str, Any]]) -> None:
    """Replace each target named in ``layouts`` by an empty ``LowRankLinear`` (or ``QuantizedLinear`` when the
    layout has ``int8_rows``) on the device and in the dtype of the module it replaces (the meta device while
    transformers builds the model), checking the recorded ``in`` / ``out`` against the base module."""
    for name, lay in layouts.items():
        try:
            old = get_module(model, name)
        except AttributeError:
            raise ValueError(f"quantization_config names module {name!r}, which this {type(model).__name__} "
                             "does not have; the folder was written for another architecture") from None
        W = linear_weight(old)
        if tuple(W.shape) != (lay["out"], lay["in"]):
            raise ValueError(f"module {name!r} is {tuple(W.shape)} in this model but {(lay['out'], lay['in'])} in "
                             "quantization_config; the config.json and the weights do not belong together")
        with torch.device(W.device):
            if "int8_rows" in lay:
                new: nn.Module = QuantizedLinear(lay["in"], lay["out"], lay["rank"], lay["int8_rows"],
                                                 bias=lay["bias"])
            else:
                new = LowRankLinear(lay["in"], lay["out"], int(lay["rank"]), bias=lay["bias"], dtype=W.dtype)
        replace_module(model, name, new)


def densify_above(model: nn.Module, max_kept: float) -> list[str]:
    """Replace every ``LowRankLinear`` whose stored fraction ``ρ = k (m + n) / (m n)`` exceeds ``max_kept`` by a
    dense ``nn.Linear`` holding ``W' = A B`` (same function, ``m n`` parameters); returns the replaced names.

    Two matmuls of inner size ``k`` cost ``k (m + n)`` multiply-adds against ``m n`` for one, but each call pays a
    second kernel launch, an intermediate activation and, for ranks that are no multiple of the SIMD width, less
    efficient GEMM blocking; near the break-even rank ``r* = m n / (m + n)`` (``ρ`` near 1) the two matmuls are then
    slower than one. For inference only: the model then no longer saves as the folder it was loaded from.
    """
    if not 0 < max_kept <= 1:
        raise ValueError(f"max_kept must be in (0, 1], got {max_kept}; 0.9 keeps matrices with rho > 0.9 dense")
    done = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LowRankLinear):
            rho = mod.rank * (mod.in_features + mod.out_features) / (mod.in_features * mod.out_features)
            if rho > max_kept:
                replace_module(model, name, mod.to_dense())
                done.append(name)
    return done


def guard_key(layouts: dict[str, dict[str, Any]]) -> str | None:
    """The dense ``weight`` key that carries the one-element guard tensor (none when nothing is replaced: the
    folder is then a plain dense model, which stock transformers loads correctly)."""
    return f"{min(layouts)}.weight" if layouts else None


class LowRankQuantConfig(QuantizationConfigMixin):
    """``quantization_config`` of a lowrank folder: the layout of every replaced target (see the module doc)."""

    def __init__(self, modules: dict[str, dict[str, Any]] | None = None, format: str = HF_FORMAT,
                 guard: str | None = None, provenance: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format = format
        self.modules = dict(modules or {})
        self.guard = guard if guard is not None else guard_key(self.modules)
        self.provenance = dict(provenance or {})
        if format != HF_FORMAT:
            raise ValueError(f"quantization_config.format {format!r} is not {HF_FORMAT!r}; this lowrank reads "
                             f"{HF_FORMAT} folders only (upgrade lowrank to read a newer folder)")

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format": self.format, "guard": self.guard,
                "provenance": dict(self.provenance), "modules": {k: dict(v) for k, v in self.modules.items()}}


class LowRankHfQuantizer(HfQuantizer):
    """Loads a lowrank folder: skeletons before the weights, the guard key ignored, the guard written on save."""

    requires_calibration = True  # a folder written by lowrank only: no on-the-fly factorisation in from_pretrained

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        build_skeleton(model, self.quantization_config.modules)
        guard = self.quantization_config.guard
        if guard:
            ignore = set(model._keys_to_ignore_on_load_unexpected or [])
            model._keys_to_ignore_on_load_unexpected = ignore | {rf"^{guard.replace('.', '[.]')}$"}
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        state = dict(model.state_dict())
        guard = self.quantization_config.guard
        if guard:
            state[guard] = torch.zeros(1, dtype=torch.float32)
        return state, {"lowrank_format": HF_FORMAT}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


_REGISTERED = False


def register() -> None:
    """Register ``quant_method: "lowrank"`` with transformers (idempotent; ``import lowrank`` calls it as soon as
    ``transformers.quantizers.auto`` is imported)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(LowRankQuantConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(LowRankHfQuantizer)
    _REGISTERED = True


def save_hf_folder(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, card: str | None = None,
                   provenance: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (a transformers model with ``LowRankLinear`` / ``QuantizedLinear`` targets) as a lowrank HF
    folder: ``config.json`` (+ ``quantization_config``), ``model.safetensors``, ``generation_config.json``, the
    tokenizer files when ``tokenizer`` is given, and ``README.md`` = ``card`` when given.

    ``dtype`` casts the floating parameters before saving (int8 / float16 rows of ``QuantizedLinear`` keep theirs).
    The folder is built beside ``out_dir`` and renamed into place: a failure leaves nothing under ``out_dir``.
    """
    register()
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or choose another output folder")
    if dtype is not None:
        model = model.to(dtype)
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name!r} holds non-finite values; refusing to write {out_dir}")
    config = LowRankQuantConfig(module_layouts(model), provenance=provenance)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    had_config = getattr(model.config, "quantization_config", None)
    model.config.quantization_config = config
    model.hf_quantizer = LowRankHfQuantizer(config, pre_quantized=True)
    try:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if card is not None:
            (tmp / "README.md").write_text(card)
        os.replace(tmp, out_dir)
    finally:
        del model.hf_quantizer
        if had_config is None:
            del model.config.quantization_config
        else:
            model.config.quantization_config = had_config
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


register()  # a direct `import lowrank.hf_format` may have triggered the quantizers import itself

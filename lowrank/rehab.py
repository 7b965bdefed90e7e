"""Rehab: a short fine-tune of the low-rank factors of a compressed model (after truncation / correction).

Every :class:`lowrank.factorized.LowRankLinear` ``y = A (B x) + b`` trains its factors ``A`` (up) and ``B`` (down)
on the token-mean next-token CE of calibration windows; biases, dense targets, norms and embeddings stay frozen.
The factorisation (ranks) is unchanged, so the stored size is that of the compressed model. This is the plain
form of SVD-LLM's "sequential low-rank approximation" (LoRA on the factors, then merged): training the factors
directly reaches the same family of models without adapter bookkeeping (method note §2.6).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .factorized import LowRankLinear
from .finetune import TrainResult, train

__all__ = ["RehabConfig", "factor_parameters", "rehab"]


@dataclass(frozen=True)
class RehabConfig:
    """A recipe's ``rehab`` section: ``steps`` (0 = no rehab) of ``optimizer`` at learning rate ``lr`` on
    ``batch_size`` calibration windows per step (order seeded by ``seed``), a checkpoint every
    ``checkpoint_every`` steps."""

    steps: int = 0
    lr: float = 1e-4
    batch_size: int = 4
    optimizer: str = "adam"
    seed: int = 0
    checkpoint_every: int = 25


def factor_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{"<target>.down.weight": B, "<target>.up.weight": A}`` of every factored target, in module order."""
    out: dict[str, nn.Parameter] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankLinear):
            out[f"{name}.down.weight"] = mod.down.weight
            out[f"{name}.up.weight"] = mod.up.weight
    if not out:
        raise ValueError("rehab found no low-rank factors in the model: it runs after truncation (a method whose "
                         "allocation left every target dense has nothing to fine-tune)")
    return out


def rehab(model: nn.Module, windows: torch.Tensor, steps: int, lr: float, batch_size: int = 4,
          optimizer: str = "adam", seed: int = 0, device: torch.device | str = "cpu",
          checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 0,
          stop_after: int | None = None) -> TrainResult:
    """Fine-tune the factors in place for ``steps`` steps; returns the CE history."""
    return train(model, factor_parameters(model), windows, steps=steps, batch_size=batch_size, lr=lr,
                 optimizer=optimizer, seed=seed, device=device, checkpoint=checkpoint,
                 checkpoint_every=checkpoint_every, settings={"kind": "rehab"}, desc="rehab", stop_after=stop_after)

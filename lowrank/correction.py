"""Projected correction (ZS-SVD): one first-order-optimal step back toward the teacher, then re-truncation.

After truncation ``W → W_k`` the residual ``δ = W_T − W_k`` (teacher minus compressed) is replaced by the
minimum-norm perturbation with the same first-order effect on the calibration loss,

    ΔW' = (⟨g, δ⟩ / ⟨g, g⟩) · g,     g = ∂L/∂W at W_k,

and ``W_k + ΔW'`` is truncated again to rank ``k`` in the same whitened space. Because pretrained gradients
are close to low rank, the re-truncation keeps most of the step. The gradients of all targets come from one
backward pass per calibration batch (:func:`lowrank.gradients.calibration_gradients`), at the compressed
weights. When moving toward the teacher lowers the loss (``⟨g, δ⟩ < 0``) the step is a gradient-descent step of
length ``|⟨g, δ⟩| / ‖g‖``; it is never scaled by a learning rate.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .factorized import LowRankLinear
from .gradients import calibration_gradients
from .model import Target, replace_module
from .runtime import progress
from .truncation import truncate

__all__ = ["projected_step", "correct_model"]


def projected_step(W_k: torch.Tensor, W_T: torch.Tensor, g: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """``W_k + (⟨g, W_T − W_k⟩ / ⟨g, g⟩) g`` in float64 (``W_k`` unchanged when ``g`` vanishes)."""
    W_k, W_T, g = (t.to(torch.float64) for t in (W_k, W_T, g))
    gg = float((g * g).sum())
    if gg <= eps:
        return W_k.clone()
    alpha = float((g * (W_T - W_k)).sum()) / gg
    return W_k + alpha * g


@torch.no_grad()
def _densify(model: nn.Module, names: list[str]) -> dict[str, int]:
    ranks = {}
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, LowRankLinear):
            ranks[name] = mod.rank
            replace_module(model, name, mod.to_dense())
    return ranks


def correct_model(model: nn.Module, teacher: dict[str, torch.Tensor], targets: list[Target],
                  windows: torch.Tensor, batch_size: int,
                  input_factor: Callable[[str], torch.Tensor | None],
                  device: torch.device | str = "cpu") -> tuple[dict[str, dict[str, float]], float]:
    """One projected correction of every factored target of ``model`` (in place), re-truncated to its rank.

    ``teacher[name]`` is the dense teacher weight ``W_T`` (m×n); ``input_factor(name)`` returns the whitening
    factor ``S`` used for re-truncation (``None`` for plain SVD). Returns per-target diagnostics: the step
    coefficient ``alpha`` and the predicted first-order loss change ``⟨g, ΔW'⟩ = ⟨g, δ⟩``; and the calibration
    loss at the compressed weights (before the step) over ``windows``.
    """
    names = [t.name for t in targets]
    ranks = _densify(model, names)
    grads = calibration_gradients(model, windows, batch_size, device,
                                  targets=[t for t in targets if t.name in ranks])
    report: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for t in progress([t for t in targets if t.name in ranks], desc="correct"):
            mod = model.get_submodule(t.name)
            W_k = mod.weight.detach()
            # G is on the CPU and the teacher wherever it was loaded: bring both to the weight's device
            g = grads.G[t.name].to(W_k.device)
            W_T = teacher[t.name].to(W_k.device)
            W_new = projected_step(W_k, W_T, g)
            S = input_factor(t.name)
            f = truncate(W_new.to(device), ranks[t.name], None if S is None else S.to(device))
            bias = mod.bias.detach() if mod.bias is not None else None
            new = LowRankLinear.from_factors(f.A, f.B, bias, dtype=W_k.dtype)
            replace_module(model, t.name, new.to(W_k.device))
            delta = W_T.to(torch.float64) - W_k.to(torch.float64)
            gg = float((g * g).sum())
            report[t.name] = {"alpha": float((g * delta).sum()) / gg if gg > 0 else 0.0,
                              "predicted_delta_loss": float((g * delta).sum())}
    return report, grads.loss

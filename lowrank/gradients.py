"""Calibration-loss gradients of every target weight from ONE backward pass per batch.

The calibration loss is the token-mean next-token cross-entropy over all calibration windows,
``L = (1/N) Σ_t CE_t``. Each batch ``b`` contributes ``(N_b/N) ∂L_b/∂W`` with ``L_b`` its own token mean, so the
accumulated ``G = ∂L/∂W`` (float64) is exact for any batch size. Gradients of all targets come from one
``torch.autograd.grad`` call per batch (the ZS-SVD reference code runs one backward per module, 224× the work
on LLaMA-7B). Optionally the per-batch squared gradients ``Σ_b (∂L_b/∂W)²`` are accumulated as well (empirical
Fisher, FWSVD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .model import Target, find_targets, weight_is_transposed
from .runtime import progress

__all__ = ["TargetGradients", "calibration_gradients", "causal_lm_loss", "calibration_loss"]


@dataclass
class TargetGradients:
    """``G[name] = ∂L/∂W`` (m×n, float64, ``y = W x`` orientation), optional ``fisher[name]``, and ``N``;
    ``components[name]``: per-component statistics (:class:`lowrank.scoring.ComponentStats`) when a probe ran."""

    G: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor] | None
    tokens: int
    loss: float
    components: dict[str, Any] | None = None


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Token-mean next-token cross-entropy of ``batch`` (LongTensor[b, T]) and the number of predictions."""
    logits = model(input_ids=batch, use_cache=False).logits  # [b, T, V]
    # at least float32 (half-precision logits are upcast), never below the model's dtype (float64 stays float64)
    pred = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.shape[-1])
    target = batch[:, 1:].reshape(-1)
    return F.cross_entropy(pred, target), target.numel()


def calibration_gradients(model: nn.Module, windows: torch.Tensor, batch_size: int,
                          device: torch.device | str = "cpu", targets: list[Target] | None = None,
                          fisher: bool | str = False, streamed: bool = True, offload: str = "auto",
                          need_G: bool = True) -> TargetGradients:
    """``∂L/∂W`` for every target over all ``windows``, one forward + one backward per batch.

    ``streamed`` (default): block by block, one block resident on ``device`` at a time
    (:func:`lowrank.streaming.streamed_gradients`; ``offload`` says where the boundary activations live).
    Otherwise the whole model runs on ``device`` with one ``autograd.grad`` per batch. Both give the same
    gradients up to floating-point summation order. ``fisher``: ``False``/``"none"``, ``True``/``"full"``
    (m×n ``Σ_b g_b²``) or ``"columns"`` (n-vector ``Σ_b Σ_i g_b²``, all FWSVD needs); ``need_G=False`` skips
    ``G`` (Fisher only).
    """
    if streamed:
        from .streaming import streamed_gradients

        return streamed_gradients(model, windows, batch_size, device, targets=targets, fisher=fisher,
                                  need_G=need_G, offload=offload)
    mode = "full" if fisher is True else ("none" if fisher is False else str(fisher))
    if mode not in ("none", "full", "columns"):
        raise ValueError(f"fisher must be 'none', 'full' or 'columns', got {fisher!r}")
    targets = targets or find_targets(model)
    modules = [model.get_submodule(t.name) for t in targets]
    weights = [m.weight for m in modules]
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deterministic model
    total = (windows.shape[0]) * (windows.shape[1] - 1)
    G = {t.name: torch.zeros(t.shape.m, t.shape.n, dtype=torch.float64) for t in targets} if need_G else {}
    Fi = None if mode == "none" else {
        t.name: torch.zeros(*((t.shape.m, t.shape.n) if mode == "full" else (t.shape.n,)), dtype=torch.float64)
        for t in targets}
    loss_sum = 0.0
    try:
        starts = range(0, windows.shape[0], batch_size)
        for s in progress(starts, desc="gradients", total=len(starts)):
            batch = windows[s : s + batch_size].to(device)
            loss, n_b = causal_lm_loss(model, batch)
            grads = torch.autograd.grad(loss, weights)
            loss_sum += float(loss.detach()) * n_b
            for t, mod, g in zip(targets, modules, grads):
                g = g.detach().T if weight_is_transposed(mod) else g.detach()
                g64 = g.to("cpu", torch.float64)
                if need_G:
                    G[t.name].add_(g64, alpha=n_b / total)
                if Fi is not None:
                    Fi[t.name].add_(g64.square() if mode == "full" else g64.square().sum(dim=0))
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    return TargetGradients(G=G, fisher=Fi, tokens=total, loss=loss_sum / total)


@torch.no_grad()
def calibration_loss(model: nn.Module, windows: torch.Tensor, batch_size: int,
                     device: torch.device | str = "cpu") -> float:
    """Token-mean next-token cross-entropy over ``windows`` (no gradients)."""
    total, count = 0.0, 0
    for s in range(0, windows.shape[0], batch_size):
        loss, n = causal_lm_loss(model, windows[s : s + batch_size].to(device))
        total += float(loss) * n
        count += n
    return total / count

"""Per-component scores of every target's (whitened) singular components; ratio-independent.

Every target is decomposed in its method's space (:mod:`lowrank.spaces`): ``W S = U Σ Vᵀ``. Scorers:

* ``sigma``: the singular values ``σ_i`` themselves (plain SVD with ``S = I``; SVD-LLM with the input whitening,
  where ``σ_i²`` is exactly the calibration output energy of component ``i``). Used for the spectra and by the
  uniform allocator, which does not need them to choose ranks.
* ``first_order`` (ZS-SVD): the predicted change of the calibration loss when component ``i`` is removed,
  ``ΔL_i = −σ_i · u_iᵀ H v_i`` with ``H = ∂L/∂(W S) = G S^{-T}`` the gradient in whitened coordinates
  (``G = ∂L/∂W`` from one backward pass per calibration batch; ``S^{-T}`` applied by a triangular solve).
  ``ΔL_i > 0``: removing ``i`` is predicted to raise the loss.

In a two-sided space (IO-SVD, ``B = Tᵀ W S``) every scorer runs on ``W' = Tᵀ W`` with gradient
``G' = ∂L/∂W' = T^{-1} G``, so ``first_order`` gives ``g_i = u_iᵀ T^{-1} G S^{-T} v_i`` and ``ΔL_i = −σ_i g_i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .decompose import singular_values, thin_svd
from .gradients import TargetGradients
from .model import Target, linear_weight
from .runtime import progress
from .spaces import input_factor, output_factor
from .whitening import output_gradient, whiten, whiten_left

__all__ = ["Scorer", "SCORERS", "whitened_gradient", "first_order_delta", "score_targets"]


def whitened_gradient(G: torch.Tensor, S: torch.Tensor | None) -> torch.Tensor:
    """``H = G S^{-T}`` (the gradient w.r.t. ``W S``), by solving ``H Sᵀ = G``; ``G`` itself when ``S = I``."""
    if S is None:
        return G.to(torch.float64)
    return torch.linalg.solve_triangular(S.T, G.to(S.dtype), upper=True, left=False)


def first_order_delta(W: torch.Tensor, S: torch.Tensor | None, G: torch.Tensor, method: str = "svd"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σ, ΔL)`` with ``ΔL_i = −σ_i · (Uᵀ H V)_ii`` for ``W S = U Σ Vᵀ``, ``H = G S^{-T}``.

    ``method``: how ``W S`` is decomposed (:func:`lowrank.decompose.thin_svd`: ``svd`` or ``eigh``)."""
    A = W.to(torch.float64) if S is None else whiten(W.to(torch.float64), S)
    U, sigma, Vh = thin_svd(A, method)  # U [m, r], Vh [r, n]
    H = whitened_gradient(G, S)  # [m, n]
    g_sigma = ((U.T @ H) * Vh).sum(dim=1)  # diag(Uᵀ H V), [r]
    return sigma, -sigma * g_sigma


@dataclass(frozen=True)
class Scorer:
    """``fn(W, S, G) -> (σ, score)``; ``needs_gradients`` says whether ``G`` must be computed."""

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # fn(W, S, G, method="svd"|"eigh")
    needs_gradients: bool
    description: str


def _sigma(W: torch.Tensor, S: torch.Tensor | None, G: torch.Tensor | None, method: str = "svd"
           ) -> tuple[torch.Tensor, torch.Tensor]:
    A = W.to(torch.float64) if S is None else whiten(W.to(torch.float64), S)
    sigma = singular_values(A, method)
    return sigma, sigma.clone()


def _first_order(W: torch.Tensor, S: torch.Tensor | None, G: torch.Tensor | None, method: str = "svd"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    if G is None:
        raise ValueError("scorer first_order needs calibration gradients")
    return first_order_delta(W, S, G, method)


SCORERS: dict[str, Scorer] = {
    "sigma": Scorer(_sigma, False, "singular values of W S"),
    "first_order": Scorer(_first_order, True, "first-order loss change of removing each component (ZS-SVD)"),
}


@torch.no_grad()
def score_targets(model: nn.Module, targets: list[Target], scorer: str, whitening: str, stats: dict[str, Any],
                  damping: float = 1e-6, device: torch.device | str = "cpu",
                  gradients: TargetGradients | None = None, decomposition: str = "svd"
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """``{target: {"sigma": σ, "score": s}}`` (float64, σ descending) for every target.

    ``decomposition``: ``svd`` or ``eigh`` (:mod:`lowrank.decompose`)."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {sorted(SCORERS)}")
    sc = SCORERS[scorer]
    if sc.needs_gradients and gradients is None:
        raise ValueError(f"scorer {scorer!r} needs calibration gradients")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for t in progress(targets, desc=f"score {scorer}/{whitening}"):
        W = linear_weight(model.get_submodule(t.name)).detach().to(device)
        S = input_factor(whitening, t.name, stats, damping, device)
        G = gradients.G[t.name].to(device) if gradients is not None else None
        T = output_factor(whitening, t.name, stats, device)
        if T is not None:  # two-sided space: output coordinates W' = Tᵀ W, G' = T^{-1} G
            W, G = whiten_left(W.to(torch.float64), T), None if G is None else output_gradient(G, T)
        sigma, score = sc.fn(W, S, G, method=decomposition)
        out[t.name] = {"sigma": sigma.cpu(), "score": score.cpu()}
    return out

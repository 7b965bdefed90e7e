"""Truncation: rank-k factors ``W ≈ A B`` of each target, plain or with truncation-aware whitening.

Plain SVD: ``W = U Σ Vᵀ``, ``A = U_k Σ_k^{1/2}``, ``B = Σ_k^{1/2} V_kᵀ``; minimises ``‖W − A B‖_F``.

Whitened (SVD-LLM): with ``S Sᵀ = C`` the damped input second moment, ``W S = U Σ Vᵀ``,
``A = U_k Σ_k^{1/2}`` and ``B = Σ_k^{1/2} V_kᵀ S⁻¹`` (a triangular solve). Then
``‖(W − A B) S‖²_F = Σ_{i>k} σ_i²`` (Eckart-Young in the whitened metric), i.e. the expected squared output
error per calibration token is exactly the discarded whitened energy.

Two-sided (IO-SVD): with ``T Tᵀ`` the damped output metric, ``Tᵀ W S = U Σ Vᵀ``, ``A = T^{-T} U_k Σ_k^{1/2}`` and
``B = Σ_k^{1/2} V_kᵀ S⁻¹`` (two triangular solves); ``‖Tᵀ (W − A B) S‖²_F = Σ_{i>k} σ_i²``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .decompose import thin_svd
from .factorized import LowRankLinear
from .model import Target, linear_bias, linear_weight, replace_module
from .runtime import progress
from .spaces import SPACES, input_factor, output_factor
from .whitening import unwhiten_left, unwhiten_right, whiten, whiten_left

__all__ = ["Factors", "truncate", "truncate_model"]


@dataclass
class Factors:
    """``A`` (m×k), ``B`` (k×n) with ``W' = A B``; ``sigma`` the full (whitened) spectrum it was cut from."""

    A: torch.Tensor
    B: torch.Tensor
    sigma: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def discarded_energy(self) -> float:
        """``Σ_{i>k} σ_i²``: the squared (whitened) Frobenius error of the truncation."""
        return float((self.sigma[self.rank :].double() ** 2).sum())


def truncate(W: torch.Tensor, k: int, S: torch.Tensor | None = None, T: torch.Tensor | None = None,
             method: str = "svd") -> Factors:
    """Rank-``k`` factors of ``W`` (m×n), in float64; whitened by lower-triangular ``S`` (input side) and ``T``
    (output side, ``B = Tᵀ W S``) when given.

    ``method``: how ``B`` is decomposed (:func:`lowrank.decompose.thin_svd`: ``svd`` or ``eigh``)."""
    m, n = W.shape
    if not (1 <= k <= min(m, n)):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}x{n} matrix, got {k}")
    W64 = W.to(torch.float64)
    if T is not None:
        W64 = whiten_left(W64, T.to(W64.device))  # Tᵀ W
    B_w = W64 if S is None else whiten(W64, S.to(W64.device))  # [m, n]
    U, sigma, Vh = thin_svd(B_w, method)
    root = sigma[:k].sqrt()
    A = U[:, :k] * root  # [m, k]
    Bk = root[:, None] * Vh[:k]  # [k, n]
    if S is not None:
        Bk = unwhiten_right(Bk, S.to(W64.device))  # Σ_k^{1/2} V_kᵀ S⁻¹
    if T is not None:
        A = unwhiten_left(A, T.to(W64.device))  # T^{-T} U_k Σ_k^{1/2}
    return Factors(A=A, B=Bk, sigma=sigma)


@torch.no_grad()
def truncate_model(model: nn.Module, targets: list[Target], ranks: dict[str, int | None], whitening: str,
                   stats: dict[str, Any] | None = None, damping: float = 1e-6, device: torch.device | str = "cpu",
                   decomposition: str = "svd") -> dict[str, dict[str, Any]]:
    """Replace every target with a rank in ``ranks`` by a ``LowRankLinear``, in place.

    ``whitening`` names the space (:data:`lowrank.spaces.SPACES`) and ``stats`` holds the statistics it reads.
    Returns per-target diagnostics: rank and relative (whitened) error ``Σ_{i>k}σ²/Σσ²``.
    """
    if whitening not in SPACES:
        raise ValueError(f"unknown whitening {whitening!r}; choose one of {sorted(SPACES)}")
    stats = stats or {}
    report: dict[str, dict[str, Any]] = {}
    for t in progress(targets, desc="truncate"):
        k = ranks.get(t.name)
        if k is None:
            report[t.name] = {"rank": None}
            continue
        mod = model.get_submodule(t.name)
        W = linear_weight(mod).detach()
        S = input_factor(whitening, t.name, stats, damping, device)
        f = truncate(W.to(device), k, S, output_factor(whitening, t.name, stats, device), method=decomposition)
        bias = linear_bias(mod)
        new = LowRankLinear.from_factors(f.A, f.B, None if bias is None else bias.detach(), dtype=W.dtype)
        replace_module(model, t.name, new.to(W.device))
        total = float((f.sigma.double() ** 2).sum())
        report[t.name] = {"rank": k, "relative_error": f.discarded_energy() / total if total > 0 else 0.0}
    return report

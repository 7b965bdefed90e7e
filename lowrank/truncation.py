"""Truncation: rank-k factors ``W ≈ A B`` of each target, plain or with truncation-aware whitening.

Plain SVD: ``W = U Σ Vᵀ``, ``A = U_k Σ_k^{1/2}``, ``B = Σ_k^{1/2} V_kᵀ``; minimises ``‖W − A B‖_F``.

Whitened (SVD-LLM): with ``S Sᵀ = C`` the damped input second moment, ``W S = U Σ Vᵀ``,
``A = U_k Σ_k^{1/2}`` and ``B = Σ_k^{1/2} V_kᵀ S⁻¹`` (a triangular solve). Then
``‖(W − A B) S‖²_F = Σ_{i>k} σ_i²`` (Eckart-Young in the whitened metric), i.e. the expected squared output
error per calibration token is exactly the discarded whitened energy.

Two-sided (IO-SVD): with ``T Tᵀ`` the damped output metric, ``Tᵀ W S = U Σ Vᵀ``, ``A = T^{-T} U_k Σ_k^{1/2}`` and
``B = Σ_k^{1/2} V_kᵀ S⁻¹`` (two triangular solves); ``‖Tᵀ (W − A B) S‖²_F = Σ_{i>k} σ_i²``.

The thin SVD of ``Tᵀ W S`` does not depend on ``k``: :func:`decompose_targets` computes it once per model and
space (the pipeline stores it, :mod:`lowrank.decompose`'s ``save_decompositions``) and :func:`factors_from_svd`
cuts any rank from it, so truncation at several budgets and the quantize stage never decompose a weight again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .decompose import ThinSVD, thin_svd
from .factorized import LowRankLinear
from .model import Target, linear_bias, linear_weight, replace_module
from .runtime import progress
from .spaces import SPACES, input_factor, output_factor
from .whitening import unwhiten_left, unwhiten_right, whiten, whiten_left

__all__ = ["Factors", "whitened_svd", "factors_from_svd", "truncate", "truncate_model", "decompose_targets"]


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


def whitened_svd(W: torch.Tensor, S: torch.Tensor | None = None, T: torch.Tensor | None = None,
                 method: str = "svd") -> ThinSVD:
    """Thin SVD ``Tᵀ W S = U Σ Vᵀ`` in float64 (``S``, ``T`` lower-triangular; either may be absent).

    ``method``: how it is decomposed (:func:`lowrank.decompose.thin_svd`: ``svd``, ``eigh`` or ``eigh32``)."""
    W64 = W.to(torch.float64)
    if T is not None:
        W64 = whiten_left(W64, T.to(W64.device))  # Tᵀ W
    B_w = W64 if S is None else whiten(W64, S.to(W64.device))  # [m, n]
    return thin_svd(B_w, method)


def factors_from_svd(svd: ThinSVD, k: int, S: torch.Tensor | None = None, T: torch.Tensor | None = None
                     ) -> Factors:
    """Rank-``k`` factors from the thin SVD of ``Tᵀ W S``: ``A = T^{-T} U_k Σ_k^{1/2}``,
    ``B = Σ_k^{1/2} V_kᵀ S⁻¹`` (float64; the solves are skipped for an absent ``S`` / ``T``)."""
    U, sigma, Vh = (x.to(torch.float64) for x in svd)
    if not (1 <= k <= sigma.numel()):
        raise ValueError(f"rank must be in [1, {sigma.numel()}] for a {U.shape[0]}x{Vh.shape[1]} matrix, got {k}")
    root = sigma[:k].sqrt()
    A = U[:, :k] * root  # [m, k]
    Bk = root[:, None] * Vh[:k]  # [k, n]
    if S is not None:
        Bk = unwhiten_right(Bk, S.to(Bk.device, torch.float64))  # Σ_k^{1/2} V_kᵀ S⁻¹
    if T is not None:
        A = unwhiten_left(A, T.to(A.device, torch.float64))  # T^{-T} U_k Σ_k^{1/2}
    return Factors(A=A, B=Bk, sigma=sigma)


def truncate(W: torch.Tensor, k: int, S: torch.Tensor | None = None, T: torch.Tensor | None = None,
             method: str = "svd", svd: ThinSVD | None = None) -> Factors:
    """Rank-``k`` factors of ``W`` (m×n), in float64; whitened by lower-triangular ``S`` (input side) and ``T``
    (output side, ``B = Tᵀ W S``) when given.

    ``method``: how ``B`` is decomposed (:func:`lowrank.decompose.thin_svd`: ``svd`` or ``eigh``). ``svd``: the
    thin SVD of ``B`` computed before (:func:`whitened_svd`, e.g. read from a stored decomposition) instead."""
    m, n = W.shape
    if not (1 <= k <= min(m, n)):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}x{n} matrix, got {k}")
    if svd is None:
        svd = whitened_svd(W, S, T, method)
    elif svd.U.shape[0] != m or svd.Vh.shape[-1] != n:
        raise ValueError(f"the stored decomposition is of a {svd.U.shape[0]}x{svd.Vh.shape[-1]} matrix, the "
                         f"weight is {m}x{n}: it belongs to another model; rerun its decompose job")
    return factors_from_svd(svd, k, S, T)


@torch.no_grad()
def truncate_model(model: nn.Module, targets: list[Target], ranks: dict[str, int | None], whitening: str,
                   stats: dict[str, Any] | None = None, damping: float = 1e-6, device: torch.device | str = "cpu",
                   decomposition: str = "svd", svds: Mapping[str, ThinSVD] | None = None
                   ) -> dict[str, dict[str, Any]]:
    """Replace every target with a rank in ``ranks`` by a ``LowRankLinear``, in place.

    ``whitening`` names the space (:data:`lowrank.spaces.SPACES`) and ``stats`` holds the statistics it reads.
    ``svds``: the thin SVDs of the targets in that space, computed before (:func:`decompose_targets`); a target
    missing from it is decomposed here. Returns per-target diagnostics: rank and relative (whitened) error
    ``Σ_{i>k}σ²/Σσ²``.
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
        svd = svds[t.name] if svds is not None and t.name in svds else None
        f = truncate(W.to(device), k, S, output_factor(whitening, t.name, stats, device), method=decomposition,
                     svd=svd)
        bias = linear_bias(mod)
        new = LowRankLinear.from_factors(f.A, f.B, None if bias is None else bias.detach(), dtype=W.dtype)
        replace_module(model, t.name, new.to(W.device))
        total = float((f.sigma.double() ** 2).sum())
        report[t.name] = {"rank": k, "relative_error": f.discarded_energy() / total if total > 0 else 0.0}
    return report


@torch.no_grad()
def decompose_targets(model: nn.Module, targets: list[Target], whitening: str, stats: dict[str, Any] | None = None,
                      damping: float = 1e-6, device: torch.device | str = "cpu", decomposition: str = "svd"
                      ) -> dict[str, ThinSVD]:
    """``{target: thin SVD of Tᵀ W S}`` (float64, on the CPU) in the space ``whitening``: what every truncation of
    the targets at any rank cuts from (:func:`factors_from_svd`)."""
    if whitening not in SPACES:
        raise ValueError(f"unknown whitening {whitening!r}; choose one of {sorted(SPACES)}")
    stats = stats or {}
    out: dict[str, ThinSVD] = {}
    for t in progress(targets, desc=f"decompose {whitening}"):
        W = linear_weight(model.get_submodule(t.name)).detach().to(device)
        svd = whitened_svd(W, input_factor(whitening, t.name, stats, damping, device),
                           output_factor(whitening, t.name, stats, device), decomposition)
        out[t.name] = ThinSVD(*(x.cpu() for x in svd))
    return out

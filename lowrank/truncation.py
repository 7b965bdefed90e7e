"""Truncation: rank-k factors ``W ≈ A B`` of each target, plain or with truncation-aware whitening.

Plain SVD: ``W = U Σ Vᵀ``, ``A = U_k Σ_k^{1/2}``, ``B = Σ_k^{1/2} V_kᵀ``; minimises ``‖W − A B‖_F``.

Whitened (SVD-LLM): with ``S Sᵀ = C`` the damped input second moment, ``W S = U Σ Vᵀ``,
``A = U_k Σ_k^{1/2}`` and ``B = Σ_k^{1/2} V_kᵀ S⁻¹`` (a triangular solve). Then
``‖(W − A B) S‖²_F = Σ_{i>k} σ_i²`` (Eckart-Young in the whitened metric), i.e. the expected squared output
error per calibration token is exactly the discarded whitened energy.

Two-sided (IO-SVD): with ``T Tᵀ`` the damped output metric, ``Tᵀ W S = U Σ Vᵀ``, ``A = T^{-T} U_k Σ_k^{1/2}`` and
``B = Σ_k^{1/2} V_kᵀ S⁻¹`` (two triangular solves); ``‖Tᵀ (W − A B) S‖²_F = Σ_{i>k} σ_i²``.

The thin SVD of ``Tᵀ W S`` does not depend on ``k``: :func:`decompose_targets` computes it once per model and
space, in the weight's own coordinates (``W = P_out Σ P_inᵀ``, :func:`unwhitened_directions`; the pipeline stores
it, :mod:`lowrank.decompose`'s ``save_decompositions``), and :func:`factors_from_directions` cuts any rank from it
by a slice and a scaling, so truncation at several budgets and the quantize stage never decompose a weight again.
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
from .spaces import bind
from .whitening import unwhiten_left, unwhiten_right, whiten, whiten_left

__all__ = ["Factors", "whitened_svd", "unwhitened_directions", "factors_from_directions", "truncate",
           "truncate_model", "decompose_targets"]


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


def unwhitened_directions(svd: ThinSVD, S: torch.Tensor | None = None, T: torch.Tensor | None = None,
                          k: int | None = None) -> ThinSVD:
    """The first ``k`` (default all) components of ``Tᵀ W S = U Σ Vᵀ`` in the weight's own coordinates:
    ``(P_out, σ, P_inᵀ)`` with ``P_out = T^{-T} U`` (m×k) and ``P_inᵀ = Vᵀ S⁻¹`` (k×n), so that
    ``W = P_out Σ P_inᵀ`` at full rank (triangular solves, float64; no solve for an absent ``S`` / ``T``)."""
    U, sigma, Vh = (x.to(torch.float64) for x in svd)
    k = sigma.numel() if k is None else k
    P_out, P_in_t = U[:, :k], Vh[:k]
    if S is not None:
        P_in_t = unwhiten_right(P_in_t, S.to(P_in_t.device, torch.float64))
    if T is not None:
        P_out = unwhiten_left(P_out, T.to(P_out.device, torch.float64))
    return ThinSVD(P_out, sigma, P_in_t)


def factors_from_directions(directions: ThinSVD, k: int) -> Factors:
    """Rank-``k`` factors ``A = P_out,k Σ_k^{1/2}``, ``B = Σ_k^{1/2} P_in,kᵀ`` (float64) from the unwhitened
    directions of :func:`unwhitened_directions`; ``sigma`` of the result is the full spectrum."""
    P_out, sigma, P_in_t = directions
    sigma = sigma.to(torch.float64)
    if not (1 <= k <= min(P_out.shape[1], P_in_t.shape[0])):
        raise ValueError(f"rank must be in [1, {min(P_out.shape[1], P_in_t.shape[0])}] for a "
                         f"{P_out.shape[0]}x{P_in_t.shape[1]} matrix with these directions, got {k}")
    root = sigma[:k].sqrt()
    return Factors(A=P_out[:, :k].to(torch.float64) * root, B=root[:, None] * P_in_t[:k].to(torch.float64),
                   sigma=sigma)


def truncate(W: torch.Tensor, k: int, S: torch.Tensor | None = None, T: torch.Tensor | None = None,
             method: str = "svd", directions: ThinSVD | None = None) -> Factors:
    """Rank-``k`` factors of ``W`` (m×n), in float64; whitened by lower-triangular ``S`` (input side) and ``T``
    (output side, ``B = Tᵀ W S``) when given.

    ``method``: how ``B`` is decomposed (:func:`lowrank.decompose.thin_svd`: ``svd`` or ``eigh``).
    ``directions``: the unwhitened directions of ``B``'s components computed before
    (:func:`unwhitened_directions` of :func:`whitened_svd`, e.g. read from a stored decomposition); ``S``, ``T``
    and ``method`` are then not used."""
    m, n = W.shape
    if not (1 <= k <= min(m, n)):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}x{n} matrix, got {k}")
    if directions is None:
        directions = unwhitened_directions(whitened_svd(W, S, T, method), S, T, k)
    elif directions.U.shape[0] != m or directions.Vh.shape[-1] != n:
        raise ValueError(f"the stored decomposition is of a {directions.U.shape[0]}x{directions.Vh.shape[-1]} "
                         f"matrix, the weight is {m}x{n}: it belongs to another model; rerun its decompose job")
    return factors_from_directions(directions, k)


@torch.no_grad()
def truncate_model(model: nn.Module, targets: list[Target], ranks: dict[str, int | None], whitening: str,
                   stats: dict[str, Any] | None = None, damping: float = 1e-6, device: torch.device | str = "cpu",
                   decomposition: str = "svd", directions: Mapping[str, ThinSVD] | None = None
                   ) -> dict[str, dict[str, Any]]:
    """Replace every target with a rank in ``ranks`` by a ``LowRankLinear``, in place.

    ``whitening`` names the space (:data:`lowrank.spaces.SPACES`) and ``stats`` holds the statistics it reads.
    ``directions``: the targets' unwhitened component directions in that space, computed before
    (:func:`decompose_targets`); a target missing from it is decomposed here. Returns per-target diagnostics: rank
    and relative (whitened) error ``Σ_{i>k}σ²/Σσ²``.
    """
    space = bind(whitening, stats, damping, decomposition, device)
    report: dict[str, dict[str, Any]] = {}
    for t in progress(targets, desc="truncate"):
        k = ranks.get(t.name)
        if k is None:
            report[t.name] = {"rank": None}
            continue
        mod = model.get_submodule(t.name)
        W = linear_weight(mod).detach()
        if directions is not None and t.name in directions:  # stored directions: no whitening factor needed
            f = truncate(W.to(device), k, directions=directions[t.name])
        else:
            f = truncate(W.to(device), k, *space.factors(t.name), method=space.decomposition)
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
    """``{target: (P_out, σ, P_inᵀ)}`` (float64, on the CPU): every component of ``Tᵀ W S`` in the space
    ``whitening``, in the weight's own coordinates (:func:`unwhitened_directions`), from which every truncation of
    the target at any rank is a slice and a scaling (:func:`factors_from_directions`)."""
    space = bind(whitening, stats, damping, decomposition, device)
    out: dict[str, ThinSVD] = {}
    for t in progress(targets, desc=f"decompose {whitening}"):
        W = linear_weight(model.get_submodule(t.name)).detach().to(device)
        S, T = space.factors(t.name)
        out[t.name] = ThinSVD(*(x.cpu() for x in unwhitened_directions(whitened_svd(W, S, T, space.decomposition),
                                                                       S, T)))
    return out

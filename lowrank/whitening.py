"""Whitening factors of calibration second moments, and whitening / un-whitening of weights.

For a target ``y = W x`` with calibration inputs ``X ∈ R^{N×n}`` (rows are tokens), the second moment is
``C = XᵀX / N``. A lower-triangular ``S`` with ``S Sᵀ = C + εI`` gives, for any ``W'``,

    ‖(W − W') Xᵀ‖²_F / N  ≈  ‖(W − W') S‖²_F,

so the truncated SVD of the whitened weight ``W S`` is the output-error-optimal low-rank fit (SVD-LLM).
``ε`` is relative to the scale of ``C`` (``ε = damping · tr(C)/n``), not an absolute constant, so it means the
same thing for 4k and 500k calibration tokens. Factors are computed in float64; un-whitening uses triangular
solves, never an explicit inverse.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

__all__ = ["WhiteningFactor", "whitening_factor", "whiten", "unwhiten_right", "whiten_left", "unwhiten_left",
           "output_gradient"]

log = logging.getLogger(__name__)


@dataclass
class WhiteningFactor:
    """``S`` lower triangular with ``S Sᵀ = C + εI`` (or of the eigen-clamped ``C``), and how it was obtained.

    ``method`` is ``"cholesky"`` (first try), ``"jitter"`` (a larger damping on the ladder was needed) or
    ``"eig_clamp"`` (eigenvalues clamped to ``eig_floor · λ_max``, then Cholesky). ``epsilon`` is the absolute
    damping that was added to the diagonal.
    """

    S: torch.Tensor
    method: str
    epsilon: float


def whitening_factor(
    C: torch.Tensor,
    damping: float = 1e-6,
    ladder: int = 4,
    eig_floor: float = 1e-6,
) -> WhiteningFactor:
    """Damped Cholesky of a symmetric PSD matrix ``C`` (n×n), in float64.

    Tries ``ε_j = damping · 10^j · tr(C)/n`` for ``j = 0 .. ladder−1``; if every Cholesky fails (``C`` is not
    positive definite even after damping: e.g. a dead input channel, or fewer tokens than dimensions), clamps
    the eigenvalues of ``(C + Cᵀ)/2`` at ``eig_floor · λ_max`` and factors that. The result is always lower
    triangular, so triangular solves with it are valid (the ZS-SVD code mixes a non-triangular eigen factor with
    triangular solves; we never do).
    """
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"second moment must be square, got shape {tuple(C.shape)}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    A = C.to(torch.float64)
    n0 = A.shape[0]
    if not torch.isfinite(A).all():
        bad = int((~torch.isfinite(A)).sum())
        raise ValueError(f"second moment ({n0}x{n0}) has {bad} non-finite entries: the calibration forward "
                         "produced NaN or inf. Check the source model's weights (the pretrained stage refuses "
                         "non-finite ones) and, if runtime.dtype is float16 or bfloat16, use float32; a float32 "
                         "run that overflows has activations beyond float32's range")
    A = 0.5 * (A + A.T)
    n = A.shape[0]
    scale = float(torch.diagonal(A).mean().clamp_min(torch.finfo(torch.float64).tiny))
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    for j in range(max(1, ladder)):
        eps = damping * (10.0**j) * scale
        S, info = torch.linalg.cholesky_ex(A + eps * eye)
        if int(info) == 0:
            return WhiteningFactor(S=S, method="cholesky" if j == 0 else "jitter", epsilon=eps)
    evals, Q = torch.linalg.eigh(A)
    floor = eig_floor * float(evals.max().clamp_min(scale))
    A2 = (Q * evals.clamp_min(floor)) @ Q.T
    A2 = 0.5 * (A2 + A2.T)
    S, info = torch.linalg.cholesky_ex(A2)
    if int(info) != 0:  # pragma: no cover - an eigen-clamped matrix is PD up to round-off
        raise RuntimeError("whitening failed even after eigenvalue clamping; raise whitening.eig_floor")
    log.warning("second moment (n=%d) not positive definite; eigenvalues clamped at %.3g", n, floor)
    return WhiteningFactor(S=S, method="eig_clamp", epsilon=floor)


def whiten(W: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``W S``: the weight in whitened input coordinates (m×n)."""
    return W.to(S.dtype) @ S


def unwhiten_right(Y: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``Y S⁻¹`` by a triangular solve of ``X S = Y`` (``S`` lower triangular); no inverse is formed."""
    return torch.linalg.solve_triangular(S, Y.to(S.dtype), upper=False, left=False)


# ---- the output side (IO-SVD's two-sided whitening B = Tᵀ W S, with T T ᵀ the damped output metric) ----------


def whiten_left(W: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``Tᵀ W``: the weight in whitened output coordinates (``T`` lower triangular, m×m)."""
    return T.T @ W.to(T.dtype)


def unwhiten_left(Y: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``T^{-T} Y`` by a triangular solve of ``Tᵀ X = Y`` (``Tᵀ`` upper triangular); no inverse is formed."""
    return torch.linalg.solve_triangular(T.T, Y.to(T.dtype), upper=True, left=True)


def output_gradient(G: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``T^{-1} G``: the loss gradient w.r.t. ``W' = Tᵀ W`` (``W = T^{-T} W'``), by solving ``T X = G``."""
    return torch.linalg.solve_triangular(T, G.to(T.dtype), upper=False, left=True)

"""Thin SVDs of whitened weights ``B = W S`` (m×n), by LAPACK SVD or by the eigendecomposition of the smaller Gram.

``method="svd"``: ``torch.linalg.svd(B)``. ``method="eigh"``: with ``r = min(m, n)``,

* ``m ≤ n``: ``B Bᵀ = U Σ² Uᵀ`` (m×m ``eigh``), then ``Vᵀ = Σ⁻¹ Uᵀ B``;
* ``m > n``: ``Bᵀ B = V Σ² Vᵀ`` (n×n ``eigh``), then ``U = B V Σ⁻¹``.

``eigh`` of an r×r Gram is several times faster than an SVD of B on GPUs (one symmetric tridiagonalisation,
no bidiagonalisation + QR sweeps), and equal-shaped matrices are decomposed in one batched call
(:func:`thin_svd_many`).

Accuracy (float64). The Gram squares the condition number: an eigenvalue of ``K`` carries an absolute error of
about ``ε·‖B‖₂²``, so a singular value ``σ_i`` carries about ``ε·σ₁²/σ_i`` and every ``σ_i ≲ √ε·σ₁ ≈ 1.5e-8·σ₁``
is noise. The large singular values and their vectors (which truncation keeps) match the SVD to ~1e-13
relative; the derived side (``Vᵀ`` or ``U``) of component ``i`` is accurate to about ``ε·σ₁²/σ_i²``. Components
with ``σ_i ≤ rcond·σ₁`` (``rcond = 1e-7``, :data:`RCOND`) are treated as numerically zero: ``σ_i`` is kept as
computed (≤ 1e-7·σ₁), its derived vector is the unit-normalised ``Bᵀu_i`` (zero when that vanishes). Hence
``‖B − U Σ Vᵀ‖_F ≲ rcond·σ₁·√r`` and every product that is truncation or scoring (``U_k Σ_k V_kᵀ``,
``σ_i u_iᵀ H v_i = u_iᵀ H Bᵀ u_i``) is accurate to that level. ``tests/unit/test_decompose.py`` checks these
bounds, including rank-deficient matrices. ``method="eigh32"`` forms the Gram in float64 and decomposes it in
float32 (GPUs: several times faster again; every ``σ_i ≲ 3e-4·σ₁`` is noise, rcond 1e-3, and the kept
components' vectors are accurate to about ``6e-8·σ₁²/σ_i²``: measure before relying on it for deep
truncations). Signs are normalised (:func:`_fix_signs`) so that both methods return
the same vectors for distinct singular values.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any, Literal, NamedTuple

import torch

from .io import load_tensors, save_tensors

__all__ = ["METHODS", "RCOND", "ThinSVD", "thin_svd", "thin_svd_many", "singular_values", "save_decompositions",
           "StoredDecompositions"]

METHODS = ("svd", "eigh", "eigh32")
RCOND = 1e-7
RCOND32 = 1e-3  # eigh32: float32 eigenvalues carry ~6e-8·σ₁², so σ_i below ~3e-4·σ₁ are noise

Method = Literal["svd", "eigh", "eigh32"]


class ThinSVD(NamedTuple):
    """``B = U diag(S) Vh`` with ``U`` m×r, ``S`` (r,) descending, ``Vh`` r×n, ``r = min(m, n)``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"decomposition.method must be one of {METHODS}, got {method!r}")


def _fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair ``(u_i, v_i)`` so that the largest-magnitude entry of ``u_i`` is positive (batched)."""
    idx = U.abs().argmax(dim=-2, keepdim=True)  # [..., 1, r]
    sign = torch.sign(torch.gather(U, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, Vh * sign.transpose(-1, -2)


def _safe_divide_rows(Y: torch.Tensor, S: torch.Tensor, rcond: float) -> torch.Tensor:
    """Rows of ``Y`` (``[..., r, k]``) divided by ``S``; rows with ``S_i ≤ rcond·S_1`` unit-normalised instead."""
    smax = S[..., :1].clamp_min(torch.finfo(S.dtype).tiny)
    small = S <= rcond * smax  # [..., r]
    out = Y / torch.where(small, torch.ones_like(S), S).unsqueeze(-1)
    norms = Y.norm(dim=-1)
    unit = Y / torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(-1)
    return torch.where(small.unsqueeze(-1), unit, out)


def _eigh(K: torch.Tensor, low: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` of the symmetrised ``K``; ``low``: in float32 (vectors returned in ``K``'s dtype)."""
    K = 0.5 * (K + K.transpose(-1, -2))
    if not low:
        return torch.linalg.eigh(K)
    lam, Q = torch.linalg.eigh(K.to(torch.float32))
    return lam.to(K.dtype), Q.to(K.dtype)


def _eigh_svd(B: torch.Tensor, rcond: float, low: bool = False) -> ThinSVD:
    m, n = B.shape[-2:]
    Bt = B.transpose(-1, -2)
    if m <= n:
        lam, U = _eigh(B @ Bt, low)  # ascending
        lam, U = lam.flip(-1), U.flip(-1)
        S = lam.clamp_min(0).sqrt()
        Vh = _safe_divide_rows(U.transpose(-1, -2) @ B, S, rcond)  # Σ⁻¹ Uᵀ B
    else:
        lam, V = _eigh(Bt @ B, low)
        lam, V = lam.flip(-1), V.flip(-1)
        S = lam.clamp_min(0).sqrt()
        U = _safe_divide_rows((B @ V).transpose(-1, -2), S, rcond).transpose(-1, -2)  # B V Σ⁻¹
        Vh = V.transpose(-1, -2)
    U, Vh = _fix_signs(U, Vh)
    return ThinSVD(U, S, Vh)


def thin_svd(B: torch.Tensor, method: Method | str = "svd", dtype: torch.dtype = torch.float64,
             rcond: float = RCOND) -> ThinSVD:
    """Thin SVD of ``B`` (m×n, or a batch ``[..., m, n]``) in ``dtype`` by ``method`` (signs normalised)."""
    _check_method(method)
    B = B.to(dtype)
    if method == "svd":
        U, S, Vh = torch.linalg.svd(B, full_matrices=False)
        U, Vh = _fix_signs(U, Vh)
        return ThinSVD(U, S, Vh)
    if method == "eigh32":
        return _eigh_svd(B, max(rcond, RCOND32), low=True)
    return _eigh_svd(B, rcond)


def thin_svd_many(Bs: list[torch.Tensor], method: Method | str = "svd", dtype: torch.dtype = torch.float64,
                  rcond: float = RCOND) -> list[ThinSVD]:
    """:func:`thin_svd` of every matrix, equal shapes (and devices) stacked into one batched call; input order."""
    _check_method(method)
    groups: dict[tuple, list[int]] = {}
    for i, B in enumerate(Bs):
        groups.setdefault((tuple(B.shape), str(B.device)), []).append(i)
    out: list[ThinSVD | None] = [None] * len(Bs)
    for idx in groups.values():
        batch = thin_svd(torch.stack([Bs[i] for i in idx]), method, dtype, rcond)
        for j, i in enumerate(idx):
            out[i] = ThinSVD(batch.U[j], batch.S[j], batch.Vh[j])
    return out  # type: ignore[return-value]


def singular_values(B: torch.Tensor, method: Method | str = "svd", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``σ`` of ``B`` (descending): ``svdvals``, or the square roots of the smaller Gram's eigenvalues."""
    _check_method(method)
    B = B.to(dtype)
    if method == "svd":
        return torch.linalg.svdvals(B)
    m, n = B.shape[-2:]
    K = B @ B.transpose(-1, -2) if m <= n else B.transpose(-1, -2) @ B
    K = 0.5 * (K + K.transpose(-1, -2))
    lam = torch.linalg.eigvalsh(K.to(torch.float32)).to(K.dtype) if method == "eigh32" else torch.linalg.eigvalsh(K)
    return lam.flip(-1).clamp_min(0).sqrt()


def save_decompositions(path: str | os.PathLike, directions: Mapping[str, ThinSVD], metadata: dict[str, Any],
                        dtype: torch.dtype = torch.float32) -> None:
    """Store ``{target: ThinSVD}`` as ``U.<target>``, ``Vh.<target>`` (in ``dtype``: float32 by default) and
    ``S.<target>`` (float64), atomically and finite-checked, with ``metadata`` (the space, the method, the damping).

    The pipeline stores the UNWHITENED directions (``P_out = T^{-T} U``, ``P_inᵀ = Vᵀ S⁻¹``,
    :func:`lowrank.truncation.unwhitened_directions`): factors cut from them are a slice and a scaling, so float32
    storage costs the factors one float32 rounding, the precision they are stored in anyway (whitened vectors
    would be multiplied by ``S⁻¹`` after rounding, amplifying it by ``S``'s condition number)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, (U, S, Vh) in directions.items():
        tensors[f"U.{name}"], tensors[f"S.{name}"], tensors[f"Vh.{name}"] = U.to(dtype), S.double(), Vh.to(dtype)
    save_tensors(path, tensors, dict(metadata, targets=sorted(directions)))


class StoredDecompositions(Mapping):
    """A read-only ``{target: ThinSVD}`` view of a file written by :func:`save_decompositions`; each target's
    matrices are read when asked for (one block's worth in memory at a time), as stored, on the CPU. The
    pipeline's files hold unwhitened directions: ``U`` = ``P_out``, ``Vh`` = ``P_inᵀ`` (not orthonormal)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        _, self.metadata = load_tensors(self.path, keys=[])
        self._names = list(self.metadata.get("targets", []))

    def __getitem__(self, name: str) -> ThinSVD:
        if name not in self._names:
            raise KeyError(name)
        t, _ = load_tensors(self.path, keys=[f"U.{name}", f"S.{name}", f"Vh.{name}"])
        return ThinSVD(t[f"U.{name}"], t[f"S.{name}"], t[f"Vh.{name}"])

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

"""Parameter and byte accounting for dense and factored linear layers: the one place these numbers come from.

A target ``y = W x + b`` with ``W ∈ R^{m×n}`` stores ``m n (+ m)`` parameters dense, and
``k (m + n) (+ m)`` as factors ``W ≈ A B`` (``A ∈ R^{m×k}``, ``B ∈ R^{k×n}``). The break-even rank is
``r* = ⌊(m n − 1) / (m + n)⌋``: the largest rank whose factors are strictly smaller than the dense matrix.
Allocation, truncation and evaluation all count through these functions, so their numbers cannot disagree.

Bytes of hybrid low-rank + int8 storage (:mod:`lowrank.quantization` stores them), per stored matrix with ``r``
rows of ``c`` values: a row mask (uint8, 1 byte per row: which rows are int8), the int8 rows with their float32
scales, and the other rows in float16 (the papers count fp16). A matrix with ``q`` int8 rows costs exactly

    bytes(r, c, q) = r + q (c + 4) + (r − q) · 2c,

plus ``2m`` for a bias (float16). The byte budget is ``⌊ρ · Σ_e 2 m_e n_e⌋``: the kept fraction ``ρ`` of the
dense targets at float16 (biases excluded from the base, counted when stored). Each int8 mode has a position
layout (:data:`LAYOUTS`: how many rows of each stored matrix are int8 at rank ``k``), the cost its ranks are
allocated with (:func:`lowrank.allocation.allocate_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "TargetShape",
    "dense_params",
    "factored_params",
    "breakeven_rank",
    "stored_params",
    "uniform_rank",
    "bytes_per_element",
    "Budget",
    "QUANTIZERS",
    "matrix_bytes",
    "dense_fp16_bytes",
    "byte_budget",
    "Layout",
    "matrix_shapes",
    "bias_bytes",
    "layout_bytes",
    "dense_layout",
    "remap_layout",
    "hq_layout",
    "LAYOUTS",
    "check_mode",
]

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}


@dataclass(frozen=True)
class TargetShape:
    """Shape of one target linear: ``out_features`` m, ``in_features`` n, whether it has a bias."""

    m: int
    n: int
    bias: bool = False

    def __post_init__(self) -> None:
        if self.m < 1 or self.n < 1:
            raise ValueError(f"target shape must be positive, got m={self.m}, n={self.n}")

    @property
    def full_rank(self) -> int:
        return min(self.m, self.n)


def dense_params(shape: TargetShape) -> int:
    """``m n`` (+ ``m`` for the bias)."""
    return shape.m * shape.n + (shape.m if shape.bias else 0)


def factored_params(shape: TargetShape, k: int) -> int:
    """``k (m + n)`` (+ ``m`` for the bias, kept on the output factor)."""
    if k < 0:
        raise ValueError(f"rank must be >= 0, got {k}")
    return k * (shape.m + shape.n) + (shape.m if shape.bias else 0)


def breakeven_rank(shape: TargetShape) -> int:
    """``r* = ⌊(m n − 1)/(m + n)⌋``, the largest rank whose factors store fewer values than ``W``."""
    return max(0, (shape.m * shape.n - 1) // (shape.m + shape.n))


def stored_params(shape: TargetShape, rank: int | None) -> int:
    """Parameters actually stored: dense when ``rank is None``, factored otherwise."""
    return dense_params(shape) if rank is None else factored_params(shape, rank)


def uniform_rank(shape: TargetShape, kept_fraction: float) -> int | None:
    """The rank that keeps the fraction ``ρ`` of one matrix's parameters (SVD-LLM's uniform rule):
    ``k = ⌊(ρ · P_dense − b) / (m + n)⌋`` (``b`` the bias, kept dense), clipped to ``[1, r*]``; ``None`` (dense)
    when ``ρ ≥ 1`` or the matrix is too small to factor (``r* < 1``)."""
    r_star = breakeven_rank(shape)
    if kept_fraction >= 1.0 or r_star < 1:
        return None
    bias = shape.m if shape.bias else 0
    k = int((kept_fraction * dense_params(shape) - bias) // (shape.m + shape.n))
    return max(1, min(k, r_star))


def bytes_per_element(dtype: str) -> int:
    if dtype not in _BYTES:
        raise ValueError(f"unknown storage dtype {dtype!r}; choose one of {sorted(_BYTES)}")
    return _BYTES[dtype]


@dataclass(frozen=True)
class Budget:
    """A parameter budget over the targets: keep at most ``⌊kept_fraction · D⌋`` of the ``D`` target parameters.

    The papers quote either the kept ("maintenance") fraction or the removed ("compression") fraction
    ``1 − kept_fraction``; both are reported.
    """

    kept_fraction: float
    target_params: int

    def __post_init__(self) -> None:
        if not (0.0 < self.kept_fraction <= 1.0):
            raise ValueError(f"kept fraction must be in (0, 1], got {self.kept_fraction}; e.g. 0.8 keeps 80 %")
        if self.target_params < 1:
            raise ValueError("a budget needs at least one target parameter")

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.kept_fraction

    @property
    def max_kept_params(self) -> int:
        return int(self.kept_fraction * self.target_params)


# ---- bytes of int8 storage --------------------------------------------------------------------------------------


FLOAT_BYTES = 2
SCALE_BYTES = 4  # one float32 scale per int8 row
MASK_BYTES = 1  # one uint8 flag per row


def matrix_bytes(rows: int, cols: int, n_int8: int) -> int:
    """Stored bytes of an r×c matrix with ``n_int8`` int8 rows: mask + int8 rows and scales + float16 rows."""
    if not 0 <= n_int8 <= rows:
        raise ValueError(f"int8 rows must be in [0, {rows}], got {n_int8}")
    return rows * MASK_BYTES + n_int8 * (cols + SCALE_BYTES) + (rows - n_int8) * cols * FLOAT_BYTES


def dense_fp16_bytes(shape: TargetShape) -> int:
    """``2 m n``: the budget base of one target (dense, float16, no bias)."""
    return FLOAT_BYTES * shape.m * shape.n


def byte_budget(shapes: dict[str, TargetShape], kept_fraction: float) -> tuple[int, int]:
    """``(⌊ρ · D_bytes⌋, D_bytes)`` with ``D_bytes = Σ 2 m n`` over the targets."""
    if not 0.0 < kept_fraction <= 1.0:
        raise ValueError(f"kept fraction must be in (0, 1], got {kept_fraction}")
    total = sum(dense_fp16_bytes(s) for s in shapes.values())
    return int(kept_fraction * total), total


@dataclass(frozen=True)
class Layout:
    """How one target is stored: ``rank`` (None = dense) and the int8 row count of each stored matrix.

    Dense: ``int8_rows = {"weight": q}``; factored: ``{"down": q_down, "up": q_up}``.
    """

    rank: int | None
    int8_rows: dict[str, int]


def bias_bytes(shape: TargetShape) -> int:
    return FLOAT_BYTES * shape.m if shape.bias else 0


def matrix_shapes(shape: TargetShape, rank: int | None) -> dict[str, tuple[int, int]]:
    """Row/column counts of the stored matrices of a target: ``weight`` (m×n) or ``down`` (k×n) and ``up`` (m×k)."""
    if rank is None:
        return {"weight": (shape.m, shape.n)}
    return {"down": (rank, shape.n), "up": (shape.m, rank)}


def layout_bytes(shape: TargetShape, layout: Layout) -> int:
    return bias_bytes(shape) + sum(matrix_bytes(r, c, layout.int8_rows[key])
                                   for key, (r, c) in matrix_shapes(shape, layout.rank).items())


def dense_layout(shape: TargetShape, int8: bool = False) -> Layout:
    return Layout(None, {"weight": shape.m if int8 else 0})


def remap_layout(shape: TargetShape, k: int | None) -> Layout:
    """Dobi-SVD's remap as real rows: the narrow side fully int8, the first ``min(m,n)``-worth of the wide one."""
    if k is None:
        return dense_layout(shape)
    m, n = shape.m, shape.n
    if m >= n:
        return Layout(k, {"down": k, "up": min(n, m)})
    return Layout(k, {"up": m, "down": min(k, math.ceil(k * m / n))})


def hq_layout(shape: TargetShape, k: int | None) -> Layout:
    """Every row int8."""
    if k is None:
        return dense_layout(shape, int8=True)
    return Layout(k, {"down": k, "up": shape.m})


LAYOUTS: dict[str, Callable[[TargetShape, int | None], Layout]] = {
    "remap": remap_layout, "hq": hq_layout, "loss_aware": remap_layout}
QUANTIZERS: tuple[str, ...] = tuple(LAYOUTS)  # the int8 modes (quantize.mode besides none)


def check_mode(mode: Any) -> str:
    if mode not in QUANTIZERS:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {list(QUANTIZERS)}")
    return mode

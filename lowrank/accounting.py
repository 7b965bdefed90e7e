"""Parameter and byte accounting for dense and factored linear layers: the one place these numbers come from.

A target ``y = W x + b`` with ``W ∈ R^{m×n}`` stores ``m n (+ m)`` parameters dense, and
``k (m + n) (+ m)`` as factors ``W ≈ A B`` (``A ∈ R^{m×k}``, ``B ∈ R^{k×n}``). The break-even rank is
``r* = ⌊(m n − 1) / (m + n)⌋``: the largest rank whose factors are strictly smaller than the dense matrix.
Allocation, truncation and evaluation all count through these functions, so their numbers cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "TargetShape",
    "dense_params",
    "factored_params",
    "breakeven_rank",
    "stored_params",
    "uniform_rank",
    "bytes_per_element",
    "Budget",
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

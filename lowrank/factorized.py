"""``LowRankLinear``: a linear layer stored as two factors, ``y = A (B x) + b``.

``B ∈ R^{k×n}`` is the ``down`` projection (no bias) and ``A ∈ R^{m×k}`` the ``up`` projection (carrying the
original bias), so ``W' = A B`` has rank at most ``k`` and the layer stores ``k (m + n) (+ m)`` parameters.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LowRankLinear"]


class LowRankLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear(in_features, out_features)`` by ``up(down(x))`` of rank ``rank``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not (1 <= rank <= min(in_features, out_features)):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}] for a "
                             f"{out_features}x{in_features} layer, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "LowRankLinear":
        """Build from ``A`` (m×k), ``B`` (k×n) and an optional bias (m)."""
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[0]:
            raise ValueError(f"factor shapes do not chain: A {tuple(A.shape)}, B {tuple(B.shape)}")
        dtype = dtype or A.dtype
        m, k = A.shape
        n = B.shape[1]
        mod = cls(n, m, k, bias=bias is not None, dtype=dtype, device=A.device)
        with torch.no_grad():
            mod.up.weight.copy_(A.to(dtype))
            mod.down.weight.copy_(B.to(dtype))
            if bias is not None:
                mod.up.bias.copy_(bias.to(dtype))
        return mod

    @property
    def weight(self) -> torch.Tensor:
        """The dense product ``A B`` (m×n), materialised on demand (for code that inspects ``.weight``)."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` holding ``A B`` (and the bias): the merged form."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None,
                        dtype=self.up.weight.dtype, device=self.up.weight.device)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.up.bias is not None:
                lin.bias.copy_(self.up.bias)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

"""``QuantizedLinear``: a target stored as int8 + float16 rows (dense, or the two low-rank factors), run by
dequantising on the fly.

Each stored matrix is a :class:`PackedRows`: ``mask`` (uint8, r: 1 = int8 row), ``q`` (int8, q×c) with ``scale``
(float32, q) for the int8 rows, and ``f`` (float16, (r−q)×c) for the others, in row order. The state-dict keys are
``<target>.weight.*`` (dense) or ``<target>.down.*`` / ``<target>.up.*`` (``W' = up · down``) and
``<target>.bias`` (float16). ``forward`` rebuilds each matrix in the input's dtype (``s q`` for int8 rows) and
applies it with ``F.linear``; the buffers move with ``.to(device)``, so the same module runs on CPU and CUDA.

The int8 primitives live here too: for a row ``x``, ``s = max|x| / 127`` (float32) and
``q = clamp(round(x / s), −127, 127)`` (int8), dequantised ``x̂ = s q`` with ``|x − x̂| ≤ s/2`` per element
(:func:`quantize_rows`, :func:`dequantize_rows`). Which rows are int8 and at what rank is
:mod:`lowrank.quantization`'s business.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QMAX", "FLOAT_STORAGE", "quantize_rows", "dequantize_rows", "PackedRows", "QuantizedLinear"]

QMAX = 127
FLOAT_STORAGE = torch.float16  # the float rows, dense targets and biases (what the papers count)


def quantize_rows(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``s = max|x|/127`` (float32, r), ``q = round(x/s)`` (int8, r×c); zero rows get
    ``s = 0``."""
    if X.ndim != 2:
        raise ValueError(f"quantize_rows needs a matrix, got shape {tuple(X.shape)}")
    Xf = X.to(torch.float32)
    s = Xf.abs().amax(dim=1) / QMAX  # [r]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(Xf / safe[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, s


def dequantize_rows(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``s q`` row by row, in ``dtype``."""
    return q.to(dtype) * s.to(dtype)[:, None]


class PackedRows(nn.Module):
    """An r×c matrix with ``n_int8`` int8 rows (per-row scales) and the rest in float16."""

    def __init__(self, rows: int, cols: int, n_int8: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 0 <= n_int8 <= rows:
            raise ValueError(f"int8 rows must be in [0, {rows}], got {n_int8}")
        self.rows, self.cols = rows, cols
        self.register_buffer("mask", torch.zeros(rows, dtype=torch.uint8, device=device))
        self.register_buffer("q", torch.zeros(n_int8, cols, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.zeros(n_int8, dtype=torch.float32, device=device))
        self.register_buffer("f", torch.zeros(rows - n_int8, cols, dtype=FLOAT_STORAGE, device=device))

    @classmethod
    def from_matrix(cls, X: torch.Tensor, int8: torch.Tensor) -> "PackedRows":
        """Pack ``X`` (r×c) with the rows where ``int8`` (bool, r) is true quantised."""
        int8 = int8.to(torch.bool).cpu()
        X = X.detach().cpu()
        mod = cls(X.shape[0], X.shape[1], int(int8.sum()))
        q, s = quantize_rows(X[int8]) if bool(int8.any()) else (mod.q, mod.scale)
        mod.mask.copy_(int8.to(torch.uint8))
        mod.q.copy_(q)
        mod.scale.copy_(s)
        mod.f.copy_(X[~int8].to(FLOAT_STORAGE))
        return mod

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The r×c matrix in ``dtype``."""
        out = torch.empty(self.rows, self.cols, dtype=dtype, device=self.mask.device)
        is_q = self.mask.to(torch.bool)
        if self.q.shape[0]:
            out[is_q] = dequantize_rows(self.q, self.scale, dtype)
        if self.f.shape[0]:
            out[~is_q] = self.f.to(dtype)
        return out

    def stored_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.mask, self.q, self.scale, self.f))

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}, int8_rows={self.q.shape[0]}"


class QuantizedLinear(nn.Module):
    """Drop-in for ``nn.Linear(n, m)``: dense (``rank=None``, child ``weight``) or factored (children ``down``,
    ``up``), each a :class:`PackedRows`; optional float16 bias."""

    def __init__(self, in_features: int, out_features: int, rank: int | None, int8_rows: dict[str, int],
                 bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        if rank is None:
            self.weight = PackedRows(out_features, in_features, int8_rows["weight"])
        else:
            if not 1 <= rank <= min(in_features, out_features):
                raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
            self.down = PackedRows(rank, in_features, int8_rows["down"])
            self.up = PackedRows(out_features, rank, int8_rows["up"])
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=FLOAT_STORAGE))
        else:
            self.bias = None

    @classmethod
    def from_matrices(cls, mats: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                      bias: torch.Tensor | None = None) -> "QuantizedLinear":
        """From ``{"weight": W}`` or ``{"down": B, "up": A}`` and one int8 row mask per matrix."""
        if "weight" in mats:
            m, n = mats["weight"].shape
            rank = None
        else:
            m, rank = mats["up"].shape
            n = mats["down"].shape[1]
        mod = cls(n, m, rank, {k: int(v.sum()) for k, v in masks.items()}, bias is not None)
        for key, X in mats.items():
            setattr(mod, key, PackedRows.from_matrix(X, masks[key]))
        if bias is not None:
            mod.bias.copy_(bias.detach().cpu().to(FLOAT_STORAGE))
        return mod

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The m×n matrix this layer applies (``up · down`` for factors)."""
        if self.rank is None:
            return self.weight.dequantize(dtype)
        return self.up.dequantize(dtype) @ self.down.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.rank is None:
            return F.linear(x, self.weight.dequantize(x.dtype), b)
        return F.linear(F.linear(x, self.down.dequantize(x.dtype)), self.up.dequantize(x.dtype), b)

    def stored_bytes(self) -> int:
        parts = [self.weight] if self.rank is None else [self.down, self.up]
        return sum(p.stored_bytes() for p in parts) + (0 if self.bias is None else self.bias.numel() * 2)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

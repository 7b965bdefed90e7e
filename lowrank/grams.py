"""Accumulation of input second moments ``Σ_t x_t x_tᵀ`` in float64, with the per-batch product where it is fast.

``precision="float64"``: ``G += Xᵀ X`` with ``X`` cast to float64 (exact to float64 round-off; on GPUs float64
GEMMs run at a small fraction of the half-precision rate: for LLaMA-7B over 256×2048 tokens that is
~5.8e15 flops, about two minutes on an H100). ``precision="mixed"``: the batch product ``P_b = X_bᵀ X_b`` is
formed in float32 (half-precision inputs: ``torch.mm(..., out_dtype=float32)``, tensor cores, exact products of
bf16/fp16 values accumulated in float32; float32 inputs: a float32 GEMM with TF32 disabled), then added to the
float64 ``G``: the float32 error is per batch (relative ~1e-7·√N_b), the sum over batches is float64; float64
inputs (a float64 model) keep float64 products.
``"auto"``: mixed on every device. The pipeline stores the Gram in float32, whose rounding (relative 6e-8) is the
size of the mixed product's error, so float64 products buy nothing after the store: on SmolLM2 (64 × 512 tokens)
the stored Grams differ by 4e-8 (median, relative Frobenius; max 3e-7) and SVD-LLM's held-out perplexity by 2e-7
relative (116.15836 vs 116.15838 at kept 0.6), while the CPU time of the statistics job falls by about 40 %
(bench/results/default_run_cpu.md). The workflow sets it with ``statistics.input_gram.precision``.
"""

from __future__ import annotations

import torch

__all__ = ["PRECISIONS", "gram_update", "resolve_precision"]

PRECISIONS = ("auto", "float64", "mixed")


def resolve_precision(precision: str) -> str:
    """``float64`` or ``mixed``: ``precision`` itself, or ``mixed`` for ``auto`` (on every device: see the module)."""
    if precision not in PRECISIONS:
        raise ValueError(f"Gram precision must be one of {PRECISIONS}, got {precision!r}")
    return "mixed" if precision == "auto" else precision


def gram_update(G: torch.Tensor, x: torch.Tensor, precision: str = "auto") -> None:
    """``G += xᵀ x`` in place (``G`` float64 n×n, ``x`` [N_b, n] on the same device)."""
    mode = resolve_precision(precision)
    if mode == "float64" or x.dtype == torch.float64:  # a float64 model's products stay float64
        X = x.to(torch.float64)
        G.addmm_(X.T, X)
        return
    if x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda:
        try:
            G.add_(torch.mm(x.T, x, out_dtype=torch.float32))
            return
        except (RuntimeError, TypeError):  # pragma: no cover - older torch: no out_dtype
            pass
    X = x.to(torch.float32)
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        G.add_(X.T @ X)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow

"""Evaluation: perplexity on held-out windows, and parameter / byte counts of a (compressed) model.

Perplexity is ``exp`` of the token-weighted mean next-token cross-entropy over non-overlapping windows
(``seq_len − 1`` predictions per window), computed in the model's dtype with float32 log-softmax. Non-finite
losses are never dropped silently (the reference codes skip such batches, which biases PPL down): they make
the result ``inf`` and are counted.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .accounting import dense_params
from .factorized import LowRankLinear
from .model import find_targets
from .runtime import progress

__all__ = ["perplexity", "model_size"]


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               device: torch.device | str = "cpu") -> dict[str, Any]:
    """``exp(Σ CE / #predictions)`` over ``windows`` (LongTensor[w, T]); also the mean NLL and counts."""
    model.eval()
    total_nll, total_tokens, nonfinite = 0.0, 0, 0
    starts = range(0, windows.shape[0], batch_size)
    for s in progress(starts, desc="perplexity", total=len(starts)):
        batch = windows[s : s + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits  # [b, T, V]
        lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -lp.gather(-1, batch[:, 1:, None]).squeeze(-1)  # [b, T-1]
        bad = ~torch.isfinite(nll).all(dim=1)
        nonfinite += int(bad.sum())
        total_nll += float(nll.double().sum())
        total_tokens += nll.numel()
    mean = total_nll / total_tokens
    return {
        "ppl": math.exp(mean) if math.isfinite(mean) and mean < 700 else float("inf"),
        "nll": mean,
        "tokens": total_tokens,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "nonfinite_windows": nonfinite,
    }


def model_size(model: nn.Module) -> dict[str, int]:
    """Parameter and byte counts: whole model (tied weights once) and the compressible targets as stored."""
    seen: set[int] = set()
    total, total_bytes = 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
        total_bytes += p.numel() * p.element_size()
    target_params, target_bytes, factored = 0, 0, 0
    for t in find_targets(model):
        mod = model.get_submodule(t.name)
        params = list(mod.parameters())
        target_params += sum(p.numel() for p in params)
        target_bytes += sum(p.numel() * p.element_size() for p in params)
        factored += isinstance(mod, LowRankLinear)
    return {"total_params": total, "total_bytes": total_bytes, "target_params": target_params,
            "target_bytes": target_bytes, "n_factored": factored}


def dense_target_params(model: nn.Module) -> int:
    return sum(dense_params(t.shape) for t in find_targets(model))

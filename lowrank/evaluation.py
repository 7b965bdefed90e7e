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
from .blocks import streamed_batches
from .factorized import LowRankLinear
from .model import find_targets
from .runtime import progress
from .sharded import is_lazy

__all__ = ["perplexity", "model_size", "storage_bytes", "tokens_per_second"]


def _window_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihoods ``[b, T-1]`` (float32 log-softmax of the logits)."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -lp.gather(-1, batch[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               device: torch.device | str = "cpu", streamed: bool | None = None) -> dict[str, Any]:
    """``exp(Σ CE / #predictions)`` over ``windows`` (LongTensor[w, T]); also the mean NLL and counts.

    ``streamed`` (default: when the model is lazy, :mod:`lowrank.sharded`): one decoder block resident at a
    time (:func:`lowrank.blocks.streamed_batches`: the blocks over the captured inputs of every batch, then the
    model's own head on the last boundary), the same numbers as the whole-model forward up to float order. Host memory:
    the stem, one block and one boundary activation of every window, whatever the depth.
    """
    model.eval()
    streamed = is_lazy(model) if streamed is None else streamed
    starts = range(0, windows.shape[0], batch_size)
    nlls: list[torch.Tensor] = []
    if streamed:
        for batch in streamed_batches(model, windows, batch_size, device, desc="perplexity"):
            nlls.append(_window_nll(model(input_ids=batch, use_cache=False).logits, batch))
    else:
        for s in progress(starts, desc="perplexity", total=len(starts)):
            batch = windows[s : s + batch_size].to(device)
            nlls.append(_window_nll(model(input_ids=batch, use_cache=False).logits, batch))  # logits [b, T, V]
    total_nll, total_tokens, nonfinite = 0.0, 0, 0
    for nll in nlls:
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
        key = id(p) if p.is_meta else p.data_ptr()  # a lazy model's blocks are on meta (no storage)
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
        total_bytes += p.numel() * p.element_size()
    target_params, target_bytes, factored = 0, 0, 0
    for t in find_targets(model):
        mod = model.get_submodule(t.name)
        params = list(mod.parameters()) or list(mod.buffers())  # int8 / float16 rows are buffers
        target_params += sum(p.numel() for p in params)
        target_bytes += sum(p.numel() * p.element_size() for p in params)
        factored += isinstance(mod, LowRankLinear)
    return {"total_params": total, "total_bytes": total_bytes, "target_params": target_params,
            "target_bytes": target_bytes, "n_factored": factored}


def dense_target_params(model: nn.Module) -> int:
    return sum(dense_params(t.shape) for t in find_targets(model))


def storage_bytes(model: nn.Module, manifest: dict[str, Any]) -> dict[str, Any]:
    """Target bytes at the float16 storage the papers count, and their fraction of the dense float16 targets.

    A quantized model (:mod:`lowrank.quantization`) reports its accounted bytes (equal to its tensor bytes); a
    float model counts 2 bytes per stored target parameter (factors or dense). The dense base is
    ``2 · Σ m n`` from the base model's architecture (or the quantized manifest).
    """
    if "accounted_bytes" in manifest:
        stored, dense = int(manifest["accounted_bytes"]), int(manifest["dense_fp16_bytes"])
    else:
        stored = 2 * model_size(model)["target_params"]
        dense = 2 * int(manifest.get("base_architecture", {}).get("target_params", 0))
    return {"storage_bytes_fp16": stored, "dense_target_bytes_fp16": dense,
            "kept_bytes_fraction": stored / dense if dense else None}


@torch.no_grad()
def tokens_per_second(model: nn.Module, seq_len: int = 128, batch_size: int = 1, repeats: int = 3,
                      device: torch.device | str = "cpu", vocab_size: int | None = None) -> dict[str, float]:
    """Prefill throughput: tokens/s of full forwards on ``batch_size × seq_len`` random tokens (median of
    ``repeats`` after one warm-up; CUDA is synchronised around each timing)."""
    import time

    model.eval()
    vocab = vocab_size or int(getattr(getattr(model, "config", None), "vocab_size", 1000))
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    is_cuda = torch.device(device).type == "cuda"
    times = []
    for i in range(repeats + 1):
        if is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    return {"tokens_per_s": batch_size * seq_len / med, "seconds": med, "seq_len": seq_len, "batch_size": batch_size}

"""Generation speed and peak memory of a (dense or compressed) causal LM, with warm-up and repeats.

One round = a *prefill* forward of ``B × T`` prompt tokens (building the KV cache) followed by ``D`` greedy
*decode* steps of one token per sequence, each reusing the cache. Throughputs are tokens per second of the
median timed round: ``prefill_tok_s = B T / t_prefill`` and ``decode_tok_s = B D / t_decode``. Prompts are
seeded random token ids (speed does not depend on the text).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed rounds (tensors only); on CPU the
process's peak resident set (``VmHWM``), reset after the model is loaded where Linux allows it
(``/proc/self/clear_refs``), so it covers the model, the activations and the KV cache of the measured rounds
(plus the interpreter and libraries, ``rss_baseline_mb`` of it before the model was loaded when known).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["measure_generation", "rss_mb", "peak_rss_mb", "reset_peak_rss", "files_bytes"]


def _status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    """Current resident set size of this process in MiB (Linux), else ``None``."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else None


def peak_rss_mb() -> float:
    """Peak resident set size in MiB since the last :func:`reset_peak_rss` (or process start)."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: the lifetime peak (ru_maxrss is KiB on Linux, bytes on macOS)
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if os.uname().sysname == "Darwin" else 1)
    return kb / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ≥ 4.0); ``False`` where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def files_bytes(paths: list[str | os.PathLike]) -> int:
    """Total size on disk of ``paths`` (files, or every file under a folder)."""
    total = 0
    for p in map(Path, paths):
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _round(model: nn.Module, prompt: torch.Tensor, decode_tokens: int, device: torch.device) -> tuple[float, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    _sync(device)
    t1 = time.perf_counter()
    past = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)  # [B, 1]
    for _ in range(decode_tokens):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def measure_generation(model: nn.Module, prefill_tokens: int = 256, decode_tokens: int = 32, batch_size: int = 1,
                       warmup: int = 1, repeats: int = 3, device: torch.device | str = "cpu",
                       seed: int = 0) -> dict[str, Any]:
    """Prefill and decode throughput (median of ``repeats`` after ``warmup`` rounds) and peak memory."""
    device = torch.device(device)
    model.eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and prefill_tokens + decode_tokens > positions:
        raise ValueError(f"prefill_tokens + decode_tokens = {prefill_tokens + decode_tokens} exceeds the model's "
                         f"{positions} positions; lower evaluation.speed.prefill_tokens or decode_tokens")
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch_size, prefill_tokens), generator=g).to(device)  # [B, T]
    for _ in range(warmup):
        _round(model, prompt, decode_tokens, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset = reset_peak_rss()
    prefill, decode = [], []
    for _ in range(repeats):
        tp, td = _round(model, prompt, decode_tokens, device)
        prefill.append(tp)
        decode.append(td)
    tp, td = statistics.median(prefill), statistics.median(decode)
    result: dict[str, Any] = {
        "device": str(device),
        "batch_size": batch_size,
        "prefill_tokens": prefill_tokens,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "prefill_s": tp,
        "decode_s": td,
        "prefill_tok_s": batch_size * prefill_tokens / tp,
        "decode_tok_s": batch_size * decode_tokens / td if decode_tokens else None,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_reset": reset,
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result

"""Block-by-block truncation with one factor file per block, so an interrupted run resumes where it stopped.

:func:`truncate_blocks` factors the targets of one decoder block at a time (the block resident on the device,
read from the checkpoint shards when the model is lazy: :mod:`lowrank.sharded`) and writes that block's factors
atomically to ``<parts>/block_<i>.safetensors`` before moving on. The file records a fingerprint of everything
its factors depend on (the block's ranks and target shapes, and a caller-given key: whitening, damping,
decomposition, statistics); on a rerun every block whose file exists with the same fingerprint is loaded
instead of recomputed, so a crash loses at most the block in progress. The result is identical to an
uninterrupted run (each block's factors depend only on its own weights and statistics).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .blocks import resident, targets_by_block
from .decompose import ThinSVD
from .factorized import LowRankLinear
from .io import load_tensors, save_tensors
from .model import Target, swap_in_low_rank
from .runtime import progress
from .truncation import truncate_model

__all__ = ["block_fingerprint", "truncate_blocks", "part_path"]


def part_path(parts: str | os.PathLike, i: int) -> Path:
    return Path(parts) / f"block_{i:05d}.safetensors"


def block_fingerprint(targets: list[Target], ranks: dict[str, int | None], key: dict[str, Any]) -> str:
    """sha256 of the block's target names, shapes and ranks and of ``key`` (JSON, sorted)."""
    body = {"targets": [[t.name, t.shape.m, t.shape.n, t.shape.bias, ranks.get(t.name)] for t in targets],
            "key": key}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_part(model: nn.Module, path: Path, fingerprint: str) -> dict[str, dict[str, Any]] | None:
    """Swap in the block's stored factors; ``None`` when the file belongs to other inputs (recompute)."""
    try:
        tensors, meta = load_tensors(path)
    except Exception:  # noqa: BLE001 - an unreadable part is recomputed, never trusted
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    report = dict(meta["report"])
    for name, r in report.items():
        if r.get("rank") is None:
            continue
        mod = swap_in_low_rank(model, name, int(r["rank"]))
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        mod.load_state_dict(state, strict=True, assign=True)
    return report


def truncate_blocks(model: nn.Module, targets: list[Target], ranks: dict[str, int | None], whitening: str,
                    stats: dict[str, Any] | None, damping: float, device: torch.device | str,
                    parts: str | os.PathLike, key: dict[str, Any] | None = None, decomposition: str = "svd",
                    stop_after: int | None = None, directions: Mapping[str, ThinSVD] | None = None
                    ) -> dict[str, dict[str, Any]]:
    """:func:`lowrank.truncation.truncate_model` one block at a time, each block's factors saved to ``parts``.
    ``directions``: the targets' stored component directions (:class:`lowrank.decompose.StoredDecompositions`,
    read target by target as each block is truncated); without it each block decomposes its targets.

    Blocks whose part file exists with a matching fingerprint are loaded, not recomputed. ``stop_after=k``
    raises ``RuntimeError`` after block ``k`` is saved (for tests of resumption: a simulated crash). Returns the
    per-target report of every target, as ``truncate_model``.
    """
    parts = Path(parts)
    parts.mkdir(parents=True, exist_ok=True)
    key = dict(key or {}, whitening=whitening, damping=damping, decomposition=decomposition)
    by_block = targets_by_block(targets)
    report: dict[str, dict[str, Any]] = {}
    for i in progress(sorted(by_block), desc="truncate blocks", total=len(by_block)):
        tl = by_block[i]
        fp = block_fingerprint(tl, ranks, key)
        path = part_path(parts, i)
        got = _load_part(model, path, fp) if path.exists() else None
        if got is None:
            with resident(model, i, device) as _block:
                got = truncate_model(model, tl, ranks, whitening, stats, damping, device, decomposition, directions)
                tensors = {}
                for t in tl:
                    mod = model.get_submodule(t.name)
                    if isinstance(mod, LowRankLinear):
                        for k, v in mod.state_dict().items():
                            tensors[f"{t.name}.{k}"] = v.detach().to("cpu").contiguous()
                save_tensors(path, tensors, {"fingerprint": fp, "block": i, "report": got})
        report.update(got)
        if stop_after is not None and i >= stop_after:
            raise RuntimeError(f"stopped after block {i} (stop_after={stop_after})")
    return report

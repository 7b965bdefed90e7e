"""Streamed gradients fused with scoring: every block scored as soon as its gradients are complete, then dropped.

The streamed backward (:func:`lowrank.gradients.streamed_gradients`) hands each block's finished gradients to a
callback while the block is still resident on the device; :func:`fused_scores` scores them there
(:func:`lowrank.scoring.score_targets`) and keeps only the scores, so one block of float64 gradients is alive at a
time instead of the whole model's. The layer-wise engine itself (capture, boundaries, place / run / release) is
:mod:`lowrank.blocks`; its names are re-exported here for older imports.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .blocks import OFFLOAD_MODES, BoundaryStore, boundary_bytes, offload_block_inputs
from .gradients import FisherMode, TargetGradients, TokenProbe, streamed_gradients
from .model import Target
from .scoring import ComponentProbe, score_targets

__all__ = ["BoundaryStore", "TokenProbe", "streamed_gradients", "fused_scores", "offload_block_inputs", "FisherMode",
           "OFFLOAD_MODES", "boundary_bytes"]


def fused_scores(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device | str,
                 targets: list[Target], scorer: str, whitening: str, stats: dict[str, Any], damping: float = 1e-6,
                 decomposition: str = "svd", offload: str = "auto"
                 ) -> tuple[dict[str, dict[str, torch.Tensor]], TargetGradients]:
    """Streamed gradients with every block scored as soon as its gradients are complete, then dropped.

    Equal to :func:`lowrank.scoring.score_targets` on :func:`streamed_gradients`'s ``G``, with one block of
    gradients alive at a time instead of the whole model's (float64: 8 bytes per target weight). A scorer that
    reads per-component statistics (``second_order``) gets them from a :class:`lowrank.scoring.ComponentProbe`
    (no ``G`` is accumulated then; every window's rows for a ``window_rows`` scorer, averaged once the block is
    scored). Returns the
    scores in target order and the gradients' bookkeeping (``G`` empty, ``loss``, ``tokens``).
    """
    device = torch.device(device)
    out: dict[str, dict[str, torch.Tensor]] = {}
    probe = ComponentProbe.for_scorer(scorer, model, whitening, stats, damping, device, decomposition)

    def on_block(i: int, G_i: dict[str, torch.Tensor], F_i: dict[str, torch.Tensor] | None) -> None:
        tl = [t for t in targets if t.block == i]
        comps = None if probe is None else {t.name: probe.result[t.name] for t in tl}
        part = TargetGradients(G=G_i, fisher=None, tokens=0, loss=0.0, components=comps)
        out.update(score_targets(model, tl, scorer, whitening, stats, damping, device, part, decomposition))
        if comps is not None:  # per-window rows are only needed while the block is scored
            probe.result.update({n: c.mean() for n, c in comps.items()})

    grads = streamed_gradients(model, windows, batch_size, device, targets=targets, offload=offload,
                               on_block=on_block, keep=False, probe=probe, need_G=probe is None)
    return {t.name: out[t.name] for t in targets}, grads

"""ASVD's sensitivity-based rank choice: how much the calibration perplexity rises when one target alone is
truncated to each candidate keep ratio, and a binary search over that table to the parameter budget.

Sensitivity (Yuan et al., ASVD): for target ``t`` and candidate keep ratio ``ρ`` (``0.4 … 0.9``), truncate ``t``
alone to the rank the uniform rule gives ``ρ`` (``k = ⌊(ρ m n − b)/(m + n)⌋``, clipped to the break-even rank),
in the method's space (ASVD: ``act_scale``), and measure the calibration perplexity ``p(t, ρ)`` on a few windows;
every other target stays dense. The table costs ``#targets × #ratios`` forward passes; here each one starts at
``t``'s block (the dense inputs of that block are replayed, the earlier blocks are skipped), about half a forward
on average. Measured cost: see :func:`measure_sensitivity`.

Rank search: sort the ``(t, ρ, p)`` triples by decreasing ``p``; for a cut ``c``, each target takes the smallest
``ρ`` among the triples after the cut (the ``#triples − c`` least harmful ones) and stays dense if it has none.
The kept parameter count is non-decreasing in ``c``, so a binary search finds the largest cut whose count is
within the budget: the least perplexity-raising choice that meets it. The reference code assigns ranks from the
last probed ``mid`` instead of the converged bound, so its result can miss the target by one step; this search
always returns a choice within the budget.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from .accounting import TargetShape, uniform_rank
from .blocks import BlockInputs, block_output, capture_block_inputs, targets_by_block
from .gradients import causal_lm_loss
from .model import Target, find_blocks, find_targets, linear_weight, weight_is_transposed
from .runtime import progress
from .spaces import bind
from .statistics import Sensitivity
from .whitening import unwhiten_right, whiten

__all__ = ["CANDIDATE_RATIOS", "Sensitivity", "candidate_rank", "measure_sensitivity"]

log = logging.getLogger(__name__)

CANDIDATE_RATIOS: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def candidate_rank(shape: TargetShape, ratio: float) -> int | None:
    """The rank keep ratio ``ratio`` gives one matrix under the uniform rule (``None``: it stays dense)."""
    return uniform_rank(shape, ratio)


class _Replay(nn.Module):
    """Stands in for the blocks before the one under test: the last of them returns the cached dense output."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        self.cached: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = self.cached if self.cached is not None else (args[0] if args else kwargs["hidden_states"])
        return (h,) if self.as_tuple else h


def _check_ratios(ratios: tuple[float, ...]) -> tuple[float, ...]:
    ratios = tuple(sorted(float(r) for r in ratios))
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios) or len(set(ratios)) != len(ratios):
        raise ValueError(f"candidate keep ratios must be distinct values in (0, 1), got {list(ratios)}")
    return ratios


@torch.no_grad()
def measure_sensitivity(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device | str,
                        stats: dict[str, Any], whitening: str = "act_scale",
                        ratios: tuple[float, ...] = CANDIDATE_RATIOS, max_windows: int | None = 4,
                        targets: list[Target] | None = None) -> Sensitivity:
    """ASVD's sensitivity table over the first ``max_windows`` calibration windows.

    One thin SVD of ``W S`` per target serves all its candidate ratios; each candidate replaces ``W`` in place by
    its rank-``k`` reconstruction, runs the model from ``W``'s block on (earlier blocks replay their cached dense
    output), and restores ``W``. Cost: ``#targets × #ratios`` partial forwards (plus one SVD per target). On
    SmolLM2-135M (210 targets, 6 ratios, 4 × 512 tokens) that is 1 260 forwards from the middle of the model on
    average, the 28 M-parameter LM head always included: about an hour on 2 CPU cores (estimate), a quarter of
    that with ``max_windows = 1``. Hence an option, not the default ASVD recipe (uniform ranks).
    """
    ratios = _check_ratios(tuple(ratios))
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or null, got {max_windows}")
    device = torch.device(device)
    targets = targets or find_targets(model)
    used = windows if max_windows is None else windows[:max_windows]
    space = bind(whitening, stats, 0.0, device=device)  # ASVD's scalings are diagonal: no damping
    batches = [used[s : s + batch_size].to(device) for s in range(0, used.shape[0], batch_size)]
    model.to(device)

    def mean_loss() -> float:
        total, count = 0.0, 0
        for bi, batch in enumerate(batches):
            if replay is not None:
                replay.cached = hidden[bi]
            loss, n = causal_lm_loss(model, batch)
            total += float(loss) * n
            count += n
        return total / count

    _, blocks = find_blocks(model)
    originals = list(blocks)
    replay: _Replay | None = None
    hidden: list[torch.Tensor] = []
    dense_ppl = math.exp(mean_loss())
    inputs = capture_block_inputs(model, used, batch_size, device)  # dense inputs of block 0, advanced below
    as_tuple = inputs.as_tuple
    by_block = targets_by_block(targets)
    table: dict[str, torch.Tensor] = {}
    try:
        for b in progress(range(len(originals)), desc="sensitivity", total=len(originals)):
            if b > 0:  # replay block b's dense inputs: blocks 0 … b−1 are skipped
                replay = _Replay(as_tuple)
                for j in range(b):
                    blocks[j] = _Replay(as_tuple) if j < b - 1 else replay
                hidden = inputs.hidden
            for t in by_block.get(b, []):
                mod = model.get_submodule(t.name)
                W = linear_weight(mod).detach()
                S = space.input(t.name)
                W64 = W.to(torch.float64)
                U, sigma, Vh = torch.linalg.svd(W64 if S is None else whiten(W64, S), full_matrices=False)
                saved = mod.weight.detach().clone()
                row = []
                for r in ratios:
                    k = candidate_rank(t.shape, r)
                    if k is None:  # a matrix too small to factor is never truncated: no change
                        row.append(dense_ppl)
                        continue
                    Bk = Vh[:k] * sigma[:k, None]  # Σ_k V_kᵀ, [k, n]
                    if S is not None:
                        Bk = unwhiten_right(Bk, S)
                    Wk = (U[:, :k] @ Bk).to(W.dtype)  # [m, n]
                    mod.weight.data.copy_(Wk.T if weight_is_transposed(mod) else Wk)
                    row.append(math.exp(mean_loss()))
                mod.weight.data.copy_(saved)
                table[t.name] = torch.tensor(row, dtype=torch.float64)
            for j in range(b):  # the originals back, then block b's dense outputs become block b+1's inputs
                blocks[j] = originals[j]
            replay = None
            _advance(originals[b], inputs, b)
    finally:
        for j, blk in enumerate(originals):
            blocks[j] = blk
    return Sensitivity(ppl=table, ratios=ratios, dense_ppl=dense_ppl,
                       tokens=int(used.shape[0] * (used.shape[1] - 1)), whitening=whitening)


def _advance(block: nn.Module, inputs: BlockInputs, b: int) -> None:
    """``inputs.hidden`` ← dense block ``b``'s outputs, each batch with that block's recorded arguments."""
    for bi in range(len(inputs.hidden)):
        args, kwargs = inputs.calls[bi][b]
        inputs.hidden[bi] = block_output(block(inputs.hidden[bi], *args, **kwargs))

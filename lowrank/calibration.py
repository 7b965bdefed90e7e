"""Calibration statistics, streamed one decoder block at a time.

The model's blocks are run in order over the calibration windows: the inputs of block ``i`` for every batch are
held (on the compute device), block ``i`` alone is moved to the device and run, forward hooks on its target
linears accumulate statistics, and its outputs become block ``i + 1``'s inputs. Only one block's weights and one
set of boundary activations are resident, never the whole model's activations.

Statistic kinds (:data:`STATS`; each is computed once per model and shared by every method and ratio):

* ``input_gram`` (SVD-LLM, ZS-SVD): for each distinct input tensor of a block (q/k/v share one, so do gate/up),
  the second moment ``C = XᵀX / N`` with ``X ∈ R^{N×n}`` the N calibration tokens, accumulated in float64.
* ``act_scale`` (ASVD): per distinct input, the mean absolute activation of each input channel,
  ``a_j = (1/N) Σ_t |x_tj|``; ASVD's scaling is ``s = a^α`` (``α`` stored with the statistic).
* ``fisher`` (FWSVD): per target, the empirical Fisher information of ``W`` collapsed to one importance per
  input column, ``F_j = Σ_i F_ij`` with ``F_ij = (1/B) Σ_b (∂L_b/∂W_ij)²`` over ``B`` calibration batches
  (one window each by default: per-sequence gradients); FWSVD's scaling is ``d = (√F)^α``.
* ``output_kl`` (IO-SVD): per target, the output-side metric ``C = (1/N) Σ_t Σ_{k∈top-K} p_{t,k} s sᵀ`` with
  ``s = ∂log p_{t,k}/∂y`` (:mod:`lowrank.output_metric`; K backward passes per window, streamed block by
  block when the model is lazy).
* ``asvd_sensitivity`` (ASVD's rank choice, optional and expensive): calibration perplexity with one target
  alone truncated to each candidate keep ratio (:mod:`lowrank.sensitivity`).

Which targets share an input is found by tensor identity during the forward pass (a structural fact of the
block), not by module names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .blocks import BlockInputs, capture_block_inputs, offload_block_inputs, stream_blocks, targets_by_block
from .gradients import calibration_gradients
from .grams import gram_update, resolve_precision
from .model import Target, find_targets
from .output_metric import collect_output_kl
from .sensitivity import CANDIDATE_RATIOS, measure_sensitivity
from .statistics import (STAT_LOADERS, ActScales, FisherColumns, InputGrams, Sensitivity, check_alpha,
                         load_stat)

__all__ = ["BlockInputs", "capture_block_inputs", "stream_blocks", "InputGrams", "collect_input_grams",
           "ActScales", "collect_act_scales", "FisherColumns", "collect_fisher", "collect_asvd_sensitivity",
           "Stat", "STATS", "STAT_LOADERS", "load_stat"]  # the statistics' types and loaders: lowrank.statistics

log = logging.getLogger(__name__)


def _collect_per_input(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                       targets: list[Target], accumulate: Callable[[str, torch.Tensor], None],
                       finish_group: Callable[[str], None], desc: str) -> dict[str, str]:
    """Stream the blocks and feed every *distinct* target input to ``accumulate(group, X)``.

    ``X`` is the input reshaped to ``[N_b, n]`` (model dtype, on ``device``); targets reading the same tensor in
    one forward (q/k/v, gate/up) form one group, named after the first of them to run. After each block,
    ``finish_group(group)`` is called once per group of that block (reduce, move to CPU). Returns
    ``group_of[target]``.
    """
    by_block = targets_by_block(targets)
    group_of: dict[str, str] = {}
    inputs = capture_block_inputs(model, windows, batch_size, device)
    offload_block_inputs(inputs, device)  # to CPU memory when one boundary does not fit on the device

    def on_block(i: int, block: nn.Module) -> Callable[[], None]:
        seen: list[tuple[torch.Tensor, str]] = []  # input tensors of the current batch and their group
        handles = []
        first_pass: dict[str, str] = {}

        def _assign(name: str, group: str) -> None:
            prev = first_pass.setdefault(name, group)
            if prev != group:
                raise RuntimeError(f"target {name} changed input group between batches ({prev} -> {group})")

        def hook_for(name: str):
            def hook(_mod: nn.Module, args: tuple, _out: Any) -> None:
                x = args[0]
                for t, g in seen:
                    if t is x:
                        _assign(name, g)
                        return
                seen.append((x, name))
                _assign(name, name)
                accumulate(name, x.reshape(-1, x.shape[-1]))  # [N_b, n]

            return hook

        for t in by_block.get(i, []):
            handles.append(model.get_submodule(t.name).register_forward_hook(hook_for(t.name)))

        orig_forward = block.forward

        def forward_clearing(*args: Any, **kwargs: Any) -> Any:
            seen.clear()
            try:
                return orig_forward(*args, **kwargs)
            finally:
                seen.clear()

        block.forward = forward_clearing  # type: ignore[method-assign]

        def finish() -> None:
            for h in handles:
                h.remove()
            del block.forward
            group_of.update(first_pass)
            for g in sorted(set(first_pass.values())):
                finish_group(g)

        return finish

    stream_blocks(model, inputs, device, on_block, desc=desc)
    missing = [t.name for t in targets if t.name not in group_of]
    if missing:
        raise RuntimeError(f"{len(missing)} targets never ran during calibration, e.g. {missing[:3]}")
    return group_of


def collect_input_grams(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                        targets: list[Target] | None = None, precision: str = "auto") -> InputGrams:
    """Input second moments ``C = XᵀX/N`` of every target, one per distinct input tensor, streamed block by block.

    ``precision``: how each batch's ``XᵀX`` is formed before it is added to the float64 sum (:mod:`lowrank.grams`:
    ``float64``, ``mixed``, or ``auto`` = mixed)."""
    resolve_precision(precision)  # a bad value fails before the model runs
    G: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    def accumulate(group: str, x: torch.Tensor) -> None:
        if group not in G:
            G[group] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            tokens[group] = 0
        gram_update(G[group], x, precision)  # float64 sum; per-batch product as `precision` says
        tokens[group] += x.shape[0]

    def finish_group(group: str) -> None:
        G[group] = (G[group] / tokens[group]).cpu()  # C = XᵀX / N

    group_of = _collect_per_input(model, windows, batch_size, device, targets or find_targets(model), accumulate,
                                  finish_group, "input grams")
    return InputGrams(C=G, group_of=group_of, tokens=tokens)


def collect_act_scales(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                       targets: list[Target] | None = None, alpha: float = 0.5) -> ActScales:
    """Mean ``|x_j|`` of every target's input channels over all calibration tokens, streamed block by block.

    ASVD (its ``abs_mean`` mode) sums per-batch means, ``Σ_b mean_t |x_tj|``: the same vector up to the constant
    number of batches, which no SVD of ``W diag(s)`` can see. The token mean here does not depend on the batch
    size.
    """
    alpha = check_alpha(alpha, "act_scale")
    A: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    def accumulate(group: str, x: torch.Tensor) -> None:
        a = x.abs().sum(dim=0, dtype=torch.float64)  # [n]
        if group not in A:
            A[group] = torch.zeros_like(a)
            tokens[group] = 0
        A[group].add_(a)
        tokens[group] += x.shape[0]

    def finish_group(group: str) -> None:
        A[group] = (A[group] / tokens[group]).cpu()

    group_of = _collect_per_input(model, windows, batch_size, device, targets or find_targets(model), accumulate,
                                  finish_group, "activation scales")
    return ActScales(mean_abs=A, group_of=group_of, tokens=tokens, alpha=alpha)


def collect_fisher(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                   targets: list[Target] | None = None, alpha: float = 1.0, max_windows: int | None = 16,
                   windows_per_backward: int = 1) -> FisherColumns:
    """Column Fisher of every target from one forward + backward per ``windows_per_backward`` windows.

    Uses the first ``max_windows`` calibration windows (``None``: all). ``windows_per_backward = 1`` squares
    per-sequence gradients, the empirical Fisher of ASVD's FWSVD (one 2048-token sequence per backward); larger
    batches are cheaper per token but average gradients before squaring, which shrinks the estimate. The
    calibration ``batch_size`` is not used: the two costs differ (a backward holds every activation).
    """
    alpha = check_alpha(alpha, "fisher")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"statistics.fisher.max_windows must be >= 1 or null, got {max_windows}")
    if windows_per_backward < 1:
        raise ValueError(f"statistics.fisher.windows_per_backward must be >= 1, got {windows_per_backward}")
    targets = targets or find_targets(model)
    used = windows if max_windows is None else windows[:max_windows]
    # streamed block by block; only the column sums Σ_i Σ_b g² are accumulated (no m×n Fisher, no G)
    grads = calibration_gradients(model, used, windows_per_backward, device, targets=targets, fisher="columns",
                                  need_G=False)
    if grads.fisher is None:  # pragma: no cover - asked for above
        raise RuntimeError("calibration_gradients returned no Fisher information")
    batches = -(-used.shape[0] // windows_per_backward)
    F = {name: (f / batches).cpu() for name, f in grads.fisher.items()}  # Σ_i mean_b g², [n]
    return FisherColumns(F=F, batches=batches, tokens=grads.tokens, alpha=alpha, loss=grads.loss)


def collect_asvd_sensitivity(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                             alpha: float = 0.5, max_windows: int | None = 4,
                             ratios: list[float] | tuple[float, ...] | None = None) -> Sensitivity:
    """ASVD's sensitivity table (:func:`lowrank.sensitivity.measure_sensitivity`) in the ``act_scale`` space.

    The activation scales come from every calibration window (one streamed forward, as the ``act_scale``
    statistic); the perplexities from the first ``max_windows``. Expensive: ``#targets × #ratios`` forwards.
    """
    scales = collect_act_scales(model, windows, batch_size, device, alpha=alpha)
    return measure_sensitivity(model, windows, batch_size, device, {"act_scale": scales}, "act_scale",
                               tuple(ratios) if ratios is not None else CANDIDATE_RATIOS, max_windows)


@dataclass(frozen=True)
class Stat:
    """How one statistic kind is collected: ``collect(model, windows, batch_size, device, **options)`` returns the
    object of :mod:`lowrank.statistics` that ``to_tensors()`` writes (options: the config's ``statistics.<kind>``
    slice); ``streamed``: one decoder block at a time, so a lazy (larger-than-memory) model works. Reading a
    statistic back is :data:`lowrank.statistics.STAT_LOADERS`."""

    collect: Callable[..., Any]
    streamed: bool


# the registry of collectors: adding a statistic is one entry here, its type and loader in lowrank.statistics, and
# its name in the schema's enums
STATS: dict[str, Stat] = {
    "input_gram": Stat(collect_input_grams, streamed=True),
    "act_scale": Stat(collect_act_scales, streamed=True),
    "fisher": Stat(collect_fisher, streamed=True),
    "asvd_sensitivity": Stat(collect_asvd_sensitivity, streamed=False),
    "output_kl": Stat(collect_output_kl, streamed=True),
}

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
  ``s = ∂log p_{t,k}/∂y`` (:mod:`lowrank.output_metric`; K backward passes per window, not streamed).
* ``asvd_sensitivity`` (ASVD's rank choice, optional and expensive): calibration perplexity with one target
  alone truncated to each candidate keep ratio (:mod:`lowrank.sensitivity`).

Which targets share an input is found by tensor identity during the forward pass (a structural fact of the
block), not by module names.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .grams import gram_update
from .model import Target, find_blocks, find_targets
from .output_metric import OutputMetrics, collect_output_kl
from .runtime import progress
from .whitening import WhiteningFactor, whitening_factor

__all__ = ["BlockInputs", "capture_block_inputs", "stream_blocks", "InputGrams", "collect_input_grams",
           "ActScales", "collect_act_scales", "FisherColumns", "collect_fisher", "collect_asvd_sensitivity",
           "STATS", "STAT_LOADERS", "load_stat"]

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a decoder block: records its call, passes the hidden states through unchanged.

    ``as_tuple`` makes it return ``(hidden_states,)``, for models whose blocks return tuples (transformers 4.x
    decoder layers) and whose loop then takes ``outputs[0]``: returning a bare tensor there would silently index
    the batch. ``stop`` raises after recording, so the stem runs no further than this block.
    """

    def __init__(self, stop: bool, record: list[tuple[torch.Tensor, tuple, dict]], as_tuple: bool) -> None:
        super().__init__()
        self.stop, self.record, self.as_tuple = stop, record, as_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden_states = args[0] if args else kwargs.pop("hidden_states")
        self.record.append((hidden_states, args[1:], kwargs))
        if self.stop:
            raise _StopForward
        return (hidden_states,) if self.as_tuple else hidden_states


@dataclass
class BlockInputs:
    """Per batch: the hidden states entering block 0, and the extra (args, kwargs) each block is called with.

    ``calls[b][i]`` holds block ``i``'s positional and keyword arguments for batch ``b`` after the hidden states
    (attention masks, rotary embeddings, ...); models whose blocks get different masks (sliding-window layers)
    or different rotary tables (local / global layers) are handled since each block's own call is recorded.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    calls: list[list[tuple[tuple, dict]]] = field(default_factory=list)


def _run_stem(model: nn.Module, batch: torch.Tensor) -> None:
    try:
        model(input_ids=batch, use_cache=False)
    except _StopForward:
        pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device
                         ) -> BlockInputs:
    """Run the model's stem on each batch of ``windows`` with every block replaced by a pass-through catcher.

    The catchers must return what a real block returns (a tensor, or a tuple whose first item is the hidden
    states); that convention is learned first by running the real block 0 once on the first batch's inputs.
    """
    _, blocks = find_blocks(model)
    originals = list(blocks)
    n_blocks = len(blocks)
    record: list[tuple[torch.Tensor, tuple, dict]] = []
    out = BlockInputs()
    moved = _move_stem(model, originals, device)  # embeddings, rotary tables, masks' buffers; blocks stay put
    try:
        # 1. the output convention of a block: catch block 0 on the first batch and run the real block once
        blocks[0] = _Catcher(True, record, as_tuple=False)
        _run_stem(model, windows[:batch_size].to(device))
        if len(record) != 1:
            raise RuntimeError(f"{type(model).__name__} did not call its first decoder block: cannot stream it")
        h0, args, kwargs = record[0]
        from .sharded import place_block, release_block  # a lazy (meta) model loads its block here

        blocks[0] = originals[0]
        home = place_block(model, 0, device)
        as_tuple = isinstance(originals[0](h0, *args, **kwargs), (tuple, list))
        release_block(model, 0, home)
        # 2. every block's call, every batch
        for i in range(n_blocks):
            blocks[i] = _Catcher(i == n_blocks - 1, record, as_tuple)
        for start in range(0, windows.shape[0], batch_size):
            record.clear()
            _run_stem(model, windows[start : start + batch_size].to(device))
            if len(record) != n_blocks:
                raise RuntimeError(f"captured {len(record)} of {n_blocks} block calls: the model does not call "
                                   "its blocks in sequence")
            out.hidden.append(record[0][0])
            out.calls.append([(a, dict(k)) for _, a, k in record])
        record.clear()
    finally:
        for i, blk in enumerate(originals):
            blocks[i] = blk
        for mod in moved:
            mod.to("cpu")
    return out


def _move_stem(model: nn.Module, blocks: list[nn.Module], device: torch.device) -> list[nn.Module]:
    """Move every parameter/buffer-holding module outside the blocks to ``device``; returns what was moved."""
    if device.type == "cpu":
        return []
    block_ids = {id(m) for b in blocks for m in b.modules()}
    moved = []
    for mod in model.modules():
        if id(mod) in block_ids:
            continue
        own = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        if own:
            mod.to(device)
            moved.append(mod)
    return moved


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def stream_blocks(model: nn.Module, inputs: BlockInputs, device: torch.device,
                  on_block: Callable[[int, nn.Module], Callable[[], None]] | None = None,
                  desc: str = "blocks") -> None:
    """Run every block over every batch in order, moving one block at a time to ``device``.

    ``on_block(i, block)`` is called before block ``i`` runs and returns a finaliser called after it (install
    hooks, then remove them and reduce). ``inputs.hidden`` is advanced in place to each block's outputs.
    """
    from .sharded import place_block, release_block  # a lazy (meta) model loads each block from its shards

    _, blocks = find_blocks(model)
    for i in progress(range(len(blocks)), desc=desc, total=len(blocks)):
        block = blocks[i]
        home = place_block(model, i, device)
        finish = on_block(i, block) if on_block else None
        for b in range(len(inputs.hidden)):
            args, kwargs = inputs.calls[b][i]
            x = inputs.hidden[b]  # on the device, or in CPU memory when offloaded (lowrank.streaming)
            inputs.hidden[b] = _block_output(block(x.to(device), *args, **kwargs)).to(x.device)
        if finish:
            finish()
        release_block(model, i, home)


@dataclass
class InputGrams:
    """Second moments ``C = XᵀX/N`` per shared-input group, and which targets read each group.

    ``C[group]`` is float64 n×n; ``group_of[target]`` names the group; ``tokens[group]`` is N.
    """

    C: dict[str, torch.Tensor]
    group_of: dict[str, str]
    tokens: dict[str, int]
    _factors: dict = field(default_factory=dict, repr=False, compare=False)
    factor_methods: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def for_target(self, name: str) -> torch.Tensor:
        if name not in self.group_of:
            raise KeyError(f"no input statistics for target {name!r}; recompute the calibration statistics of "
                           "this model (they belong to another model or an older run)")
        return self.C[self.group_of[name]]

    def factor_for(self, name: str, damping: float, device: torch.device | str = "cpu") -> WhiteningFactor:
        """The whitening factor of ``name``'s input group, computed once per group and cached."""
        group = self.group_of.get(name)
        key = (group, damping, str(device))
        if key not in self._factors:
            self._factors.clear()  # one group at a time: targets come in block order, a group's use is contiguous
            self._factors[key] = whitening_factor(self.for_target(name).to(device), damping=damping)
            self.factor_methods[group] = self._factors[key].method  # cholesky / jitter / eig_clamp, for reports
        return self._factors[key]

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Flat float32 tensors + metadata, for :func:`lowrank.io.save_tensors`."""
        tensors = {f"C.{g}": c.to(torch.float32) for g, c in self.C.items()}
        return tensors, {"kind": "input_gram", "group_of": self.group_of, "tokens": self.tokens}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "InputGrams":
        C = {k[2:]: v.to(torch.float64) for k, v in tensors.items() if k.startswith("C.")}
        return cls(C=C, group_of=dict(meta["group_of"]), tokens={k: int(v) for k, v in meta["tokens"].items()})


def _collect_per_input(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                       targets: list[Target], accumulate: Callable[[str, torch.Tensor], None],
                       finish_group: Callable[[str], None], desc: str) -> dict[str, str]:
    """Stream the blocks and feed every *distinct* target input to ``accumulate(group, X)``.

    ``X`` is the input reshaped to ``[N_b, n]`` (model dtype, on ``device``); targets reading the same tensor in
    one forward (q/k/v, gate/up) form one group, named after the first of them to run. After each block,
    ``finish_group(group)`` is called once per group of that block (reduce, move to CPU). Returns
    ``group_of[target]``.
    """
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)
    group_of: dict[str, str] = {}
    inputs = capture_block_inputs(model, windows, batch_size, device)
    from .streaming import offload_block_inputs

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
                        targets: list[Target] | None = None) -> InputGrams:
    """Input second moments ``C = XᵀX/N`` of every target, one per distinct input tensor, streamed block by block."""
    G: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    def accumulate(group: str, x: torch.Tensor) -> None:
        if group not in G:
            G[group] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            tokens[group] = 0
        gram_update(G[group], x)  # float64 sum; per-batch product in float32 on CUDA (lowrank.grams)
        tokens[group] += x.shape[0]

    def finish_group(group: str) -> None:
        G[group] = (G[group] / tokens[group]).cpu()  # C = XᵀX / N

    group_of = _collect_per_input(model, windows, batch_size, device, targets or find_targets(model), accumulate,
                                  finish_group, "input grams")
    return InputGrams(C=G, group_of=group_of, tokens=tokens)


def _check_alpha(alpha: float, kind: str) -> float:
    alpha = float(alpha)
    if not (alpha >= 0 and alpha == alpha and alpha != float("inf")):
        raise ValueError(f"statistics.{kind}.alpha must be a finite number >= 0, got {alpha}")
    return alpha


@dataclass
class ActScales:
    """ASVD's activation statistic: mean absolute input per channel, per shared-input group.

    ``mean_abs[group]`` is float64 (n,), ``a_j = (1/N) Σ_t |x_tj|``; ``group_of[target]`` names the group;
    ``tokens[group]`` is N; ``alpha`` is ASVD's exponent, so the scaling of a target is ``s = a^α``
    (:meth:`scale_for`). ``α = 0`` gives ``s = 1`` (plain SVD); ASVD's default is 0.5.
    """

    mean_abs: dict[str, torch.Tensor]
    group_of: dict[str, str]
    tokens: dict[str, int]
    alpha: float = 0.5

    def __post_init__(self) -> None:
        self.alpha = _check_alpha(self.alpha, "act_scale")

    def scale_for(self, name: str) -> torch.Tensor:
        """``s = a^α`` (float64, n) of target ``name``'s input channels."""
        if name not in self.group_of:
            raise KeyError(f"no activation scales for target {name!r}; recompute the calibration statistics of "
                           "this model (they belong to another model or an older run)")
        return self.mean_abs[self.group_of[name]].pow(self.alpha)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"mean_abs.{g}": a.to(torch.float32) for g, a in self.mean_abs.items()}
        return tensors, {"kind": "act_scale", "group_of": self.group_of, "tokens": self.tokens,
                         "alpha": self.alpha}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "ActScales":
        p = "mean_abs."
        mean_abs = {k[len(p):]: v.to(torch.float64) for k, v in tensors.items() if k.startswith(p)}
        return cls(mean_abs=mean_abs, group_of=dict(meta["group_of"]),
                   tokens={k: int(v) for k, v in meta["tokens"].items()}, alpha=float(meta["alpha"]))


def collect_act_scales(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                       targets: list[Target] | None = None, alpha: float = 0.5) -> ActScales:
    """Mean ``|x_j|`` of every target's input channels over all calibration tokens, streamed block by block.

    ASVD (its ``abs_mean`` mode) sums per-batch means, ``Σ_b mean_t |x_tj|``: the same vector up to the constant
    number of batches, which no SVD of ``W diag(s)`` can see. The token mean here does not depend on the batch
    size.
    """
    alpha = _check_alpha(alpha, "act_scale")
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


@dataclass
class FisherColumns:
    """FWSVD's statistic: empirical Fisher information of each target collapsed onto its input columns.

    ``F[target]`` is float64 (n,), ``F_j = Σ_i (1/B) Σ_b (∂L_b/∂W_ij)²`` (``L_b`` the token-mean loss of
    calibration batch ``b``, ``B`` batches). The importance of input column ``j`` is ``d_j = √F_j`` (Hsu et al.'s
    row importance, in their in×out layout) and the scaling is ``d^α`` (:meth:`scale_for`); ``α = 1`` is the
    paper's form, ASVD's code uses 0.5.
    """

    F: dict[str, torch.Tensor]
    batches: int
    tokens: int
    alpha: float = 1.0
    loss: float | None = None

    def __post_init__(self) -> None:
        self.alpha = _check_alpha(self.alpha, "fisher")

    def scale_for(self, name: str) -> torch.Tensor:
        """``d^α = F^{α/2}`` (float64, n) of target ``name``'s input columns."""
        if name not in self.F:
            raise KeyError(f"no Fisher information for target {name!r}; recompute the calibration statistics of "
                           "this model (they belong to another model or an older run)")
        return self.F[name].sqrt().pow(self.alpha)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"F.{n}": f.to(torch.float32) for n, f in self.F.items()}
        return tensors, {"kind": "fisher", "batches": self.batches, "tokens": self.tokens, "alpha": self.alpha,
                         "loss": self.loss}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "FisherColumns":
        F = {k[2:]: v.to(torch.float64) for k, v in tensors.items() if k.startswith("F.")}
        return cls(F=F, batches=int(meta["batches"]), tokens=int(meta["tokens"]), alpha=float(meta["alpha"]),
                   loss=meta.get("loss"))


def collect_fisher(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                   targets: list[Target] | None = None, alpha: float = 1.0, max_windows: int | None = 16,
                   windows_per_backward: int = 1) -> FisherColumns:
    """Column Fisher of every target from one forward + backward per ``windows_per_backward`` windows.

    Uses the first ``max_windows`` calibration windows (``None``: all). ``windows_per_backward = 1`` squares
    per-sequence gradients, the empirical Fisher of ASVD's FWSVD (one 2048-token sequence per backward); larger
    batches are cheaper per token but average gradients before squaring, which shrinks the estimate. The
    calibration ``batch_size`` is not used: the two costs differ (a backward holds every activation).
    """
    from .gradients import calibration_gradients

    alpha = _check_alpha(alpha, "fisher")
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
                             ratios: list[float] | tuple[float, ...] | None = None) -> Any:
    """ASVD's sensitivity table (:func:`lowrank.sensitivity.measure_sensitivity`) in the ``act_scale`` space.

    The activation scales come from every calibration window (one streamed forward, as the ``act_scale``
    statistic); the perplexities from the first ``max_windows``. Expensive: ``#targets × #ratios`` forwards.
    """
    from .sensitivity import CANDIDATE_RATIOS, measure_sensitivity

    scales = collect_act_scales(model, windows, batch_size, device, alpha=alpha)
    return measure_sensitivity(model, windows, batch_size, device, {"act_scale": scales}, "act_scale",
                               tuple(ratios) if ratios is not None else CANDIDATE_RATIOS, max_windows)


def _load_sensitivity(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Any:
    from .sensitivity import Sensitivity

    return Sensitivity.from_tensors(tensors, meta)


# statistic kind -> collector(model, windows, batch_size, device, **options) returning an object with
# to_tensors(); options are the config's statistics.<kind> slice
STATS: dict[str, Callable[..., Any]] = {
    "input_gram": collect_input_grams,
    "act_scale": collect_act_scales,
    "fisher": collect_fisher,
    "asvd_sensitivity": collect_asvd_sensitivity,
    "output_kl": collect_output_kl,
}
# statistic kind -> from_tensors(tensors, metadata), the inverse of to_tensors()
STAT_LOADERS: dict[str, Callable[[dict[str, torch.Tensor], dict[str, Any]], Any]] = {
    "input_gram": InputGrams.from_tensors,
    "act_scale": ActScales.from_tensors,
    "fisher": FisherColumns.from_tensors,
    "asvd_sensitivity": _load_sensitivity,
    "output_kl": OutputMetrics.from_tensors,
}


def load_stat(path: str | os.PathLike) -> Any:
    """Load a statistics file written from ``to_tensors()``; its kind is read from the file's metadata."""
    from .io import load_tensors

    tensors, meta = load_tensors(path)
    kind = meta.get("kind")
    if kind not in STAT_LOADERS:
        raise ValueError(f"{path}: unknown statistics kind {kind!r}; recompute it with this version of lowrank")
    return STAT_LOADERS[kind](tensors, meta)

"""Streamed calibration gradients: one decoder block resident at a time, forward then backward block by block.

The calibration loss ``L = (1/N) Σ_b n_b L_b`` (``L_b`` the token-mean next-token cross-entropy of batch ``b``,
``n_b`` its predictions) is differentiated without ever holding the whole model's activations:

1. **Forward, keeping boundaries only.** The stem (embeddings, rotary tables, masks) runs once per batch with
   the blocks replaced by catchers (:func:`lowrank.calibration.capture_block_inputs`); then block ``i`` alone runs over
   every batch without autograd, and its input ``h_i`` is stored (on the accelerator when every boundary fits,
   else in CPU memory: :class:`BoundaryStore`). Memory: one block + ``L+1`` boundary activations.
2. **Head.** With every block replaced by a stand-in that returns the stored last boundary ``h_L`` (a leaf that
   requires grad), the model's own forward applies its final norm and LM head; ``δ_L = ∂L_b/∂h_L`` per batch.
3. **Backward, block by block from the last.** Block ``i`` is recomputed from its saved input with autograd
   (activation checkpointing with offload): ``∂L_b/∂W = ∂(block(h_i))/∂W · δ_{i+1}`` for its target weights and
   ``δ_i = ∂(block(h_i))/∂h_i · δ_{i+1}``, one ``torch.autograd.grad`` per batch. Peak memory is one block's
   weights and activations for one batch plus the boundaries.

Accumulation (float64 by default, on the accelerator during the block, then to CPU):

* ``G = Σ_b (n_b/N) ∂L_b/∂W`` (m×n, ``y = W x`` orientation) = ``∂L/∂W``, exact for any batch size;
* optionally Fisher, either full ``Σ_b (∂L_b/∂W)²`` (m×n) or only its column reduction
  ``Σ_b Σ_i (∂L_b/∂W_ij)²`` (n,), all FWSVD needs.

When a block's gradients are complete, ``on_block(i, G_i, F_i)`` is called while the block is still resident on
the device: a caller that scores (or reduces) them at once and drops them keeps only one block of gradients
alive (``keep=False``), e.g. the fused gradient + scoring of :func:`fused_scores`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import torch
from torch import nn

from .calibration import _block_output, _move_stem, capture_block_inputs
from .gradients import TargetGradients
from .model import Target, find_blocks, find_targets, weight_is_transposed
from .runtime import progress
from .sharded import place_block, release_block

__all__ = ["BoundaryStore", "TokenProbe", "streamed_gradients", "fused_scores", "offload_block_inputs", "FisherMode",
           "OFFLOAD_MODES", "boundary_bytes"]

log = logging.getLogger(__name__)

FisherMode = Literal["none", "full", "columns"]
OFFLOAD_MODES = ("auto", "device", "cpu")


def boundary_bytes(windows: torch.Tensor, hidden: int, n_blocks: int, dtype: torch.dtype) -> int:
    """Bytes of the ``n_blocks + 1`` boundary activations of ``windows`` ([B, T]) of width ``hidden``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(windows.numel()) * hidden * (n_blocks + 1) * itemsize


def _resolve_offload(offload: str, device: torch.device, need: int, fraction: float = 0.5) -> torch.device:
    """Where boundaries live: ``device``, ``cpu``, or ``auto`` = the device when ``need`` fits in ``fraction`` of
    its free memory (always the device on CPU)."""
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"boundary offload must be one of {OFFLOAD_MODES}, got {offload!r}")
    if offload == "cpu" or device.type == "cpu":
        return torch.device("cpu")
    if offload == "device":
        return device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return device if need <= fraction * free else torch.device("cpu")
    return torch.device("cpu")  # pragma: no cover - other accelerators: be safe


def offload_block_inputs(inputs: Any, device: torch.device | str, offload: str = "auto") -> torch.device:
    """Move the captured block inputs (:class:`lowrank.calibration.BlockInputs`) to where they should live while
    the statistics stream: the device when one boundary fits in half its free memory (``auto``), else CPU."""
    device = torch.device(device)
    if not inputs.hidden:
        return device
    need = sum(h.numel() * h.element_size() for h in inputs.hidden)
    home = _resolve_offload(offload, device, need)
    if home != inputs.hidden[0].device:
        pin = home.type == "cpu" and device.type == "cuda"
        inputs.hidden = [h.to(home).pin_memory() if pin else h.to(home) for h in inputs.hidden]
    return home


class BoundaryStore:
    """``h[i][b]``: the input of block ``i`` (``i = L`` the last block's output) for batch ``b``, kept on ``home``
    (pinned when on CPU and the compute device is CUDA, for asynchronous copies)."""

    def __init__(self, home: torch.device, device: torch.device) -> None:
        self.home, self.device = home, device
        self.h: list[list[torch.Tensor]] = []
        self._pin = home.type == "cpu" and device.type == "cuda"

    def put(self, i: int, b: int, x: torch.Tensor) -> None:
        while len(self.h) <= i:
            self.h.append([])
        row = self.h[i]
        if self._pin:  # device -> pinned host copy, ordered on the stream before any later copy back
            y = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
            y.copy_(x.detach(), non_blocking=True)
        else:
            y = x.detach().to(self.home)
        if b == len(row):
            row.append(y)
        else:
            row[b] = y

    def get(self, i: int, b: int) -> torch.Tensor:
        return self.h[i][b].to(self.device, non_blocking=True)

    def drop(self, i: int) -> None:
        """Free block ``i``'s inputs once the backward has passed it."""
        if i < len(self.h):
            self.h[i] = []


class _Emit(nn.Module):
    """Stand-in block for the head pass: the last one returns the injected hidden states, the others pass through."""

    def __init__(self, inject: list[torch.Tensor | None], as_tuple: bool) -> None:
        super().__init__()
        self.inject, self.as_tuple = inject, as_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        if self.inject[0] is not None:
            h = self.inject[0]
        return (h,) if self.as_tuple else h


@dataclass
class _Acc:
    """Per-target accumulators of one block (on the compute device)."""

    G: torch.Tensor | None
    F: torch.Tensor | None


class TokenProbe(Protocol):
    """Receives every target's per-token input and output gradient during the streamed backward."""

    def begin_block(self, i: int, targets: list[Target]) -> None: ...

    def add(self, name: str, x: torch.Tensor, d: torch.Tensor, n_b: int) -> None: ...

    def end_block(self, i: int) -> None: ...


def _capture_hook(name: str, captured: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Callable[..., None]:
    """Forward hook: keep the module's input and, once the backward reaches it, the gradient at its output."""

    def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        x = args[0].detach()

        def on_grad(d: torch.Tensor) -> None:
            if name in captured:
                raise ValueError(f"target {name!r} ran twice in one block call; per-token statistics need one call")
            captured[name] = (x, d.detach())

        out.register_hook(on_grad)

    return hook


def streamed_gradients(model: nn.Module, windows: torch.Tensor, batch_size: int,
                       device: torch.device | str = "cpu", targets: list[Target] | None = None,
                       fisher: FisherMode | bool = "none", need_G: bool = True,
                       accumulate_dtype: torch.dtype = torch.float64, offload: str = "auto",
                       on_block: Callable[[int, dict[str, torch.Tensor], dict[str, torch.Tensor] | None], None]
                       | None = None, keep: bool = True, probe: TokenProbe | None = None) -> TargetGradients:
    """``∂L/∂W`` (and optionally Fisher) of every target over ``windows``, streamed block by block.

    Same result as :func:`lowrank.gradients.calibration_gradients` (up to floating-point summation order), with
    peak accelerator memory of about one block plus the boundary activations (``offload="cpu"``: one block plus
    one batch's boundary). The model may live on CPU: each block is moved to ``device`` for its passes and back.
    ``fisher``: ``"none"``, ``"full"`` (m×n ``Σ_b g_b²``, ``True`` means this) or ``"columns"`` (n-vector
    ``Σ_b Σ_i g_b²``). ``on_block(i, G_i, F_i)`` receives each block's finished (CPU) accumulators; with
    ``keep=False`` they are not retained in the result.

    ``probe`` (:class:`TokenProbe`): per-token statistics. Before block ``i``'s backward ``probe.begin_block(i,
    targets)`` is called (the block resident, its weights final); during it, hooks hand every target's input
    ``x`` ([b, T, n]) and the gradient ``d = ∂L_b/∂y`` of the batch's token-mean loss at its output ([b, T, m])
    to ``probe.add(name, x, d, n_b)`` (``n_b`` the batch's predictions); ``probe.end_block(i)`` closes the
    block before ``on_block`` is called.
    """
    device = torch.device(device)
    fisher_mode: str = "full" if fisher is True else ("none" if fisher is False else str(fisher))
    if fisher_mode not in ("none", "full", "columns"):
        raise ValueError(f"fisher must be 'none', 'full' or 'columns', got {fisher!r}")
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be LongTensor[B, T] with T >= 2, got shape {tuple(windows.shape)}")
    targets = targets or find_targets(model)
    _, blocks = find_blocks(model)
    n_blocks = len(blocks)
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)
    total = windows.shape[0] * (windows.shape[1] - 1)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    G_out: dict[str, torch.Tensor] = {}
    F_out: dict[str, torch.Tensor] = {}
    loss_sum = 0.0
    stem_homes = _stem_homes(model, list(blocks))  # the stem helpers park it on CPU: put it back where it was
    try:
        # 1. stem: every block's call arguments and block 0's inputs, per batch
        inputs = capture_block_inputs(model, windows, batch_size, device)
        n_batches = len(inputs.hidden)
        as_tuple = _learn_convention(model, inputs, device)
        hidden = inputs.hidden[0].shape[-1]
        dtype = inputs.hidden[0].dtype
        home = _resolve_offload(offload, device, boundary_bytes(windows, hidden, n_blocks, dtype))
        store = BoundaryStore(home, device)
        log.info("streamed gradients: %d blocks, %d batches, boundaries on %s", n_blocks, n_batches, home)
        for b in range(n_batches):
            store.put(0, b, inputs.hidden[b])
        inputs.hidden = []
        # 2. forward without autograd, keeping every block's input
        with torch.no_grad():
            for i in progress(range(n_blocks), desc="grad forward", total=n_blocks):
                back = place_block(model, i, device)
                blk = blocks[i]
                for b in range(n_batches):
                    args, kwargs = inputs.calls[b][i]
                    store.put(i + 1, b, _block_output(blk(store.get(i, b), *args, **kwargs)))
                release_block(model, i, back)
        # 3. head: δ_L = ∂L_b/∂h_L through the model's own final norm and LM head
        deltas: list[torch.Tensor] = []
        inject: list[torch.Tensor | None] = [None]
        originals = list(blocks)
        moved = _move_stem(model, originals, device)
        try:
            for i in range(n_blocks):
                blocks[i] = _Emit(inject if i == n_blocks - 1 else [None], as_tuple)
            from .gradients import causal_lm_loss

            for b, s in enumerate(range(0, windows.shape[0], batch_size)):
                batch = windows[s : s + batch_size].to(device)
                hL = store.get(n_blocks, b).detach().requires_grad_(True)
                inject[0] = hL
                with torch.enable_grad():
                    loss, n_b = causal_lm_loss(model, batch)
                    (d,) = torch.autograd.grad(loss, [hL])
                loss_sum += float(loss.detach()) * n_b
                deltas.append(d.detach())
                inject[0] = None
        finally:
            for i, blk in enumerate(originals):
                blocks[i] = blk
            for mod in moved:
                mod.to("cpu")
        store.drop(n_blocks)
        weights_n = [(s, (windows[s : s + batch_size].shape[0]) * (windows.shape[1] - 1))
                     for s in range(0, windows.shape[0], batch_size)]
        # 4. backward, block by block from the last
        for i in progress(range(n_blocks - 1, -1, -1), desc="grad backward", total=n_blocks):
            back = place_block(model, i, device)
            blk = blocks[i]
            tlist = by_block.get(i, [])
            mods = [model.get_submodule(t.name) for t in tlist]
            params = [m.weight for m in mods]
            for p in params:
                p.requires_grad_(True)
            acc = {t.name: _Acc(
                G=torch.zeros(t.shape.m, t.shape.n, dtype=accumulate_dtype, device=device) if need_G else None,
                F=(torch.zeros(t.shape.m, t.shape.n, dtype=accumulate_dtype, device=device) if fisher_mode == "full"
                   else torch.zeros(t.shape.n, dtype=accumulate_dtype, device=device) if fisher_mode == "columns"
                   else None)) for t in tlist}
            need_input = i > 0
            captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            handles = []
            if probe is not None:
                probe.begin_block(i, tlist)
                handles = [m.register_forward_hook(_capture_hook(t.name, captured)) for t, m in zip(tlist, mods)]
            for b in range(n_batches):
                args, kwargs = inputs.calls[b][i]
                x = store.get(i, b).detach().requires_grad_(need_input)
                wrt = ([x] if need_input else []) + params
                if not wrt:
                    continue
                with torch.enable_grad():
                    out = _block_output(blk(x, *args, **kwargs))
                    grads = torch.autograd.grad(out, wrt, grad_outputs=deltas[b], allow_unused=True)
                if need_input:
                    deltas[b] = grads[0].detach()
                    grads = grads[1:]
                n_b = weights_n[b][1]
                if probe is not None:
                    for t in tlist:
                        if t.name not in captured:  # pragma: no cover - a target that does not reach the output
                            raise ValueError(f"no output gradient reached target {t.name!r}")
                        probe.add(t.name, *captured.pop(t.name), n_b)
                for t, mod, g in zip(tlist, mods, grads):
                    if g is None:  # pragma: no cover - a target that does not reach the output
                        continue
                    g = (g.T if weight_is_transposed(mod) else g).to(accumulate_dtype)
                    a = acc[t.name]
                    if a.G is not None:
                        a.G.add_(g, alpha=n_b / total)
                    if a.F is not None:
                        a.F.add_(g.square() if fisher_mode == "full" else g.square().sum(dim=0))
            for p in params:
                p.requires_grad_(False)
            for h in handles:
                h.remove()
            if probe is not None:
                probe.end_block(i)
            store.drop(i)
            G_i = {n: a.G.to("cpu", torch.float64) for n, a in acc.items() if a.G is not None}
            F_i = {n: a.F.to("cpu", torch.float64) for n, a in acc.items() if a.F is not None} \
                if fisher_mode != "none" else None
            del acc
            if on_block is not None:
                on_block(i, G_i, F_i)  # block i still resident on the device: score it now (fused)
            release_block(model, i, back)
            if keep:
                G_out.update(G_i)
                if F_i is not None:
                    F_out.update(F_i)
    finally:
        for mod, dev in stem_homes:
            mod.to(dev)
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    order = [t.name for t in targets]
    G_sorted = {n: G_out[n] for n in order if n in G_out}
    F_sorted = {n: F_out[n] for n in order if n in F_out} if fisher_mode != "none" else None
    comps = None if probe is None else {n: probe.result[n] for n in order if n in getattr(probe, "result", {})}
    return TargetGradients(G=G_sorted, fisher=F_sorted, tokens=total, loss=loss_sum / total, components=comps)


def _stem_homes(model: nn.Module, blocks: list[nn.Module]) -> list[tuple[nn.Module, torch.device]]:
    """Every parameter/buffer-holding module outside the blocks and the device it lives on now."""
    block_ids = {id(m) for b in blocks for m in b.modules()}
    homes = []
    for mod in model.modules():
        if id(mod) in block_ids:
            continue
        own = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        if own:
            homes.append((mod, own[0].device))
    return homes


@torch.no_grad()
def _learn_convention(model: nn.Module, inputs: Any, device: torch.device) -> bool:
    """Whether the blocks return tuples (transformers 4.x) or bare tensors: run block 0 once on the first batch."""
    back = place_block(model, 0, device)
    args, kwargs = inputs.calls[0][0]
    out = find_blocks(model)[1][0](inputs.hidden[0], *args, **kwargs)
    release_block(model, 0, back)
    return isinstance(out, (tuple, list))


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
    from .scoring import SCORERS, ComponentProbe, score_targets

    device = torch.device(device)
    out: dict[str, dict[str, torch.Tensor]] = {}
    sc = SCORERS.get(scorer)
    probe = (ComponentProbe(model, whitening, stats, damping, device, decomposition, per_window=sc.window_rows)
             if sc is not None and sc.from_components is not None else None)

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

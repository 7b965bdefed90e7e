"""Calibration-loss gradients of every target weight from ONE backward pass per batch.

The calibration loss is the token-mean next-token cross-entropy over all calibration windows,
``L = (1/N) Σ_t CE_t``. Each batch ``b`` contributes ``(N_b/N) ∂L_b/∂W`` with ``L_b`` its own token mean, so the
accumulated ``G = ∂L/∂W`` (float64) is exact for any batch size. Gradients of all targets come from one
``torch.autograd.grad`` call per batch (the ZS-SVD reference code runs one backward per module, 224× the work
on LLaMA-7B). Optionally the per-batch squared gradients ``Σ_b (∂L_b/∂W)²`` are accumulated as well (empirical
Fisher, FWSVD).

Streamed (:func:`streamed_gradients`, the default of :func:`calibration_gradients`): one decoder block resident at
a time, forward then backward block by block, through the layer-wise engine (:mod:`lowrank.blocks`).
The calibration loss ``L = (1/N) Σ_b n_b L_b`` (``L_b`` the token-mean next-token cross-entropy of batch ``b``,
``n_b`` its predictions) is differentiated without ever holding the whole model's activations:

1. **Forward, keeping boundaries only.** The stem (embeddings, rotary tables, masks) runs once per batch with
   the blocks replaced by catchers (:func:`lowrank.blocks.capture_block_inputs`); then block ``i`` alone runs over
   every batch without autograd, and its input ``h_i`` is stored (on the accelerator when every boundary fits,
   else in CPU memory: :class:`BoundaryStore`). Memory: one block + ``L+1`` boundary activations.
2. **Head.** With every block replaced by a stand-in that returns the stored last boundary ``h_L`` (a leaf that
   requires grad), the model's own forward applies its final norm and LM head; ``δ_L = ∂L_b/∂h_L`` per batch.
3. **Backward, block by block from the last.** Block ``i`` is recomputed from its saved input with autograd
   (activation checkpointing with offload): ``∂L_b/∂W = ∂(block(h_i))/∂W · δ_{i+1}`` for its target weights
   and ``δ_i = ∂(block(h_i))/∂h_i · δ_{i+1}``, one ``torch.autograd.grad`` per batch. Peak memory is one
   block's weights and activations for one batch plus the boundaries.

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
import torch.nn.functional as F
from torch import nn

from .blocks import (BoundaryStore, block_output, boundary_bytes, capture_block_inputs, frozen_walk, head_pass,
                     resident, resolve_offload, streamed_batches, targets_by_block)
from .model import Target, find_blocks, find_targets, weight_is_transposed
from .runtime import progress

__all__ = ["TargetGradients", "calibration_gradients", "causal_lm_loss", "calibration_loss", "streamed_gradients",
           "streamed_loss", "TokenProbe", "FisherMode"]

log = logging.getLogger(__name__)

FisherMode = Literal["none", "full", "columns"]


@dataclass
class TargetGradients:
    """``G[name] = ∂L/∂W`` (m×n, float64, ``y = W x`` orientation), optional ``fisher[name]``, and ``N``;
    ``components[name]``: per-component statistics (:class:`lowrank.scoring.ComponentStats`) when a probe ran."""

    G: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor] | None
    tokens: int
    loss: float
    components: dict[str, Any] | None = None


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Token-mean next-token cross-entropy of ``batch`` (LongTensor[b, T]) and the number of predictions."""
    logits = model(input_ids=batch, use_cache=False).logits  # [b, T, V]
    # at least float32 (half-precision logits are upcast), never below the model's dtype (float64 stays float64)
    pred = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.shape[-1])
    target = batch[:, 1:].reshape(-1)
    return F.cross_entropy(pred, target), target.numel()


def calibration_gradients(model: nn.Module, windows: torch.Tensor, batch_size: int,
                          device: torch.device | str = "cpu", targets: list[Target] | None = None,
                          fisher: bool | str = False, streamed: bool = True, offload: str = "auto",
                          need_G: bool = True, probe: "TokenProbe | None" = None) -> TargetGradients:
    """``∂L/∂W`` for every target over all ``windows``, one forward + one backward per batch.

    ``streamed`` (default): block by block, one block resident on ``device`` at a time
    (:func:`streamed_gradients`; ``offload`` says where the boundary activations live).
    Otherwise the whole model runs on ``device`` with one ``autograd.grad`` per batch. Both give the same
    gradients up to floating-point summation order. ``fisher``: ``False``/``"none"``, ``True``/``"full"``
    (m×n ``Σ_b g_b²``) or ``"columns"`` (n-vector ``Σ_b Σ_i g_b²``, all FWSVD needs); ``need_G=False`` skips
    ``G`` (Fisher only).

    ``probe`` (:class:`TokenProbe`): per-token statistics, as in :func:`streamed_gradients`. On the whole-model
    path every block's ``begin_block`` is called first, the probe gets each target's ``(x, d)`` as the backward
    reaches it, and ``end_block`` closes every block after the last batch. The backward starts from the input
    embeddings' output (a leaf that requires grad), so with frozen weights no weight gradient is formed: one
    forward and one backward per batch, where the streamed pass also recomputes every block's forward (about a
    fifth of its FLOPs with a probe on SmolLM2) in exchange for holding one block at a time.
    """
    if streamed:
        return streamed_gradients(model, windows, batch_size, device, targets=targets, fisher=fisher,
                                  need_G=need_G, offload=offload, probe=probe)
    mode = "full" if fisher is True else ("none" if fisher is False else str(fisher))
    if mode not in ("none", "full", "columns"):
        raise ValueError(f"fisher must be 'none', 'full' or 'columns', got {fisher!r}")
    targets = targets or find_targets(model)
    modules = [model.get_submodule(t.name) for t in targets]
    weights = [m.weight for m in modules]
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deterministic model
    total = (windows.shape[0]) * (windows.shape[1] - 1)
    G = {t.name: torch.zeros(t.shape.m, t.shape.n, dtype=torch.float64) for t in targets} if need_G else {}
    Fi = None if mode == "none" else {
        t.name: torch.zeros(*((t.shape.m, t.shape.n) if mode == "full" else (t.shape.n,)), dtype=torch.float64)
        for t in targets}
    if probe is not None and not need_G and mode == "none":
        for w in weights:  # the probe reads (x, δ) only: no weight gradients
            w.requires_grad_(False)
        weights = []
    leaf: list[torch.Tensor] = []
    handles = []
    if probe is not None:
        def grad_leaf(_mod: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
            leaf.append(out.detach().requires_grad_(True))
            return leaf[-1]

        handles.append(model.get_input_embeddings().register_forward_hook(grad_leaf))
        by_block = targets_by_block(targets)
        for i in sorted(by_block):
            probe.begin_block(i, by_block[i])
    n_now = [0]
    loss_sum = 0.0
    try:
        if probe is not None:
            handles += [m.register_forward_hook(_probe_hook(t.name, probe, n_now)) for t, m in zip(targets, modules)]
        starts = range(0, windows.shape[0], batch_size)
        for s in progress(starts, desc="gradients", total=len(starts)):
            batch = windows[s : s + batch_size].to(device)
            leaf.clear()
            with torch.enable_grad():
                loss, n_b = causal_lm_loss(model, batch)
                n_now[0] = n_b
                grads = torch.autograd.grad(loss, leaf + weights)[len(leaf):]
            loss_sum += float(loss.detach()) * n_b
            for t, mod, g in zip(targets, modules, grads):
                g = g.detach().T if weight_is_transposed(mod) else g.detach()
                g64 = g.to("cpu", torch.float64)
                if need_G:
                    G[t.name].add_(g64, alpha=n_b / total)
                if Fi is not None:
                    Fi[t.name].add_(g64.square() if mode == "full" else g64.square().sum(dim=0))
        if probe is not None:
            for i in sorted(by_block):
                probe.end_block(i)
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    comps = None if probe is None else {t.name: probe.result[t.name] for t in targets
                                        if t.name in getattr(probe, "result", {})}
    return TargetGradients(G=G, fisher=Fi, tokens=total, loss=loss_sum / total, components=comps)


@torch.no_grad()
def calibration_loss(model: nn.Module, windows: torch.Tensor, batch_size: int,
                     device: torch.device | str = "cpu") -> float:
    """Token-mean next-token cross-entropy over ``windows`` (no gradients)."""
    total, count = 0.0, 0
    for s in range(0, windows.shape[0], batch_size):
        loss, n = causal_lm_loss(model, windows[s : s + batch_size].to(device))
        total += float(loss) * n
        count += n
    return total / count


@torch.no_grad()
def streamed_loss(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device | str = "cpu",
                  on_block: Callable[[int, nn.Module], Callable[[], None] | None] | None = None) -> float:
    """:func:`calibration_loss` with one decoder block resident at a time (:func:`lowrank.blocks.streamed_batches`:
    the blocks over the captured block inputs, then the model's own head): the same number up to float order.
    ``on_block(i, block)`` runs when block ``i`` is resident, before it runs (e.g. to swap in new factors)."""
    total, count = 0.0, 0
    for batch in streamed_batches(model, windows, batch_size, device, on_block=on_block, desc="loss"):
        loss, n = causal_lm_loss(model, batch)
        total += float(loss) * n
        count += n
    return total / count


@dataclass
class _Acc:
    """Per-target accumulators of one block (on the compute device)."""

    G: torch.Tensor | None
    F: torch.Tensor | None

    @classmethod
    def zeros(cls, t: Target, need_G: bool, fisher_mode: str, dtype: torch.dtype, device: torch.device) -> "_Acc":
        """``G`` (m×n) when asked, Fisher as ``fisher_mode`` says: m×n (``full``), n (``columns``) or none."""
        m, n = t.shape.m, t.shape.n
        F = (torch.zeros(m, n, dtype=dtype, device=device) if fisher_mode == "full"
             else torch.zeros(n, dtype=dtype, device=device) if fisher_mode == "columns" else None)
        return cls(G=torch.zeros(m, n, dtype=dtype, device=device) if need_G else None, F=F)


class TokenProbe(Protocol):
    """Receives every target's per-token input and output gradient during the streamed backward."""

    def begin_block(self, i: int, targets: list[Target]) -> None: ...

    def add(self, name: str, x: torch.Tensor, d: torch.Tensor, n_b: int) -> None: ...

    def end_block(self, i: int) -> None: ...


def _probe_hook(name: str, probe: TokenProbe, n_now: list[int]) -> Callable[..., None]:
    """Forward hook of the whole-model path: hand the module's input and, once the backward reaches it, the
    gradient at its output to ``probe.add`` (``n_now[0]``: the batch's predictions)."""

    def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        x = args[0].detach()
        if out.requires_grad:
            out.register_hook(lambda d: probe.add(name, x, d.detach(), n_now[0]))

    return hook


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
    by_block = targets_by_block(targets)
    total = windows.shape[0] * (windows.shape[1] - 1)
    G_out: dict[str, torch.Tensor] = {}
    F_out: dict[str, torch.Tensor] = {}
    loss_sum = 0.0
    with frozen_walk(model):
        # 1. stem: every block's call arguments and block 0's inputs, per batch
        inputs = capture_block_inputs(model, windows, batch_size, device)
        n_batches = len(inputs.hidden)
        as_tuple = inputs.as_tuple
        hidden = inputs.hidden[0].shape[-1]
        dtype = inputs.hidden[0].dtype
        home = resolve_offload(offload, device, boundary_bytes(windows, hidden, n_blocks, dtype))
        store = BoundaryStore(home, device)
        log.info("streamed gradients: %d blocks, %d batches, boundaries on %s", n_blocks, n_batches, home)
        for b in range(n_batches):
            store.put(0, b, inputs.hidden[b])
        inputs.hidden = []
        # 2. forward without autograd, keeping every block's input
        with torch.no_grad():
            for i in progress(range(n_blocks), desc="grad forward", total=n_blocks):
                with resident(model, i, device) as blk:
                    for b in range(n_batches):
                        args, kwargs = inputs.calls[b][i]
                        store.put(i + 1, b, block_output(blk(store.get(i, b), *args, **kwargs)))
        # 3. head: δ_L = ∂L_b/∂h_L through the model's own final norm and LM head
        deltas: list[torch.Tensor] = []
        with head_pass(model, device, as_tuple) as inject:
            for b, s in enumerate(range(0, windows.shape[0], batch_size)):
                batch = windows[s : s + batch_size].to(device)
                hL = store.get(n_blocks, b).detach().requires_grad_(True)
                inject(hL)
                with torch.enable_grad():
                    loss, n_b = causal_lm_loss(model, batch)
                    (d,) = torch.autograd.grad(loss, [hL])
                loss_sum += float(loss.detach()) * n_b
                deltas.append(d.detach())
                inject(None)
        store.drop(n_blocks)
        weights_n = [(s, (windows[s : s + batch_size].shape[0]) * (windows.shape[1] - 1))
                     for s in range(0, windows.shape[0], batch_size)]
        # 4. backward, block by block from the last
        for i in progress(range(n_blocks - 1, -1, -1), desc="grad backward", total=n_blocks):
            with resident(model, i, device) as blk:
                tlist = by_block.get(i, [])
                mods = [model.get_submodule(t.name) for t in tlist]
                # weight gradients only when an accumulator reads them: a probe-only pass (need_G False, no
                # Fisher) needs the output gradients δ at each target, which the input's graph carries, so the
                # backward skips the m×n weight products (about a third of a block's backward FLOPs)
                params = [m.weight for m in mods] if (need_G or fisher_mode != "none") else []
                for p in params:
                    p.requires_grad_(True)
                acc = {t.name: _Acc.zeros(t, need_G, fisher_mode, accumulate_dtype, device) for t in tlist}
                need_input = i > 0
                need_x = need_input or not params  # block 0 of a probe-only pass: x carries the graph to the hooks
                captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
                handles = []
                if probe is not None:
                    probe.begin_block(i, tlist)
                    handles = [m.register_forward_hook(_capture_hook(t.name, captured)) for t, m in zip(tlist, mods)]
                for b in range(n_batches):
                    args, kwargs = inputs.calls[b][i]
                    x = store.get(i, b).detach().requires_grad_(need_x)
                    wrt = ([x] if need_x else []) + params
                    if not wrt or (probe is None and not params and not need_input):
                        continue
                    with torch.enable_grad():
                        out = block_output(blk(x, *args, **kwargs))
                        grads = torch.autograd.grad(out, wrt, grad_outputs=deltas[b], allow_unused=True)
                    if need_x:
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
            if keep:
                G_out.update(G_i)
                if F_i is not None:
                    F_out.update(F_i)
    order = [t.name for t in targets]
    G_sorted = {n: G_out[n] for n in order if n in G_out}
    F_sorted = {n: F_out[n] for n in order if n in F_out} if fisher_mode != "none" else None
    comps = None if probe is None else {n: probe.result[n] for n in order if n in getattr(probe, "result", {})}
    return TargetGradients(G=G_sorted, fisher=F_sorted, tokens=total, loss=loss_sum / total, components=comps)

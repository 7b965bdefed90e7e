"""IO-SVD's output-side metric: a top-K second-order expansion of the KL divergence, pulled back to each target.

For a position ``t`` with next-token distribution ``p_t = softmax(z_t)`` and a logit perturbation ``δz_t``,

    KL(p_t ‖ softmax(z_t + δz_t)) = ½ δz_tᵀ F_t δz_t + O(‖δz‖³),
    F_t = diag(p_t) − p_t p_tᵀ = Σ_k p_{t,k} (e_k − p_t)(e_k − p_t)ᵀ.

Keeping only the K most probable tokens ``T_t`` of each position in that sum (the IO-SVD top-K restriction) and
pulling ``e_k − p_t`` back to the output ``y_{e,t} = W_e x_{e,t}`` of target ``e`` gives the score vectors
``s_{t,k} = ∂ log p_{t,k} / ∂ y_{e,t}`` and the output metric (m×m)

    C_e = (1/N) Σ_t Σ_{k∈T_t} p_{t,k} s_{t,k} s_{t,k}ᵀ.

With the input second moment ``R_e = (1/N) Σ_t x_t x_tᵀ`` and the K-FAC independence assumption between inputs
and output gradients, a weight perturbation ``ΔW`` of target ``e`` changes the mean KL by

    E[ΔKL] ≈ ½ tr(ΔWᵀ C_e ΔW R_e) = ½ ‖L_oᵀ ΔW L_i‖²_F,   C_e = L_o L_oᵀ,  R_e = L_i L_iᵀ,

so the SVD of ``B = L_oᵀ W L_i`` is the rank-k minimiser of this proxy (:mod:`lowrank.spaces`, ``io_kl``).
With one position (``N = 1``) and ``K = |V|`` the formula is exact to second order; that is what the tests check.

Accumulation (a reconstruction: the IO-SVD code is not public): per batch, one forward, then K backward passes;
pass ``k`` differentiates the scalar ``Σ_t √p_{t,k} · log p_{t, k-th token of t}`` (the weights ``√p`` are
detached) with respect to every target's output at once (``torch.autograd.grad``), and ``Σ_t g_t g_tᵀ`` is added
to the target's accumulator. In a causal model the gradient read at position ``t`` also carries the terms of later
positions ``t' > t`` (their logits depend on ``y_t`` through attention); removing them would take one backward
per position. This is the usual K-FAC / OBD-LLM approximation and is exact for ``T = 1``. Each per-pass product
is computed in the model's dtype (at least float32) and summed into a float64 accumulator.

The first ``max_windows`` calibration windows are used, to keep the cost at ``K`` backward passes per window.

Streamed (a lazy model, :mod:`lowrank.sharded`; or ``streamed=True``): the same passes one decoder block at a
time, as :func:`lowrank.gradients.streamed_gradients` does. A forward without autograd keeps every block's input
``h_i`` (:class:`lowrank.blocks.BoundaryStore`); the head gives, per batch, the K output gradients
``δ_L^k = ∂(Σ_t √p_{t,k} log p_{t,k})/∂h_L``; then from the last block down, block ``i`` is recomputed from
``h_i`` with autograd, and for each ``k`` one ``autograd.grad`` with ``grad_outputs = δ_{i+1}^k`` gives every
target's output gradient (accumulated as above) and ``δ_i^k``. Memory: one block, the ``L + 1`` boundaries and
K boundary gradients per batch.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (BoundaryStore, block_output, boundary_bytes, capture_block_inputs, frozen_walk, head_pass,
                     resident, resolve_offload, targets_by_block)
from .model import Target, find_blocks, find_targets
from .runtime import progress
from .sharded import is_lazy
from .statistics import DEFAULT_OUTPUT_DAMPING, OutputMetrics, check_damping

__all__ = ["OutputMetrics", "collect_output_kl", "DEFAULT_TOP_K", "DEFAULT_OUTPUT_DAMPING"]

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5  # the sweet spot of the IO-SVD K ablation


def _vocab_size(model: nn.Module) -> int | None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(out, "weight", None)
    return int(w.shape[0]) if w is not None else None


def collect_output_kl(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                      targets: list[Target] | None = None, top_k: int = DEFAULT_TOP_K,
                      max_windows: int | None = 16, windows_per_backward: int = 1,
                      damping: float = DEFAULT_OUTPUT_DAMPING, seq_len: int | None = None,
                      streamed: bool | None = None, offload: str = "auto") -> OutputMetrics:
    """Top-K KL output metric ``C_e`` of every target over the first ``max_windows`` calibration windows.

    ``windows_per_backward`` windows go through each forward; every forward is followed by ``top_k`` backward
    passes; ``seq_len`` keeps only the first ``seq_len`` tokens of each window (the cost is linear in tokens, so
    more, shorter windows see more text for the same cost). The calibration ``batch_size`` is not used (a backward
    holds every activation). ``streamed`` (default: when the model is lazy): one block resident at a time
    (``offload``: where the boundaries live, :func:`lowrank.blocks.resolve_offload`), the same metric up to
    float order. Raises ``ValueError`` for ``top_k`` outside ``[1, vocabulary size]``.
    """
    top_k, damping = int(top_k), check_damping(damping)
    vocab = _vocab_size(model)
    if top_k < 1 or (vocab is not None and top_k > vocab):
        raise ValueError(f"statistics.output_kl.top_k must be in [1, {vocab}] (the vocabulary size), got {top_k}; "
                         f"the IO-SVD default is {DEFAULT_TOP_K}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"statistics.output_kl.max_windows must be >= 1 or null, got {max_windows}")
    if windows_per_backward < 1:
        raise ValueError(f"statistics.output_kl.windows_per_backward must be >= 1, got {windows_per_backward}")
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"statistics.output_kl.seq_len must be >= 1 or null, got {seq_len}")
    targets = targets or find_targets(model)
    used = windows if max_windows is None else windows[:max_windows]
    used = used if seq_len is None else used[:, :seq_len]
    if is_lazy(model) if streamed is None else streamed:
        C, tokens = _streamed_output_kl(model, used, windows_per_backward, torch.device(device), targets, top_k,
                                        offload)
        return OutputMetrics(C=C, tokens=tokens, top_k=top_k, damping=damping, windows=int(used.shape[0]))
    modules = [model.get_submodule(t.name) for t in targets]
    C = {t.name: torch.zeros(t.shape.m, t.shape.m, dtype=torch.float64, device=device) for t in targets}
    outputs: dict[str, torch.Tensor] = {}
    home = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    handles = [m.register_forward_hook(_keep_output(t.name, outputs)) for t, m in zip(targets, modules)]
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    tokens = 0
    try:
        starts = range(0, used.shape[0], windows_per_backward)
        for s in progress(starts, desc=f"output metric (top-{top_k})", total=len(starts)):
            batch = used[s : s + windows_per_backward].to(device)
            outputs.clear()
            embeds = emb(batch).detach().requires_grad_(True)  # the graph starts here; no weight gradients
            logits = model(inputs_embeds=embeds, use_cache=False).logits  # [b, T, V]
            top_logp, root_p = _top_k(logits, top_k)
            names = [t.name for t in targets]
            ys = [outputs[n] for n in names]
            for k in range(top_k):
                scalar = (root_p[..., k] * top_logp[..., k]).sum()
                grads = torch.autograd.grad(scalar, ys, retain_graph=k < top_k - 1)
                _accumulate(C, names, grads)
            tokens += batch.shape[0] * batch.shape[1]
            del logits, top_logp, ys, grads
            outputs.clear()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
        model.to(home)
    return OutputMetrics(C=_mean(C, tokens), tokens=tokens, top_k=top_k, damping=damping,
                         windows=int(used.shape[0]))


def _top_k(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p`` of the ``top_k`` most probable tokens of every position ([b, T, K], part of the graph) and
    their detached ``√p``."""
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top_logp, _ = logp.topk(top_k, dim=-1)
    return top_logp, top_logp.detach().mul(0.5).exp()


def _accumulate(C: dict[str, torch.Tensor], names: list[str], grads: tuple[torch.Tensor, ...]) -> None:
    """``C[n] += g2ᵀ g2`` (float64) with ``g2 = √p_{t,k} s_{t,k}`` ([b·T, m], at least float32)."""
    for n, g in zip(names, grads):
        g2 = g.reshape(-1, g.shape[-1])
        g2 = g2.to(torch.promote_types(g2.dtype, torch.float32))
        C[n].add_((g2.T @ g2).to(torch.float64))


def _streamed_output_kl(model: nn.Module, used: torch.Tensor, batch: int, device: torch.device,
                        targets: list[Target], top_k: int, offload: str) -> tuple[dict[str, torch.Tensor], int]:
    """``(C, tokens)`` of :func:`collect_output_kl`, one block resident at a time (module docstring)."""
    _, blocks = find_blocks(model)
    n_blocks = len(blocks)
    by_block = targets_by_block(targets)
    C = {t.name: torch.zeros(t.shape.m, t.shape.m, dtype=torch.float64, device=device) for t in targets}
    with frozen_walk(model):
        inputs = capture_block_inputs(model, used, batch, device)
        n_batches = len(inputs.hidden)
        h0 = inputs.hidden[0]
        store = BoundaryStore(resolve_offload(offload, device, boundary_bytes(used, h0.shape[-1], n_blocks,
                                                                               h0.dtype)), device)
        for b in range(n_batches):
            store.put(0, b, inputs.hidden[b])
        inputs.hidden = []
        with torch.no_grad():  # 1. forward, keeping every block's input
            for i in progress(range(n_blocks), desc="output metric forward", total=n_blocks):
                with resident(model, i, device) as blk:
                    for b in range(n_batches):
                        args, kwargs = inputs.calls[b][i]
                        store.put(i + 1, b, block_output(blk(store.get(i, b), *args, **kwargs)))
        deltas: list[list[torch.Tensor]] = []  # 2. head: δ_L^k per batch
        with head_pass(model, device, inputs.as_tuple) as inject:
            for b, s in enumerate(range(0, used.shape[0], batch)):
                hL = store.get(n_blocks, b).detach().requires_grad_(True)
                inject(hL)
                with torch.enable_grad():
                    logits = model(input_ids=used[s : s + batch].to(device), use_cache=False).logits
                    top_logp, root_p = _top_k(logits, top_k)
                    deltas.append([torch.autograd.grad((root_p[..., k] * top_logp[..., k]).sum(), [hL],
                                                       retain_graph=k < top_k - 1)[0].detach() for k in range(top_k)])
                inject(None)
        store.drop(n_blocks)
        for i in progress(range(n_blocks - 1, -1, -1), desc="output metric backward", total=n_blocks):
            with resident(model, i, device) as blk:  # 3. backward, block by block from the last
                tl = by_block.get(i, [])
                names = [t.name for t in tl]
                outputs: dict[str, torch.Tensor] = {}
                handles = [model.get_submodule(n).register_forward_hook(_keep_output(n, outputs)) for n in names]
                try:
                    for b in range(n_batches):
                        args, kwargs = inputs.calls[b][i]
                        x = store.get(i, b).detach().requires_grad_(True)
                        outputs.clear()
                        with torch.enable_grad():
                            out = block_output(blk(x, *args, **kwargs))
                            wrt = ([x] if i > 0 else []) + [outputs[n] for n in names]
                            for k in range(top_k):
                                grads = torch.autograd.grad(out, wrt, grad_outputs=deltas[b][k],
                                                            retain_graph=k < top_k - 1)
                                if i > 0:
                                    deltas[b][k], grads = grads[0].detach(), grads[1:]
                                _accumulate(C, names, grads)
                finally:
                    for h in handles:
                        h.remove()
                store.drop(i)
    tokens = used.shape[0] * used.shape[1]
    return _mean(C, tokens), tokens


def _mean(C: dict[str, torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
    """``C[n] / tokens`` on CPU, divided in place and taken out of ``C`` one at a time (never two copies of all)."""
    return {n: C.pop(n).div_(tokens).cpu() for n in list(C)}


def _keep_output(name: str, outputs: dict[str, torch.Tensor]):
    def hook(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        outputs[name] = out  # [b, T, m], part of the graph

    return hook

"""Hybrid low-rank + int8 storage: symmetric per-row int8 of stored matrices, byte accounting and the three modes.

Quantizer: for a row ``x`` (one output row of a dense ``W``, one row of the ``up`` factor ``A ∈ R^{m×k}``, or one
rank component of the ``down`` factor ``B ∈ R^{k×n}``), ``s = max|x| / 127`` (float32) and
``q = clamp(round(x / s), −127, 127)`` (int8); dequantised ``x̂ = s q`` with ``|x − x̂| ≤ s/2`` per element.

Storage (every target of the model, in one safetensors file): per stored matrix a row mask, the int8 rows with
their float32 scales and the other rows in float16; its bytes, the byte budget and each mode's position layout
are :mod:`lowrank.accounting`'s. These are the bytes of the tensors in the file: the file size is their sum plus
the safetensors header.

Modes (:data:`QUANTIZERS`), all under that one byte budget and all with a greedy allocator's component order
(``zero_sum`` or ``min_abs`` on the per-component ``ΔL``). The ranks are allocated once, by the allocate stage
(:func:`allocate_bytes`, written to the recipe's allocation.json), and the quantize stage stores exactly those
ranks (:func:`quantize_model`), so the summary's ranks describe the evaluated model:

* ``remap`` (ZS-SVD's, after Dobi-SVD): with ``m ≥ n``, the whole ``down`` factor and the first ``n`` rows of
  ``up`` are int8 (with ``m < n``: all of ``up`` and the first ``⌈k m / n⌉`` rows of ``down``), so rank ``k``
  costs about ``2 k max(m, n)`` bytes; the ranks are allocated with that real cost (no dead zone: full rank costs
  what the dense matrix does). Matrices that are never cut stay dense float16.
* ``hq``: every stored matrix is int8 (dense or factors), ranks allocated with the int8 cost.
* ``loss_aware`` (IO-SVD+): ranks as in ``remap``; then which rows are int8 is chosen by the first-order
  predicted loss change of quantising them, ``ΔL_row = ⟨∂L/∂row, Q(row) − row⟩`` with the calibration
  gradient at the truncated weights (``∂L/∂A = G Bᵀ``, ``∂L/∂B = Aᵀ G``, ``∂L/∂W = G``): rows are taken in
  ascending ``|ΔL_row|`` until the bytes fit the budget (a prefix of that order, so no unpicked row has a smaller
  ``|ΔL_row|`` than a picked one). Rows whose int8 form is not smaller (``c ≤ 4``) are never candidates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .accounting import (LAYOUTS, QUANTIZERS, Layout, TargetShape, bias_bytes, byte_budget, check_mode,
                         dense_fp16_bytes, dense_layout, hq_layout, layout_bytes, matrix_bytes, matrix_shapes,
                         remap_layout)
from .allocation import allocate_bytes, byte_accounting, check_allocation, greedy_byte_ranks
from .blocks import for_each_block, targets_by_block
from .io import save_tensors
from .model import linear_bias, linear_weight, replace_module, weight_is_transposed
from .quantized_linear import FLOAT_STORAGE, QMAX, QuantizedLinear, dequantize_rows, quantize_rows
from .sharded import attach_factors, is_lazy
from .spaces import BoundSpace
from .truncation import truncate

# the byte accounting (lowrank.accounting) and the byte allocation (lowrank.allocation) are re-exported here
__all__ = ["QMAX", "FLOAT_STORAGE", "quantize_rows", "dequantize_rows", "matrix_bytes", "dense_fp16_bytes",
           "byte_budget", "Layout", "remap_layout", "hq_layout", "dense_layout", "layout_bytes", "QUANTIZERS",
           "LAYOUTS", "check_mode", "greedy_byte_ranks", "allocate_bytes", "byte_accounting", "check_allocation",
           "row_scores", "select_rows_loss_aware", "layout_masks", "layout_of_masks", "QuantizeConfig",
           "quantize_model"]

def _quant_error(X: torch.Tensor) -> torch.Tensor:
    q, s = quantize_rows(X)
    return dequantize_rows(q, s, torch.float64) - X.to(torch.float64)


def row_scores(W_or_A: torch.Tensor, B: torch.Tensor | None, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """First-order loss change of quantising each stored row, ``⟨∂L/∂row, Q(row) − row⟩`` (float64).

    Dense (``B is None``): ``{"weight": ⟨G_j, δW_j⟩}``. Factored ``W' = A B``: ``{"down": ⟨(AᵀG)_i, δB_i⟩,
    "up": ⟨(G Bᵀ)_j, δA_j⟩}``. ``G = ∂L/∂W`` at the stored (float) weights.
    """
    G = G.to(torch.float64)
    if B is None:
        return {"weight": (G * _quant_error(W_or_A)).sum(dim=1)}
    A, B = W_or_A.to(torch.float64), B.to(torch.float64)
    return {"down": ((A.T @ G) * _quant_error(B)).sum(dim=1), "up": ((G @ B.T) * _quant_error(A)).sum(dim=1)}


def select_rows_loss_aware(row_delta: dict[str, dict[str, torch.Tensor]], shapes: dict[str, TargetShape],
                           ranks: dict[str, int | None], budget_bytes: int
                           ) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """Pick int8 rows in ascending ``|ΔL_row|`` until the stored bytes fit ``budget_bytes``.

    Starts from every row in float16; each pick saves ``c − 4`` bytes (rows with ``c ≤ 4`` are not candidates).
    Ties break by (target order, matrix, row index). Returns ``{target: {matrix: bool mask}}`` and the bytes.
    Raises ``ValueError`` (naming the numbers) when all candidates together do not fit.
    """
    masks: dict[str, dict[str, torch.Tensor]] = {}
    total = 0
    cands: list[tuple[float, int, str, str, int, int]] = []
    order = 0
    for name, s in shapes.items():
        k = ranks.get(name)
        masks[name] = {}
        total += bias_bytes(s)
        for key, (r, c) in matrix_shapes(s, k).items():
            masks[name][key] = torch.zeros(r, dtype=torch.bool)
            total += matrix_bytes(r, c, 0)
            saving = matrix_bytes(r, c, 0) - matrix_bytes(r, c, 1)
            if saving <= 0:
                continue
            d = row_delta[name][key].abs().tolist()
            for i in range(r):
                cands.append((d[i], order, name, key, i, saving))
                order += 1
    cands.sort(key=lambda t: (t[0], t[1]))
    for delta, _, name, key, i, saving in cands:
        if total <= budget_bytes:
            break
        masks[name][key][i] = True
        total -= saving
    if total > budget_bytes:
        raise ValueError(f"byte budget {budget_bytes} cannot be met even with every row int8 ({total} bytes); "
                         "raise the kept fraction")
    return masks, total


def layout_masks(shape: TargetShape, layout: Layout) -> dict[str, torch.Tensor]:
    """Position-based int8 masks of a layout: the first ``q`` rows of each stored matrix."""
    out = {}
    for key, (r, _c) in matrix_shapes(shape, layout.rank).items():
        m = torch.zeros(r, dtype=torch.bool)
        m[: layout.int8_rows[key]] = True
        out[key] = m
    return out


def layout_of_masks(rank: int | None, masks: dict[str, torch.Tensor]) -> Layout:
    return Layout(rank, {k: int(v.sum()) for k, v in masks.items()})


@dataclass(frozen=True)
class QuantizeConfig:
    """A recipe's ``quantize`` section: ``mode`` (``none`` or one of :data:`QUANTIZERS`); ``loss_aware`` takes its
    calibration gradient from the first ``gradient_windows`` windows in batches of ``gradient_batch_size``."""

    mode: str = "none"
    gradient_windows: int = 8
    gradient_batch_size: int = 2

    def __post_init__(self) -> None:
        if self.mode != "none":
            check_mode(self.mode)


# ---- the whole model ------------------------------------------------------------------------------------------


@dataclass
class QuantizeResult:
    """Per-target layouts, the accounted bytes and budget, and diagnostics of the row selection."""

    layouts: dict[str, Layout]
    accounted_bytes: int
    budget_bytes: int
    dense_bytes: int
    diagnostics: dict[str, Any]


@torch.no_grad()
def quantize_model(model: Any, targets: list[Any], mode: str, kept_fraction: float,
                   ranks: Mapping[str, int | None], space: BoundSpace,
                   gradients_of: Callable[[Any], Any] | None = None,
                   device: torch.device | str = "cpu", directions: Mapping[str, Any] | None = None,
                   workdir: str | os.PathLike | None = None) -> QuantizeResult:
    """Truncate to the byte-budget ``ranks``, choose int8 rows, swap in ``QuantizedLinear`` (in place).

    ``ranks``: the int8 recipe's allocation (:func:`allocate_bytes`, made by the allocate stage: the ranks the
    summary reports are the ones stored here); their position layout must fit ``⌊ρ · Σ 2 m n⌋`` bytes.
    ``space`` (:func:`lowrank.spaces.bind`): the method's space, its factors ``(S, T)`` and decomposition method
    for a target missing from ``directions``; ``gradients_of(model)``
    returns calibration gradients (:class:`lowrank.gradients.TargetGradients`) of the model as it is when
    called (``loss_aware`` calls it with the truncated products in the dense weights). Nothing is swapped when
    the ranks do not fit the budget (the ``ValueError`` comes before any change). ``directions``: the targets'
    unwhitened component directions in that space computed before (:func:`lowrank.truncation.decompose_targets`,
    stored: :class:`lowrank.decompose.StoredDecompositions`); the ranks are cut from them.

    A lazy ``model`` (:mod:`lowrank.sharded`) is cut one block at a time, its quantized targets kept in CPU
    memory; ``loss_aware`` then writes the truncated products to ``workdir`` per block (read back with the
    block) and calls ``gradients_of(model, on_block=...)`` (:func:`lowrank.gradients.streamed_gradients`'s
    callback), scoring each block's rows as its gradients complete. Same numbers as the model in memory."""
    mode = check_mode(mode)
    if mode == "loss_aware" and gradients_of is None:
        raise ValueError("quantization mode loss_aware needs calibration gradients")
    shapes = {t.name: t.shape for t in targets}
    budget, dense_total = byte_budget(shapes, kept_fraction)
    missing = sorted(set(shapes) - set(ranks))
    if missing:
        raise ValueError(f"the allocation has no rank for {len(missing)} targets, e.g. {missing[:2]}; rerun allocate")
    ranks = {n: ranks[n] for n in shapes}
    layout_total = sum(layout_bytes(s, LAYOUTS[mode](s, ranks[n])) for n, s in shapes.items())
    if layout_total > budget:
        raise ValueError(f"the ranks store {layout_total} bytes in the {mode} layout, over the byte budget {budget} "
                         f"of kept fraction {kept_fraction}; they are not this recipe's byte allocation "
                         "(lowrank.quantization.allocate_bytes): rerun allocate")
    lazy = is_lazy(model)
    if lazy and mode == "loss_aware" and workdir is None:
        raise ValueError("loss_aware quantization of a lazy model needs a workdir for the truncated weights")
    mats: dict[str, dict[str, torch.Tensor]] = {}
    biases: dict[str, torch.Tensor | None] = {}

    def cut(i: int, tl: list[Any]) -> None:
        for t in tl:
            mod = model.get_submodule(t.name)
            W = linear_weight(mod).detach()
            bias = linear_bias(mod)
            biases[t.name] = None if bias is None else bias.detach().clone().to("cpu" if lazy else bias.device)
            k = ranks[t.name]
            if k is None:
                mats[t.name] = {"weight": W.to(torch.float32).cpu()}
                continue
            if directions is not None and t.name in directions:  # stored directions: no whitening factor needed
                f = truncate(W.to(device), k, directions=directions[t.name])
            else:
                S, T = space.factors(t.name)
                f = truncate(W.to(device), k, S, T, method=space.decomposition)
            mats[t.name] = {"down": f.B.to(torch.float32).cpu(), "up": f.A.to(torch.float32).cpu()}

    if lazy:  # one block resident at a time (read from the checkpoint's shards); the factors kept in CPU memory
        for_each_block(model, targets, device, cut)
    else:
        cut(-1, targets)
    diagnostics: dict[str, Any] = {"ranks": ranks}
    if mode == "loss_aware":
        deltas: dict[str, dict[str, torch.Tensor]] = {}

        def score(tl: list[Any], G: dict[str, torch.Tensor]) -> None:
            deltas.update({t.name: row_scores(mats[t.name].get("weight", mats[t.name].get("up")),
                                              mats[t.name].get("down"), G[t.name]) for t in tl})

        if lazy:  # the truncated products written per block and read back with it; each block scored as it ends
            by_block = targets_by_block(targets)
            Path(workdir).mkdir(parents=True, exist_ok=True)
            for i, tl in by_block.items():
                path = Path(workdir) / f"truncated_{i}.safetensors"
                save_tensors(path, {f"{t.name}.weight": _stored_orientation(model.get_submodule(t.name),
                                                                            mats[t.name]["up"] @ mats[t.name]["down"])
                                    for t in tl if ranks[t.name] is not None})
                attach_factors(model, path, [])
            with torch.enable_grad():
                grads = gradients_of(model, on_block=lambda i, G_i, _F: score(by_block.get(i, []), G_i))
        else:
            for t in targets:  # the gradient at the truncated (float) weights
                if ranks[t.name] is not None:
                    mod = model.get_submodule(t.name)
                    W = mats[t.name]["up"] @ mats[t.name]["down"]
                    linear_weight(mod).copy_(W)  # m×n view in either orientation (nn.Linear / Conv1D)
            with torch.enable_grad():
                grads = gradients_of(model)
            score(targets, grads.G)
        deltas = {t.name: deltas[t.name] for t in targets}
        masks, _ = select_rows_loss_aware(deltas, shapes, ranks, budget)
        picked = torch.cat([d[key][masks[n][key]] for n, d in deltas.items() for key in d])
        diagnostics.update({"calibration_loss_truncated": grads.loss, "int8_rows": int(picked.numel()),
                            "rows": int(sum(v.numel() for m in masks.values() for v in m.values())),
                            "predicted_delta_loss_int8": float(picked.sum()),
                            "max_abs_delta_picked": float(picked.abs().max()) if picked.numel() else 0.0})
    else:
        masks = {t.name: layout_masks(t.shape, LAYOUTS[mode](t.shape, ranks[t.name])) for t in targets}
    layouts = {n: layout_of_masks(ranks[n], masks[n]) for n in shapes}
    accounted = sum(layout_bytes(shapes[n], layouts[n]) for n in shapes)
    if accounted > budget:  # pragma: no cover - both selections guarantee it
        raise RuntimeError(f"accounted {accounted} bytes exceed the budget {budget}")
    for t in targets:
        mod = model.get_submodule(t.name)
        new = QuantizedLinear.from_matrices(mats[t.name], masks[t.name], biases[t.name])
        replace_module(model, t.name, new.to("cpu" if lazy else linear_weight(mod).device))
    return QuantizeResult(layouts, accounted, budget, dense_total, diagnostics)


def _stored_orientation(mod: Any, W: torch.Tensor) -> torch.Tensor:
    """``W`` (m×n, ``y = W x``) as ``mod`` stores its weight (``Conv1D``: transposed)."""
    return W.T.contiguous() if weight_is_transposed(mod) else W

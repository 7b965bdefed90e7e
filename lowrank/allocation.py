"""Rank allocation under one parameter budget over all targets, or (int8 recipes) one byte budget.

The foundation's allocator is ``uniform`` (what SVD-LLM does): every matrix keeps the same fraction ``ρ`` of
its own parameters, rank ``k = ⌊(ρ · P_dense − b) / (m + n)⌋`` (``b`` the bias, kept dense), clipped to the
break-even rank ``r*`` so the factors are always smaller than the matrix, and ``ρ = 1`` keeps everything dense.
The total kept is then at most ``⌊ρ D⌋`` by construction. ``None`` as a rank means "stays dense".

An int8 recipe's ranks are allocated here too, under the byte budget ``⌊ρ · Σ 2 m n⌋`` with the byte cost of
its mode's layout (:func:`allocate_bytes`, :mod:`lowrank.accounting`); the quantize stage stores exactly those
ranks, so the ranks the summary reports are the evaluated model's.
"""

from __future__ import annotations

import math
import heapq
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable

import torch

from .accounting import (LAYOUTS, Budget, Layout, TargetShape, breakeven_rank, byte_budget, check_mode,
                         dense_params, factored_params, layout_bytes, stored_params, uniform_rank)
from .statistics import Sensitivity

__all__ = ["Allocation", "Allocator", "ALLOCATORS", "ALLOCATOR_STATS", "GREEDY_ALLOCATORS", "allocate",
           "check_scores", "min_kept_fraction", "check_reachable", "check_recipes_reachable", "GreedyTails",
           "allocate_uniform", "allocate_zero_sum", "allocate_min_abs", "allocate_sensitivity", "greedy_ranks",
           "sensitivity_ranks", "greedy_byte_ranks", "allocate_bytes", "byte_accounting", "check_allocation"]


@dataclass(frozen=True)
class Allocation:
    """Ranks per target (``None`` = dense) and the parameter accounting of that choice."""

    budget: Budget
    ranks: dict[str, int | None]
    shapes: dict[str, TargetShape]

    @property
    def kept_params(self) -> int:
        return sum(stored_params(self.shapes[n], r) for n, r in self.ranks.items())

    def predicted_delta_loss(self, scores: dict[str, torch.Tensor]) -> float:
        """``Σ_targets Σ_{i ≥ k} ΔL_i``: the summed scores of the components this allocation removes (``k`` the
        kept rank; a dense target removes none)."""
        return sum(float(scores[n][k:].sum()) for n, k in self.ranks.items() if k is not None)

    def to_json(self, scores: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """JSON body: totals (kept and removed fractions) and one row per target."""
        rows = {}
        for name, r in self.ranks.items():
            s = self.shapes[name]
            row: dict[str, Any] = {"m": s.m, "n": s.n, "bias": s.bias, "rank": r,
                                   "dense_params": dense_params(s), "stored_params": stored_params(s, r)}
            if scores is not None and name in scores:
                sig2 = scores[name].double() ** 2
                k = s.full_rank if r is None else r
                row["score_tail_fraction"] = float(sig2[k:].sum() / sig2.sum().clamp_min(1e-300))
            rows[name] = row
        kept = self.kept_params
        return {
            "kept_fraction_target": self.budget.kept_fraction,
            "removed_fraction_target": self.budget.removed_fraction,
            "target_params": self.budget.target_params,
            "budget_params": self.budget.max_kept_params,
            "kept_params": kept,
            "kept_fraction": kept / self.budget.target_params,
            "removed_fraction": 1 - kept / self.budget.target_params,
            "n_factored": sum(r is not None for r in self.ranks.values()),
            "n_dense": sum(r is None for r in self.ranks.values()),
            "targets": rows,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Allocation":
        shapes = {n: TargetShape(r["m"], r["n"], r["bias"]) for n, r in obj["targets"].items()}
        ranks = {n: r["rank"] for n, r in obj["targets"].items()}
        return cls(Budget(obj["kept_fraction_target"], obj["target_params"]), ranks, shapes)


def allocate_uniform(shapes: dict[str, TargetShape], kept_fraction: float,
                     scores: dict[str, torch.Tensor] | None = None) -> dict[str, int | None]:
    """Same kept fraction for every matrix (SVD-LLM, :func:`lowrank.accounting.uniform_rank`); ``scores`` are not
    read."""
    return {name: uniform_rank(s, kept_fraction) for name, s in shapes.items()}


def check_scores(shapes: dict[str, TargetShape], scores: dict[str, torch.Tensor]) -> None:
    """Every target has one score per component (``min(m, n)``), else a ``ValueError`` naming the fix."""
    missing = [n for n in shapes if n not in scores]
    if missing:
        raise ValueError(f"no scores for {len(missing)} targets, e.g. {missing[:2]}; rerun score_components")
    for n, s in shapes.items():
        if scores[n].numel() != s.full_rank:
            raise ValueError(f"scores of {n} have {scores[n].numel()} components, its shape {s.m}x{s.n} has "
                             f"{s.full_rank}; rerun score_components for this model")


class GreedyTails:
    """The candidates of a global greedy removal: the last kept component of every matrix's σ tail.

    ``planned[n]`` components ``[0, planned)`` of matrix ``n`` are kept; its candidate is component
    ``planned − 1`` with score ``ΔL``, held in one of two min-heaps by ``|ΔL|`` (``ΔL ≥ 0`` and ``ΔL < 0``), ties
    broken by push order (deterministic). A matrix at its floor has no candidate. :meth:`pop` picks by ``rule``:
    ``zero_sum`` takes the sign that moves the running sum of ``ΔL`` toward zero (positive when it is ``≤ 0``),
    ``min_abs`` the smallest ``|ΔL|`` of either sign. Shared by parameter (:func:`greedy_ranks`) and byte
    (:func:`greedy_byte_ranks`) budgets, which differ only in their accounting.
    """

    def __init__(self, shapes: dict[str, TargetShape], scores: dict[str, torch.Tensor],
                 floors: dict[str, int]) -> None:
        self.planned = {n: s.full_rank for n, s in shapes.items()}
        self.floors = floors
        self._deltas = {n: scores[n].double().tolist() for n in shapes}
        self._pos: list[tuple[float, int, str]] = []
        self._neg: list[tuple[float, int, str]] = []
        self._counter = 0
        for name in shapes:
            self._push(name)

    def _push(self, name: str) -> None:
        k = self.planned[name]
        if k <= self.floors[name]:
            return
        d = self._deltas[name][k - 1]
        heapq.heappush(self._pos if d >= 0 else self._neg, (abs(d), self._counter, name))
        self._counter += 1

    def empty(self) -> bool:
        return not self._pos and not self._neg

    def pop(self, rule: str, running: float) -> tuple[str, float]:
        """Remove the chosen candidate from its matrix; returns the matrix and the removed component's ``ΔL``."""
        pos, neg = self._pos, self._neg
        if rule == "zero_sum":
            heap = (pos if pos else neg) if running <= 0 else (neg if neg else pos)
        else:
            heap = pos if (pos and (not neg or pos[0][:2] < neg[0][:2])) else neg
        _, _, name = heapq.heappop(heap)
        self.planned[name] -= 1
        d = self._deltas[name][self.planned[name]]
        self._push(name)
        return name, d


def greedy_ranks(shapes: dict[str, TargetShape], kept_fraction: float, scores: dict[str, torch.Tensor],
                 rule: str = "zero_sum", min_rank_fraction: float = 0.0) -> tuple[dict[str, int | None], list[float]]:
    """Global greedy removal of whitened components under one parameter budget.

    ``scores[name]`` is the predicted loss change ``ΔL_i`` of removing component ``i`` (σ order, descending).
    Each matrix offers only its tail component (truncation is always a prefix of the σ-ordered spectrum), and
    every component is chosen on its own ``ΔL``. ``rule``:

    * ``zero_sum`` (ZS-SVD): keep the running sum ``s = Σ ΔL`` of accepted removals near zero: if ``s ≤ 0``
      take the candidate with the smallest positive ΔL, else the negative ΔL closest to zero (falling back to
      the other sign when one side is empty).
    * ``min_abs``: the candidate with the smallest ``|ΔL|``, whatever its sign.

    Parameter credit: a dense matrix saves nothing until its rank reaches the break-even ``r*``; crossing it
    credits ``P_dense − r*(m+n)`` (at most ``m + n``), every later component ``m + n``. Matrices left above ``r*``
    stay dense. The ZS-SVD reference adds the ΔL of such reverted selections to ``s`` (so the applied set is not
    zero-sum); here a matrix's ΔL enter ``s`` only when it crosses ``r*``, so ``s`` is exactly the predicted loss
    change of the returned ranks. Selection stops as soon as the credit reaches ``D − ⌊ρ D⌋``: the kept count is
    at most ``⌊ρ D⌋`` and at least ``⌊ρ D⌋ − max(m + n)``. Equal ``|ΔL|`` break by the order candidates were
    pushed (deterministic). Returns the ranks and the committed running sum after each committing step (a
    dead-zone selection commits nothing until its matrix reaches ``r*``).
    """
    if rule not in ("zero_sum", "min_abs"):
        raise ValueError(f"unknown greedy rule {rule!r}; choose zero_sum or min_abs")
    check_scores(shapes, scores)
    total = sum(dense_params(s) for s in shapes.values())
    to_remove = total - int(kept_fraction * total)
    r_star = {n: breakeven_rank(s) for n, s in shapes.items()}
    floors = {n: max(1, int(math.ceil(min_rank_fraction * r_star[n]))) for n in shapes}
    # a matrix whose floor lies above its break-even rank can never be factored: it is never a candidate
    tails = GreedyTails(shapes, scores, {n: (floors[n] if r_star[n] >= floors[n] else s.full_rank)
                                         for n, s in shapes.items()})
    planned = tails.planned  # tail pointer: components [0, planned) kept
    pending = {n: 0.0 for n in shapes}  # ΔL chosen in the dead zone, committed when r* is crossed
    removed, running, trace = 0, 0.0, []
    while removed < to_remove:
        if tails.empty():
            raise ValueError(f"kept fraction {kept_fraction} cannot be reached: every matrix is at its rank "
                             f"floor (min_rank_fraction {min_rank_fraction}); lower the floor or raise the ratio")
        name, d = tails.pop(rule, running)
        s = shapes[name]
        if planned[name] > r_star[name]:
            pending[name] += d  # still dense: no credit, not yet in the ledger
        else:
            if planned[name] == r_star[name]:
                removed += dense_params(s) - stored_params(s, r_star[name])
                d += pending[name]
            else:
                removed += s.m + s.n
            running += d
            trace.append(running)
    ranks = {n: (k if k <= r_star[n] else None) for n, k in planned.items()}
    return ranks, trace


def allocate_zero_sum(shapes: dict[str, TargetShape], kept_fraction: float,
                      scores: dict[str, torch.Tensor] | None = None, min_rank_fraction: float = 0.0
                      ) -> dict[str, int | None]:
    """ZS-SVD's zero-sum selection (see :func:`greedy_ranks`)."""
    if scores is None:
        raise ValueError("allocator zero_sum needs per-component scores")
    return greedy_ranks(shapes, kept_fraction, scores, "zero_sum", min_rank_fraction)[0]


def allocate_min_abs(shapes: dict[str, TargetShape], kept_fraction: float,
                     scores: dict[str, torch.Tensor] | None = None, min_rank_fraction: float = 0.0
                     ) -> dict[str, int | None]:
    """Smallest ``|ΔL|`` first (see :func:`greedy_ranks`)."""
    if scores is None:
        raise ValueError("allocator min_abs needs per-component scores")
    return greedy_ranks(shapes, kept_fraction, scores, "min_abs", min_rank_fraction)[0]


def sensitivity_ranks(shapes: dict[str, TargetShape], sensitivity: Sensitivity, kept_fraction: float
                      ) -> dict[str, int | None]:
    """Ranks from ASVD's binary search: the largest perplexity cut whose kept parameters fit ``⌊ρ D⌋``.

    Raises ``ValueError`` when even every target at its smallest candidate ratio exceeds the budget.
    """
    missing = [n for n in shapes if n not in sensitivity.ppl]
    if missing:
        raise ValueError(f"no sensitivity for {len(missing)} targets, e.g. {missing[:2]}; recompute the "
                         "asvd_sensitivity statistics of this model")
    order = list(shapes)
    triples = sorted(((float(sensitivity.ppl[n][j]), order.index(n), j) for n in shapes
                      for j in range(len(sensitivity.ratios))), key=lambda x: (-x[0], x[1], x[2]))
    total = sum(stored_params(s, None) for s in shapes.values())
    budget = int(kept_fraction * total)

    def choice(cut: int) -> dict[str, int | None]:
        smallest: dict[str, float] = {}
        for _, i, j in triples[cut:]:
            n = order[i]
            smallest[n] = min(smallest.get(n, 1.0), sensitivity.ratios[j])
        return {n: uniform_rank(shapes[n], smallest[n]) if n in smallest else None for n in shapes}

    def kept(cut: int) -> int:
        return sum(stored_params(shapes[n], r) for n, r in choice(cut).items())

    if kept_fraction >= 1.0:
        return {n: None for n in shapes}
    if kept(0) > budget:
        raise ValueError(f"kept fraction {kept_fraction} is below what the smallest candidate ratio "
                         f"{min(sensitivity.ratios)} everywhere keeps; add smaller candidate ratios or raise it")
    lo, hi = 0, len(triples)  # kept(lo) <= budget; find the largest such cut
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kept(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return choice(lo)


def allocate_sensitivity(shapes: dict[str, TargetShape], kept_fraction: float,
                         scores: dict[str, torch.Tensor] | None = None, sensitivity: Sensitivity | None = None,
                         **_: Any) -> dict[str, int | None]:
    """ASVD's rank choice: binary search over the per-target sensitivity table (:func:`sensitivity_ranks`)."""
    if sensitivity is None:
        raise ValueError("allocator sensitivity needs the asvd_sensitivity statistics")
    return sensitivity_ranks(shapes, sensitivity, kept_fraction)


@dataclass(frozen=True)
class Allocator:
    """One rank allocator. ``ranks(shapes, kept_fraction, scores[, extra])`` returns ``{target: rank or None}``;
    ``greedy``: it removes components one at a time in the order of their predicted loss change (so it needs
    first- or second-order scores, floors every matrix at ``min_rank_fraction``, and it allocates an int8
    recipe's ranks under the byte budget, :func:`allocate_bytes`: the extra argument is ``min_rank_fraction``);
    ``stat``: the calibration statistic it reads besides the scores (the extra argument), if any."""

    ranks: Callable[..., dict[str, int | None]]
    greedy: bool = False
    stat: str | None = None


# the registry: adding an allocator is one entry here (and its name in the schema's enum)
ALLOCATORS: dict[str, Allocator] = {
    "uniform": Allocator(allocate_uniform),
    "zero_sum": Allocator(allocate_zero_sum, greedy=True),
    "min_abs": Allocator(allocate_min_abs, greedy=True),
    "sensitivity": Allocator(allocate_sensitivity, stat="asvd_sensitivity"),
}
# allocator -> the calibration statistic it reads besides the scores
ALLOCATOR_STATS: dict[str, str] = {name: a.stat for name, a in ALLOCATORS.items() if a.stat is not None}
GREEDY_ALLOCATORS: tuple[str, ...] = tuple(name for name, a in ALLOCATORS.items() if a.greedy)


def min_kept_fraction(shapes: list[TargetShape], min_rank_fraction: float = 0.0) -> float:
    """The smallest kept fraction any allocator can meet: every matrix at its rank floor ``max(1, ⌈f r*⌉)`` (dense
    where that floor is above its break-even rank ``r*``), as a fraction of the dense target parameters."""
    floor_params = 0
    for s in shapes:
        r_star = breakeven_rank(s)
        k = max(1, math.ceil(min_rank_fraction * r_star))
        floor_params += factored_params(s, k) if 1 <= k <= r_star else dense_params(s)
    return floor_params / sum(dense_params(s) for s in shapes)


def check_reachable(shapes: list[TargetShape], kept_fraction: float, min_rank_fraction: float = 0.0,
                    what: str = "") -> None:
    """Refuse a kept fraction below :func:`min_kept_fraction` (the budget ``⌊ρ D⌋`` cannot hold the rank floors),
    naming the smallest ratio that works."""
    floor = min_kept_fraction(shapes, min_rank_fraction)
    total = sum(dense_params(s) for s in shapes)
    if kept_fraction < 1.0 and int(kept_fraction * total) < round(floor * total):
        smallest = math.ceil(floor * 100) / 100
        raise ValueError(f"{what}ratio {kept_fraction} is below {floor:.4f}, the smallest kept fraction this model "
                         f"can store (rank {'floor' if min_rank_fraction else '1'} in every matrix"
                         f"{f', min_rank_fraction {min_rank_fraction}' if min_rank_fraction else ''}); "
                         f"use ratios >= {smallest:.2f}")


def check_recipes_reachable(shapes: list[TargetShape], ratios: list[float], methods: dict[str, dict[str, Any]],
                            model: str) -> None:
    """:func:`check_reachable` for every recipe (``methods.<name>`` config entries) and ratio on one model; the
    greedy allocators' floor is the recipe's ``min_rank_fraction``, the others' is rank 1."""
    for name, m in methods.items():
        f = float(m.get("min_rank_fraction", 0.0)) if m.get("allocator") in GREEDY_ALLOCATORS else 0.0
        for r in ratios:
            check_reachable(shapes, float(r), f, f"model {model!r}, method {name!r}: ")


def allocate(allocator: str, shapes: dict[str, TargetShape], kept_fraction: float,
             scores: dict[str, torch.Tensor] | None = None, min_rank_fraction: float = 0.0,
             stats: dict[str, Any] | None = None) -> Allocation:
    """Run the named allocator and check the result against the budget.

    ``min_rank_fraction`` is the greedy allocators' per-matrix rank floor ``⌈f · r*⌉`` (ZS-SVD's
    keep_rank_ratio); the uniform allocator has no use for it.
    """
    if allocator not in ALLOCATORS:
        raise ValueError(f"unknown allocator {allocator!r}; choose one of {sorted(ALLOCATORS)}")
    if not 0.0 <= min_rank_fraction < 1.0:
        raise ValueError(f"min_rank_fraction must be in [0, 1), got {min_rank_fraction}")
    budget = Budget(kept_fraction, sum(dense_params(s) for s in shapes.values()))
    spec = ALLOCATORS[allocator]
    if spec.stat is not None:
        if not stats or spec.stat not in stats:
            raise ValueError(f"allocator {allocator!r} needs the {spec.stat!r} statistics")
        ranks = spec.ranks(shapes, kept_fraction, scores, stats[spec.stat])
    elif spec.greedy:
        ranks = spec.ranks(shapes, kept_fraction, scores, min_rank_fraction)
    else:
        ranks = spec.ranks(shapes, kept_fraction, scores)
    alloc = Allocation(budget=budget, ranks=ranks, shapes=dict(shapes))
    # a rank-1 floor can exceed a tiny budget; say so instead of silently overspending
    if alloc.kept_params > budget.max_kept_params and kept_fraction < 1.0:
        raise ValueError(f"kept fraction {kept_fraction} is below what rank 1 everywhere stores "
                         f"({alloc.kept_params} > {budget.max_kept_params} parameters); use a larger ratio")
    return alloc


# ---- the byte budget of int8 recipes -----------------------------------------------------------------------------


def greedy_byte_ranks(shapes: dict[str, TargetShape], budget_bytes: int, scores: dict[str, torch.Tensor],
                      layout: Callable[[TargetShape, int | None], Layout], rule: str = "zero_sum",
                      min_rank_fraction: float = 0.0) -> dict[str, int | None]:
    """Global greedy removal of (whitened) components until the stored bytes fit ``budget_bytes``.

    The same state machine as :func:`lowrank.allocation.greedy_ranks` (per-matrix tails, ``zero_sum`` or
    ``min_abs`` on ``ΔL``, dead-zone ΔL committed when a removal first saves bytes), with the byte cost of
    ``layout``: a matrix at rank ``k`` stores ``min(bytes(dense), bytes(k))``. Floors: ``⌈f · min(m, n)⌉``
    (remap's keep-rank rule), at least 1. Raises ``ValueError`` when even every matrix at its floor does not fit.
    """
    if rule not in GREEDY_ALLOCATORS:
        raise ValueError(f"quantize needs a greedy allocator ({' or '.join(GREEDY_ALLOCATORS)}) to order components, "
                         f"got {rule!r}")
    check_scores(shapes, scores)
    floors = {n: max(1, math.ceil(min_rank_fraction * s.full_rank)) for n, s in shapes.items()}
    dense = {n: layout_bytes(s, layout(s, None)) for n, s in shapes.items()}

    def stored(name: str, k: int) -> int:
        s = shapes[name]
        return dense[name] if k >= s.full_rank else min(dense[name], layout_bytes(s, layout(s, k)))

    floor_total = sum(stored(n, floors[n]) for n in shapes)
    if floor_total > budget_bytes:
        raise ValueError(f"byte budget {budget_bytes} is below what must stay ({floor_total} bytes with every "
                         f"target at its rank floor in this layout); raise the kept fraction or lower "
                         f"min_rank_fraction")
    tails = GreedyTails(shapes, scores, floors)
    planned = tails.planned
    pending = {n: 0.0 for n in shapes}
    total = sum(dense.values())
    running = 0.0
    while total > budget_bytes:
        if tails.empty():  # pragma: no cover - excluded by the floor check above
            raise ValueError(f"byte budget {budget_bytes} cannot be reached")
        name, d = tails.pop(rule, running)
        saved = stored(name, planned[name] + 1) - stored(name, planned[name])
        if saved <= 0:
            pending[name] += d
        else:
            running += d + pending[name]
            pending[name] = 0.0
            total -= saved
    return {n: (k if k < shapes[n].full_rank and stored(n, k) < dense[n] else None) for n, k in planned.items()}


def allocate_bytes(mode: str, shapes: dict[str, TargetShape], kept_fraction: float,
                   scores: dict[str, torch.Tensor], rule: str = "zero_sum",
                   min_rank_fraction: float = 0.0) -> Allocation:
    """The rank allocation of an int8 recipe: :func:`greedy_byte_ranks` under ``⌊ρ · Σ 2 m n⌋`` bytes with the
    byte cost of ``mode``'s layout (:data:`LAYOUTS`), as an :class:`lowrank.allocation.Allocation`.

    Its parameter accounting (``kept_params = Σ stored_params(k)``) describes the ranks the quantize stage stores;
    its ``budget`` is the parameter budget of the same ``ρ``, which int8 storage may exceed (int8 rows cost half
    a float16 parameter), so it is not checked against it. Raises ``ValueError`` when the rank floors do not fit.
    """
    mode = check_mode(mode)
    budget_bytes, _ = byte_budget(shapes, kept_fraction)
    ranks = greedy_byte_ranks(shapes, budget_bytes, scores, LAYOUTS[mode], rule, min_rank_fraction)
    return Allocation(Budget(kept_fraction, sum(dense_params(s) for s in shapes.values())), ranks, dict(shapes))


def byte_accounting(mode: str, alloc: Allocation) -> dict[str, Any]:
    """The byte side of an int8 allocation (the ``quantize`` entry of its allocation.json): ``mode``, the budget
    ``⌊ρ · Σ 2 m n⌋``, the dense float16 bytes ``Σ 2 m n``, and the bytes of ``mode``'s position layout at the
    allocated ranks (``loss_aware`` then picks its int8 rows by predicted loss change within the same budget)."""
    mode = check_mode(mode)
    budget, dense = byte_budget(alloc.shapes, alloc.budget.kept_fraction)
    layout = sum(layout_bytes(s, LAYOUTS[mode](s, alloc.ranks[n])) for n, s in alloc.shapes.items())
    return {"mode": mode, "budget_bytes": budget, "dense_fp16_bytes": dense, "layout_bytes": layout}


def check_allocation(body: Mapping[str, Any], mode: str, kept_fraction: float) -> dict[str, int | None]:
    """The ranks of an allocation.json body when it is ``mode``'s byte allocation at ``kept_fraction``
    (:func:`byte_accounting` wrote its ``quantize`` entry), else a ``ValueError`` saying to rerun allocate."""
    made = (body.get("quantize") or {}).get("mode", "none")
    if made != mode or body["kept_fraction_target"] != kept_fraction:
        raise ValueError(f"the allocation is the {made!r} one at kept fraction {body['kept_fraction_target']}, not "
                         f"the {mode!r} byte allocation at {kept_fraction}; rerun allocate")
    return Allocation.from_json(dict(body)).ranks

"""lowrank.allocation: the uniform (SVD-LLM) allocator, the greedy ZS-SVD allocators (zero_sum, min_abs),
budget compliance, JSON round trip."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import pytest
import torch

from lowrank.accounting import TargetShape, breakeven_rank, dense_params, factored_params
from lowrank.allocation import ALLOCATORS, Allocation, allocate, allocate_uniform, greedy_ranks

# the 7 projections of a LLaMA block (hidden 64, intermediate 128, 2 KV heads of 16), bias-free
LLAMA_SHAPES = {
    "q": TargetShape(64, 64), "k": TargetShape(32, 64), "v": TargetShape(32, 64), "o": TargetShape(64, 64),
    "gate": TargetShape(128, 64), "up": TargetShape(128, 64), "down": TargetShape(64, 128),
}
# odd shapes with and without bias (GPT-2-like Conv1D targets, a thin matrix)
MIXED_SHAPES = {
    **LLAMA_SHAPES,
    "c_attn": TargetShape(96, 32, True), "c_fc": TargetShape(128, 32, True), "thin": TargetShape(7, 300),
    "odd": TargetShape(97, 13, True),
}
RHOS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def _svd_llm_rank(s: TargetShape, rho: float) -> int:
    """SVD-LLM: k = ⌊ρ m n / (m + n)⌋, exact rational arithmetic."""
    return math.floor(Fraction(rho) * s.m * s.n / (s.m + s.n))


@pytest.mark.parametrize("rho", RHOS)
def test_uniform_follows_svd_llm_formula(rho):
    ranks = allocate_uniform(LLAMA_SHAPES, rho)
    for name, s in LLAMA_SHAPES.items():
        expected = max(1, min(_svd_llm_rank(s, rho), breakeven_rank(s)))
        assert ranks[name] == expected, (name, rho)


def test_uniform_half_on_llama_shapes_unclipped():
    ranks = allocate_uniform(LLAMA_SHAPES, 0.5)
    # 64x64: 0.5·4096/128 = 16; 32x64: 0.5·2048/96 = 10.67 -> 10; 128x64: 0.5·8192/192 = 21.3 -> 21
    assert ranks == {"q": 16, "k": 10, "v": 10, "o": 16, "gate": 21, "up": 21, "down": 21}


def test_bias_is_kept_dense_and_counted():
    s = TargetShape(96, 32, True)
    rho = 0.5
    k = allocate_uniform({"x": s}, rho)["x"]
    assert k == math.floor((Fraction(rho) * dense_params(s) - s.m) / (s.m + s.n))
    assert factored_params(s, k) <= rho * dense_params(s) < factored_params(s, k + 1)


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("shapes", [LLAMA_SHAPES, MIXED_SHAPES], ids=["llama", "mixed"])
def test_kept_never_exceeds_budget(shapes, rho):
    alloc = allocate("uniform", shapes, rho)
    D = sum(dense_params(s) for s in shapes.values())
    assert alloc.budget.target_params == D
    assert alloc.kept_params <= alloc.budget.max_kept_params <= math.floor(Fraction(rho) * D)
    assert alloc.kept_params == sum(factored_params(shapes[n], r) if r is not None else dense_params(shapes[n])
                                    for n, r in alloc.ranks.items())
    for name, r in alloc.ranks.items():
        assert r is not None and 1 <= r <= breakeven_rank(shapes[name])
    # uniform is not wasteful: each matrix is within one rank step of its own share
    for name, r in alloc.ranks.items():
        s = shapes[name]
        if r < breakeven_rank(s):
            assert factored_params(s, r + 1) > rho * dense_params(s)


@pytest.mark.parametrize("shapes", [LLAMA_SHAPES, MIXED_SHAPES], ids=["llama", "mixed"])
def test_rho_one_keeps_everything_dense(shapes):
    alloc = allocate("uniform", shapes, 1.0)
    assert all(r is None for r in alloc.ranks.values())
    assert alloc.kept_params == alloc.budget.target_params
    body = alloc.to_json()
    assert body["kept_fraction"] == 1.0 and body["n_dense"] == len(shapes) and body["n_factored"] == 0


def test_ranks_monotone_in_rho():
    grid = [i / 40 for i in range(8, 41)]  # 0.2 .. 1.0
    prev = None
    for rho in grid:
        ranks = allocate("uniform", MIXED_SHAPES, rho).ranks
        if prev is not None:
            for name in ranks:
                a = math.inf if prev[name] is None else prev[name]
                b = math.inf if ranks[name] is None else ranks[name]
                assert b >= a, (name, rho)
        prev = ranks


def test_tiny_budget_rejected_instead_of_overspent():
    with pytest.raises(ValueError, match="rank 1"):
        allocate("uniform", LLAMA_SHAPES, 0.01)


def test_unknown_allocator_rejected():
    assert "uniform" in ALLOCATORS
    with pytest.raises(ValueError, match="unknown allocator"):
        allocate("fisher_magic", LLAMA_SHAPES, 0.5)


def test_allocation_json_round_trip():
    alloc = allocate("uniform", MIXED_SHAPES, 0.6)
    # one dense target, to exercise the None rank through JSON
    ranks = dict(alloc.ranks)
    ranks["thin"] = None
    alloc = Allocation(alloc.budget, ranks, alloc.shapes)
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.sort(torch.rand(s.full_rank, generator=g, dtype=torch.float64), descending=True).values
              for n, s in MIXED_SHAPES.items()}
    body = json.loads(json.dumps(alloc.to_json(scores)))
    back = Allocation.from_json(body)
    assert back == alloc
    assert back.kept_params == alloc.kept_params
    assert body["kept_params"] == alloc.kept_params
    assert body["budget_params"] == alloc.budget.max_kept_params
    assert body["kept_fraction"] == pytest.approx(alloc.kept_params / alloc.budget.target_params, rel=1e-15)
    assert body["removed_fraction"] == pytest.approx(1 - body["kept_fraction"], abs=1e-15)
    assert body["n_dense"] == 1 and body["n_factored"] == len(MIXED_SHAPES) - 1
    for name, row in body["targets"].items():
        s, r = MIXED_SHAPES[name], ranks[name]
        sig2 = scores[name] ** 2
        k = s.full_rank if r is None else r
        assert row["score_tail_fraction"] == pytest.approx(float(sig2[k:].sum() / sig2.sum()), rel=1e-12)
        assert row["stored_params"] == (dense_params(s) if r is None else factored_params(s, r))
    assert body["targets"]["thin"]["score_tail_fraction"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# greedy allocators (ZS-SVD): zero_sum and min_abs

GREEDY = ["zero_sum", "min_abs"]


def _mixed_scores(shapes: dict[str, TargetShape], seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-component ΔL of both signs (σ order), magnitudes spread over two decades, no ties."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in shapes.items():
        mag = 10 ** (-4 + 2 * torch.rand(s.full_rank, generator=g, dtype=torch.float64))
        out[name] = mag * torch.randn(s.full_rank, generator=g, dtype=torch.float64).sign()
    return out


def _floor(s: TargetShape, f: float) -> int:
    return math.ceil(f * breakeven_rank(s))


def _ledger(scores, ranks) -> float:
    """Σ ΔL of everything the returned ranks remove."""
    return sum(float(scores[n][r:].sum()) for n, r in ranks.items() if r is not None)


def test_hand_example_zero_sum_vs_min_abs():
    """Three 8×8 matrices (r* = 3; the dense→r* macro-move removes components 4..8 and credits 64 − 48 = 16,
    each later one 16). ρ = 0.67: keep ⌊128.64⌋ = 128 of 192, i.e. exactly four moves.

    P: macro ΔL +0.3, then +0.35;  N: macro −0.1, then −0.12, −0.14;  N2: macro −0.11, then −0.13, −0.15.
    min_abs takes N −0.1, N2 −0.11, N −0.12, N2 −0.13 (running sum −0.46); zero_sum takes P +0.3 (s ≤ 0 → Q+),
    then N −0.1, N2 −0.11, N −0.12 (s > 0 → Q−, closest to zero), ending at −0.03."""
    sq = TargetShape(8, 8)
    shapes = {"P": sq, "N": sq, "N2": sq}
    scores = {
        "P": torch.tensor([0.5, 0.4, 0.35] + [0.06] * 5, dtype=torch.float64),
        "N": torch.tensor([-0.3, -0.14, -0.12] + [-0.02] * 5, dtype=torch.float64),
        "N2": torch.tensor([-0.3, -0.15, -0.13] + [-0.022] * 5, dtype=torch.float64),
    }
    ranks, trace = greedy_ranks(shapes, 0.67, scores, "min_abs")
    assert ranks == {"P": None, "N": 2, "N2": 2}
    assert trace == pytest.approx([-0.1, -0.21, -0.33, -0.46], abs=1e-12)
    ranks, trace = greedy_ranks(shapes, 0.67, scores, "zero_sum")
    assert ranks == {"P": 3, "N": 2, "N2": 3}
    assert trace == pytest.approx([0.3, 0.2, 0.09, -0.03], abs=1e-12)
    alloc = allocate("zero_sum", shapes, 0.67, scores)
    assert alloc.ranks == ranks and alloc.kept_params == 128 == alloc.budget.max_kept_params
    # ρ = 0.584 keeps ⌊112.1⌋ = 112: five moves. min_abs's fifth is N −0.14 (to rank 1); with the floor
    # ⌈0.5 · 3⌉ = 2, N and N2 are stuck at rank 2 and the fifth move must be P's macro-move +0.3
    ranks, trace = greedy_ranks(shapes, 0.584, scores, "min_abs")
    assert ranks == {"P": None, "N": 1, "N2": 2}
    assert trace == pytest.approx([-0.1, -0.21, -0.33, -0.46, -0.6], abs=1e-12)
    ranks, trace = greedy_ranks(shapes, 0.584, scores, "min_abs", min_rank_fraction=0.5)
    assert ranks == {"P": 3, "N": 2, "N2": 2}
    assert trace == pytest.approx([-0.1, -0.21, -0.33, -0.46, -0.16], abs=1e-12)


def _reference_greedy(shapes, kept_fraction, scores, rule, f=0.0):
    """Naive restatement of ZS-SVD's selection (method notes §3.1-3.3): every step rescans each matrix's next
    tail removal (dense: one macro-move to r*; factored at k: component k), picks by ``rule``, and logs whether
    both signs were on offer and the smallest |ΔL| on offer. Continuous random scores have no ties."""
    total = sum(dense_params(s) for s in shapes.values())
    to_remove = total - int(kept_fraction * total)
    ranks = {n: None for n in shapes}
    removed, running, trace, log = 0, 0.0, [], []
    while removed < to_remove:
        cands = []
        for n, s in shapes.items():
            r_star, floor, r = breakeven_rank(s), max(1, _floor(s, f)), ranks[n]
            if r is None and r_star >= floor:
                cands.append((float(scores[n][r_star:].sum()), dense_params(s) - factored_params(s, r_star), r_star, n))
            elif r is not None and r > floor:
                cands.append((float(scores[n][r - 1]), s.m + s.n, r - 1, n))
        assert cands, "budget unreachable"
        pos = [c for c in cands if c[0] >= 0]
        neg = [c for c in cands if c[0] < 0]
        pool = ((pos or neg) if running <= 0 else (neg or pos)) if rule == "zero_sum" else cands
        delta, credit, new_rank, name = min(pool, key=lambda c: abs(c[0]))
        log.append({"both_signs": bool(pos and neg), "min_abs_offered": min(abs(c[0]) for c in cands),
                    "delta": delta})
        ranks[name] = new_rank
        removed += credit
        running += delta
        trace.append(running)
    return ranks, trace, log


@pytest.mark.parametrize("rule", GREEDY)
@pytest.mark.parametrize("f", [0.0, 0.25])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_matches_reference_and_rule(rule, f, seed):
    """The heap implementation makes the same choices as the naive rescan; min_abs always takes the smallest
    |ΔL| on offer (whatever its sign); zero_sum takes the smallest positive when s <= 0, else the negative
    closest to zero."""
    scores = _mixed_scores(MIXED_SHAPES, seed)
    ranks, trace = greedy_ranks(MIXED_SHAPES, 0.5, scores, rule, f)
    ref_ranks, ref_trace, log = _reference_greedy(MIXED_SHAPES, 0.5, scores, rule, f)
    assert ranks == ref_ranks
    assert trace == pytest.approx(ref_trace, rel=1e-12, abs=1e-15)
    assert len(trace) > 100  # a long run: many single-component moves after the macro-moves
    deltas = [e["delta"] for e in log]
    if rule == "min_abs":
        assert all(abs(e["delta"]) == e["min_abs_offered"] for e in log)
    else:
        for k, d in enumerate(deltas):
            s_before = trace[k - 1] if k else 0.0
            if log[k]["both_signs"]:
                assert (d >= 0) == (s_before <= 0), (k, s_before, d)
    # every accepted ΔL stays applied: the final running sum is the ledger of the returned ranks
    assert trace[-1] == pytest.approx(_ledger(scores, ranks), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("allocator", GREEDY)
@pytest.mark.parametrize("f", [0.0, 0.25])
@pytest.mark.parametrize("rho", RHOS[1:])
@pytest.mark.parametrize("shapes", [LLAMA_SHAPES, MIXED_SHAPES], ids=["llama", "mixed"])
def test_greedy_budget_met_within_one_rank_row(shapes, rho, f, allocator):
    """⌊ρD⌋ − max(m + n) <= kept <= ⌊ρD⌋; every factored rank in [max(1, ⌈f r*⌉), r*]."""
    scores = _mixed_scores(shapes, 3)
    alloc = allocate(allocator, shapes, rho, scores, min_rank_fraction=f)
    D = sum(dense_params(s) for s in shapes.values())
    budget = alloc.budget.max_kept_params
    assert budget == math.floor(Fraction(rho) * D)
    row = max(s.m + s.n for s in shapes.values())
    assert budget - row <= alloc.kept_params <= budget, (alloc.kept_params, budget, row)
    assert alloc.kept_params == sum(dense_params(shapes[n]) if r is None else factored_params(shapes[n], r)
                                    for n, r in alloc.ranks.items())
    assert set(alloc.ranks) == set(shapes)
    for name, r in alloc.ranks.items():
        s = shapes[name]
        if r is not None:
            assert max(1, _floor(s, f)) <= r <= breakeven_rank(s), (name, r)


@pytest.mark.parametrize("allocator", GREEDY)
def test_greedy_deterministic(allocator):
    scores = _mixed_scores(MIXED_SHAPES, 5)
    assert greedy_ranks(MIXED_SHAPES, 0.6, scores, allocator) == greedy_ranks(MIXED_SHAPES, 0.6, scores, allocator)
    # all-equal scores: every choice is a tie, broken by insertion order, identically on every call
    flat = {n: torch.full((s.full_rank,), 1e-3, dtype=torch.float64) for n, s in MIXED_SHAPES.items()}
    a = allocate(allocator, MIXED_SHAPES, 0.6, flat).ranks
    b = allocate(allocator, MIXED_SHAPES, 0.6, {n: v.clone() for n, v in flat.items()}).ranks
    assert a == b


@pytest.mark.parametrize("allocator", GREEDY)
def test_greedy_ranks_monotone_in_rho(allocator):
    """The greedy's sequence of moves does not depend on ρ (only where it stops), so a larger ρ never gives a
    smaller rank; dense (None) counts as full rank."""
    scores = _mixed_scores(MIXED_SHAPES, 7)
    grid = [i / 40 for i in range(8, 41)]  # 0.2 .. 1.0
    prev = None
    for rho in reversed(grid):  # decreasing ρ: ranks may only fall
        ranks = allocate(allocator, MIXED_SHAPES, rho, scores).ranks
        if rho == 1.0:
            assert all(r is None for r in ranks.values())
        if prev is not None:
            for name in ranks:
                hi = MIXED_SHAPES[name].full_rank if prev[name] is None else prev[name]
                lo = MIXED_SHAPES[name].full_rank if ranks[name] is None else ranks[name]
                assert lo <= hi, (name, rho)
        prev = ranks
    assert sum(r is not None for r in prev.values()) == len(MIXED_SHAPES)  # ρ = 0.2 factors everything


def _pure_sign_scores(shapes, seed=0):
    """Alternate targets get all-positive / all-negative ΔL, so both signs stay on offer for the whole run;
    the negatives are smaller in magnitude (min_abs then drains them and drifts)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, s) in enumerate(shapes.items()):
        mag = torch.rand(s.full_rank, generator=g, dtype=torch.float64) * 1e-3 + 1e-5
        out[name] = mag if i % 2 == 0 else -0.5 * mag
    return out


def _in_band(trace):
    """Whether each running sum lies within ± the largest |ΔL| accepted so far."""
    deltas = [trace[0]] + [b - a for a, b in itertools.pairwise(trace)]
    out, m = [], 0.0
    for s, d in zip(trace, deltas):
        m = max(m, abs(d))
        out.append(abs(s) <= m * (1 + 1e-9))
    return out


@pytest.mark.parametrize("shapes", [LLAMA_SHAPES, MIXED_SHAPES], ids=["llama", "mixed"])
def test_zero_sum_running_sum_stays_bounded(shapes):
    """Zero-sum invariant: while both signs are on offer, s_k ∈ [−max_{j<=k}|ΔL_j|, +max_{j<=k}|ΔL_j|]
    (induction: s <= 0 adds a ΔL in [0, M], s > 0 one in [−M, 0))."""
    scores = _pure_sign_scores(shapes)
    _, trace = greedy_ranks(shapes, 0.5, scores, "zero_sum")
    _, _, log = _reference_greedy(shapes, 0.5, scores, "zero_sum")
    assert all(e["both_signs"] for e in log)  # the construction keeps both heaps non-empty throughout
    assert len(trace) == len(log) > 100
    assert all(_in_band(trace))
    # min_abs on the same scores keeps taking the small negatives and leaves the band
    _, trace_abs = greedy_ranks(shapes, 0.5, scores, "min_abs")
    assert not all(_in_band(trace_abs))
    # random mixed signs, where a step sometimes offers one sign only: the induction step still holds at every
    # step that offers both signs and starts inside the band
    scores = _mixed_scores(shapes, 11)
    _, trace = greedy_ranks(shapes, 0.4, scores, "zero_sum")
    _, _, log = _reference_greedy(shapes, 0.4, scores, "zero_sum")
    band = _in_band(trace)
    checked = [k for k in range(1, len(trace)) if log[k]["both_signs"] and band[k - 1]]
    assert len(checked) >= len(trace) // 2
    assert all(band[k] for k in checked)


@pytest.mark.parametrize("shapes", [LLAMA_SHAPES, MIXED_SHAPES], ids=["llama", "mixed"])
def test_zero_sum_equals_min_abs_with_positive_scores(shapes):
    """With every ΔL >= 0 both rules take the smallest ΔL on offer at every step."""
    scores = {n: v.abs() for n, v in _mixed_scores(shapes, 2).items()}
    for rho in (0.3, 0.6, 0.9):
        assert greedy_ranks(shapes, rho, scores, "zero_sum") == greedy_ranks(shapes, rho, scores, "min_abs")
    # (with mixed signs they differ: the comparison is not vacuous)
    mixed = _mixed_scores(shapes, 2)
    assert greedy_ranks(shapes, 0.6, mixed, "zero_sum")[1] != greedy_ranks(shapes, 0.6, mixed, "min_abs")[1]


@pytest.mark.parametrize("allocator", GREEDY)
def test_budget_below_floors_rejected(allocator):
    """Floors ⌈0.9 r*⌉ keep ~90 % of every matrix: a 20 % budget cannot be reached."""
    scores = _mixed_scores(LLAMA_SHAPES)
    with pytest.raises(ValueError, match="min_rank_fraction 0.9"):
        allocate(allocator, LLAMA_SHAPES, 0.2, scores, min_rank_fraction=0.9)
    # the same floor is fine for a budget above it
    alloc = allocate(allocator, LLAMA_SHAPES, 0.95, scores, min_rank_fraction=0.9)
    assert alloc.kept_params <= alloc.budget.max_kept_params


def test_greedy_input_errors():
    scores = _mixed_scores(LLAMA_SHAPES)
    partial = {n: v for n, v in scores.items() if n != "down"}
    for allocator in GREEDY:
        with pytest.raises(ValueError, match="no scores for 1 targets.*down"):
            allocate(allocator, LLAMA_SHAPES, 0.5, partial)
        with pytest.raises(ValueError, match="needs per-component scores"):
            allocate(allocator, LLAMA_SHAPES, 0.5, None)
        for f in (-0.1, 1.0):
            with pytest.raises(ValueError, match="min_rank_fraction"):
                allocate(allocator, LLAMA_SHAPES, 0.5, scores, min_rank_fraction=f)
    with pytest.raises(ValueError, match="unknown greedy rule"):
        greedy_ranks(LLAMA_SHAPES, 0.5, scores, "largest")
    assert set(ALLOCATORS) >= {"uniform", "zero_sum", "min_abs"}
    # uniform ignores scores and the floor
    assert allocate("uniform", LLAMA_SHAPES, 0.5, None, 0.5).ranks == allocate_uniform(LLAMA_SHAPES, 0.5)

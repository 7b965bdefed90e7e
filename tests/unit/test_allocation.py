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
    """P, N, M are 6×6: r* = ⌊35/12⌋ = 2, so components 5, 4, 3, 2 (0-based, removed in that order) are the
    dead zone; removing component 2 reaches r* and credits 36 − 2·12 = 12, component 1 (to rank 1) another
    12; the floor 1 keeps component 0. ``tiny`` is 1×8: r* = ⌊7/9⌋ = 0 < floor 1, so it never offers (its
    ΔL −1 would otherwise be the smallest on offer) and stays dense. D = 3·36 + 8 = 116.

        P: [100,   90,  32,  24, 16,  8]   dead-zone sum +80
        N: [−100, −50, −12, −10, −6, −4]   dead-zone sum −32
        M: [−100, −60, −14,  −9, −5, −3]   dead-zone sum −31

    ρ = 0.795 keeps ⌊92.22⌋ = 92: remove 24, i.e. two crossings. Offers are the three tails (k: new rank).

    min_abs (smallest |ΔL| on offer):
      1 M −3 (k 5)   2 N −4 (k 5)   3 M −5 (k 4)   4 N −6 (k 4)   5 P +8 (k 5; offers P 8, N −10, M −9)
      6 M −9 (k 3)   7 N −10 (k 3): all dead zone, no credit, s = 0, nothing on the trace.
      8: offers P 16, N −12, M −14 → N −12, N reaches r* = 2: credit 12, commits its pending
      −4 −6 −10 plus −12 = −32 → s = −32. 9: offers P 16, N −50, M −14 → M −14, M reaches r*: credit 24 in
      all, commits −3 −5 −9 −14 = −31 → s = −63. Stop. P sits at rank 5 > r*: dense, its pending +8 dropped.
      Ranks {P: None, N: 2, M: 2, tiny: None}, trace [−32, −63] (9 selections, 2 commits).

    zero_sum (s ≤ 0 → smallest positive; s > 0 → negative closest to 0), s = 0 at the start:
      1–3 P +8, +16, +24 (only P offers positives; dead zone, s stays 0). 4 P +32: P reaches r*, credit 12,
      commits 8 + 16 + 24 + 32 = 80 → s = 80. s > 0: 5 M −3, 6 N −4, 7 M −5, 8 N −6, 9 M −9, 10 N −10 (dead),
      11: N −12 vs M −14 → N −12, N reaches r*: credit 24 in all, commits −32 → s = 48. Stop. M at rank 3 is
      dense, its pending −17 dropped. Ranks {P: 2, N: 2, M: None, tiny: None}, trace [80, 48].
    min_abs drains the small negatives and drifts to −63; zero_sum balances and ends at +48.

    ρ = 0.69 keeps ⌊80.04⌋ = 80: one more crossing (remove 36). min_abs: 10 P +16, 11 P +24 (dead; offers
    N −50, M −60 are larger), 12 P +32: P crosses, commits 8 + 16 + 24 + 32 = 80 → s = 17. zero_sum from
    s = 48 > 0: 12 M −14 (vs N −50): M crosses, commits −17 − 14 = −31 → s = 17. Both end at {P: 2, N: 2,
    M: 2}, s = 17 (same ranks, same ledger), traces [−32, −63, 17] and [80, 48, 17].
    ρ = 0.59 keeps ⌊68.44⌋ = 68: one more credit (remove 48). Both rules: offers P +90, N −50, M −60; min_abs
    takes N −50; zero_sum (s = 17 > 0) takes the negative closest to 0, N −50 → s = −33, N at rank 1.
    Floor f = 0.75: ⌈0.75 · 2⌉ = 2 = r*, so no matrix may go below r*: ρ = 0.69 (three crossings) is
    unchanged, ρ = 0.59 cannot be reached."""
    sq = TargetShape(6, 6)
    shapes = {"P": sq, "N": sq, "M": sq, "tiny": TargetShape(1, 8)}
    scores = {
        "P": torch.tensor([100, 90, 32, 24, 16, 8], dtype=torch.float64),
        "N": torch.tensor([-100, -50, -12, -10, -6, -4], dtype=torch.float64),
        "M": torch.tensor([-100, -60, -14, -9, -5, -3], dtype=torch.float64),
        "tiny": torch.tensor([-1.0], dtype=torch.float64),
    }
    assert breakeven_rank(sq) == 2 and breakeven_rank(shapes["tiny"]) == 0
    assert sum(dense_params(s) for s in shapes.values()) == 116
    # integer ΔL: every sum is exact, so traces compare with ==
    ranks, trace = greedy_ranks(shapes, 0.795, scores, "min_abs")
    assert ranks == {"P": None, "N": 2, "M": 2, "tiny": None}
    assert trace == [-32, -63]
    ranks, trace = greedy_ranks(shapes, 0.795, scores, "zero_sum")
    assert ranks == {"P": 2, "N": 2, "M": None, "tiny": None}
    assert trace == [80, 48]
    for rule in GREEDY:
        alloc = allocate(rule, shapes, 0.795, scores)
        assert alloc.kept_params == 92 == alloc.budget.max_kept_params
        assert _ledger(scores, alloc.ranks) == greedy_ranks(shapes, 0.795, scores, rule)[1][-1]
    for f in (0.0, 0.75):
        assert greedy_ranks(shapes, 0.69, scores, "min_abs", f) == ({"P": 2, "N": 2, "M": 2, "tiny": None},
                                                                    [-32, -63, 17])
        assert greedy_ranks(shapes, 0.69, scores, "zero_sum", f) == ({"P": 2, "N": 2, "M": 2, "tiny": None},
                                                                     [80, 48, 17])
    assert greedy_ranks(shapes, 0.59, scores, "min_abs") == ({"P": 2, "N": 1, "M": 2, "tiny": None},
                                                             [-32, -63, 17, -33])
    assert greedy_ranks(shapes, 0.59, scores, "zero_sum") == ({"P": 2, "N": 1, "M": 2, "tiny": None},
                                                              [80, 48, 17, -33])
    for rule in GREEDY:
        with pytest.raises(ValueError, match="min_rank_fraction 0.75"):
            greedy_ranks(shapes, 0.59, scores, rule, 0.75)


def _macro_greedy(shapes, kept_fraction, scores, rule):
    """The rule this module used to implement, kept only to show the bug: a dense matrix offers one macro-move
    straight to r* whose ΔL is the sum over its whole dead zone, so opposite signs cancel inside it."""
    total = sum(dense_params(s) for s in shapes.values())
    to_remove = total - int(kept_fraction * total)
    ranks = {n: None for n in shapes}
    removed, running, trace = 0, 0.0, []
    while removed < to_remove:
        cands = []
        for n, s in shapes.items():
            r_star, r = breakeven_rank(s), ranks[n]
            if r is None and r_star >= 1:
                cands.append((float(scores[n][r_star:].sum()), dense_params(s) - factored_params(s, r_star), r_star, n))
            elif r is not None and r > 1:
                cands.append((float(scores[n][r - 1]), s.m + s.n, r - 1, n))
        pos = [c for c in cands if c[0] >= 0]
        neg = [c for c in cands if c[0] < 0]
        pool = ((pos or neg) if running <= 0 else (neg or pos)) if rule == "zero_sum" else cands
        delta, credit, new_rank, name = min(pool, key=lambda c: abs(c[0]))
        ranks[name] = new_rank
        removed += credit
        running += delta
        trace.append(running)
    return ranks, trace


@pytest.mark.parametrize("rule", GREEDY)
def test_dead_zone_cancellation_no_longer_removes_large_components(rule):
    """The fixed bug. A and B are 8×8: r* = ⌊63/16⌋ = 3, dead zone = components 7..3, reaching r* credits
    64 − 48 = 16. ρ = 0.875 keeps 112 of 128: exactly one crossing.

        A: [300, 250, 200,  40,   30, 20, 10, 5]   dead-zone sum 105, largest |ΔL| 40
        B: [300, 250, 200, 100, −100,  3,  2, 1]   dead-zone sum   6, holds +100 and −100

    Old macro rule: A's macro-move offers +105, B's +6 (the ±100 cancel); both rules take B (s = 0 → smallest
    positive; smallest |ΔL|) → {A: None, B: 3}, trace [6]: B's ±100 components are removed first, though
    each alone is the largest predicted loss change in the model.
    New rule: tails A +5, B +1 → B +1, +2, +3 (dead zone, pending +6, s = 0); then B offers −100: min_abs
    takes A's +5, +10, +20, +30, +40 (all < 100), and so does zero_sum (s = 0 → smallest positive, and B
    offers no positive). A reaches r*: credit 16, commits 5 + 10 + 20 + 30 + 40 = 105. Stop: {A: 3, B: None}
    (B's pending +6 dropped), trace [105]; no removed component has |ΔL| above 40."""
    sq = TargetShape(8, 8)
    shapes = {"A": sq, "B": sq}
    scores = {
        "A": torch.tensor([300, 250, 200, 40, 30, 20, 10, 5], dtype=torch.float64),
        "B": torch.tensor([300, 250, 200, 100, -100, 3, 2, 1], dtype=torch.float64),
    }
    assert breakeven_rank(sq) == 3

    def largest_removed(ranks):
        return max((float(scores[n][r:].abs().max()) for n, r in ranks.items() if r is not None), default=0.0)

    old_ranks, old_trace = _macro_greedy(shapes, 0.875, scores, rule)
    assert old_ranks == {"A": None, "B": 3} and old_trace == [6]
    assert largest_removed(old_ranks) == 100
    ranks, trace = greedy_ranks(shapes, 0.875, scores, rule)
    assert ranks == {"A": 3, "B": None} and trace == [105]
    assert largest_removed(ranks) == 40
    assert allocate(rule, shapes, 0.875, scores).kept_params == 112


def _reference_greedy(shapes, kept_fraction, scores, rule, f=0.0):
    """Naive restatement of the per-component rule, without the heaps or the pending ledger. State: one kept
    count ``k`` per matrix (components ``[0, k)`` kept); the applied rank is ``k`` when ``k <= r*``, else the
    matrix is dense. Every step rescans every matrix's tail component ``k − 1`` (offered while ``k > floor``
    and ``r* >= floor``), reads the committed sum ``s`` as the Σ ΔL removed by the *applied* ranks (so dead-zone
    selections do not count until their matrix reaches r*), picks by ``rule``, and recounts the stored
    parameters from the applied ranks; it stops once they are within ``⌊ρ D⌋``. A step whose matrix ends at
    ``k <= r*`` commits and appends the new ``s`` to the trace. The log has one entry per selection (dead zone
    included). Continuous random scores have no ties."""
    vals = {n: [float(x) for x in scores[n]] for n in shapes}
    budget = int(kept_fraction * sum(dense_params(s) for s in shapes.values()))
    r_star = {n: breakeven_rank(s) for n, s in shapes.items()}
    floor = {n: max(1, _floor(s, f)) for n, s in shapes.items()}
    k = {n: s.full_rank for n, s in shapes.items()}

    def applied():
        return {n: (k[n] if k[n] <= r_star[n] else None) for n in shapes}

    def kept():
        return sum(dense_params(shapes[n]) if r is None else factored_params(shapes[n], r)
                   for n, r in applied().items())

    def committed():
        return math.fsum(v for n, r in applied().items() if r is not None for v in vals[n][r:])

    trace, log = [], []
    while kept() > budget:
        cands = [(vals[n][k[n] - 1], n) for n in shapes if r_star[n] >= floor[n] and k[n] > floor[n]]
        assert cands, "budget unreachable"
        s = committed()
        pos = [c for c in cands if c[0] >= 0]
        neg = [c for c in cands if c[0] < 0]
        pool = ((pos or neg) if s <= 0 else (neg or pos)) if rule == "zero_sum" else cands
        delta, name = min(pool, key=lambda c: abs(c[0]))
        k[name] -= 1
        commits = k[name] <= r_star[name]
        log.append({"both_signs": bool(pos and neg), "min_abs_offered": min(abs(c[0]) for c in cands),
                    "delta": delta, "s_before": s, "commits": commits, "crossing": k[name] == r_star[name]})
        if commits:
            trace.append(committed())
    return applied(), trace, log


@pytest.mark.parametrize("rule", GREEDY)
@pytest.mark.parametrize("f", [0.0, 0.25])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_matches_reference_and_rule(rule, f, seed):
    """The heap implementation makes the same choices as the naive rescan; min_abs always takes the smallest
    |ΔL| on offer (whatever its sign); zero_sum takes the smallest positive when the committed s <= 0, else the
    negative closest to zero; dead-zone selections leave s alone and add nothing to the trace."""
    scores = _mixed_scores(MIXED_SHAPES, seed)
    ranks, trace = greedy_ranks(MIXED_SHAPES, 0.5, scores, rule, f)
    ref_ranks, ref_trace, log = _reference_greedy(MIXED_SHAPES, 0.5, scores, rule, f)
    assert ranks == ref_ranks
    assert trace == pytest.approx(ref_trace, rel=1e-9, abs=1e-12)
    assert len(trace) == sum(e["commits"] for e in log) > 100  # a long run of single-component commits
    assert sum(not e["commits"] for e in log) > 50  # ... and of dead-zone selections
    assert sum(e["crossing"] for e in log) == sum(r is not None for r in ranks.values())
    if rule == "min_abs":
        assert all(abs(e["delta"]) == e["min_abs_offered"] for e in log)
    else:
        both = [e for e in log if e["both_signs"]]
        assert len(both) > len(log) // 2
        assert all((e["delta"] >= 0) == (e["s_before"] <= 0) for e in both)
        # the decision reads the committed s, which dead-zone selections leave unchanged
        commits = iter([0.0] + list(ref_trace))
        s = next(commits)
        for e in log:
            assert e["s_before"] == pytest.approx(s, rel=1e-9, abs=1e-12)
            if e["commits"]:
                s = next(commits)
    # every committed ΔL stays applied, pending ones of matrices left dense do not: the final running sum is
    # the ledger of the returned ranks
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
@pytest.mark.parametrize("f", [0.0, 0.25])
def test_greedy_ranks_monotone_in_rho(allocator, f):
    """The greedy's sequence of selections does not depend on ρ (only where it stops): a smaller ρ's trace
    extends a larger ρ's, and a larger ρ never gives a smaller rank; dense (None) counts as full rank, and a
    matrix stopped inside its dead zone is dense."""
    scores = _mixed_scores(MIXED_SHAPES, 7)
    grid = [i / 40 for i in range(8, 41) if i / 40 >= 0.2 + f]  # 0.2 (or 0.45) .. 1.0; floors keep about f
    prev, prev_trace, seen = None, None, set()
    for rho in reversed(grid):  # decreasing ρ: ranks may only fall
        ranks = allocate(allocator, MIXED_SHAPES, rho, scores, min_rank_fraction=f).ranks
        r2, trace = greedy_ranks(MIXED_SHAPES, rho, scores, allocator, f)
        assert r2 == ranks
        seen.add(tuple(ranks.values()))
        if rho == 1.0:
            assert all(r is None for r in ranks.values()) and trace == []
        if prev is not None:
            assert trace[:len(prev_trace)] == prev_trace, rho
            for name in ranks:
                hi = MIXED_SHAPES[name].full_rank if prev[name] is None else prev[name]
                lo = MIXED_SHAPES[name].full_rank if ranks[name] is None else ranks[name]
                assert lo <= hi, (name, rho)
        prev, prev_trace = ranks, trace
    # not vacuous: the grid walks through many allocations, and the smallest ρ factors most targets (not
    # necessarily all: a matrix whose dead zone holds a large |ΔL| may never reach r*)
    assert len(seen) >= len(grid) // 2
    assert sum(r is not None for r in prev.values()) > len(MIXED_SHAPES) // 2


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
    """Whether each committed running sum lies within ± the largest |commit| so far (a commit is one ΔL, or
    at a crossing the matrix's pending dead-zone ΔL plus the crossing one)."""
    deltas = [trace[0]] + [b - a for a, b in itertools.pairwise(trace)]
    out, m = [], 0.0
    for s, d in zip(trace, deltas):
        m = max(m, abs(d))
        out.append(abs(s) <= m * (1 + 1e-9))
    return out


@pytest.mark.parametrize("shapes", [LLAMA_SHAPES, MIXED_SHAPES], ids=["llama", "mixed"])
def test_zero_sum_running_sum_stays_bounded(shapes):
    """Zero-sum invariant: while both signs are on offer, s_k ∈ [−M_k, +M_k], M_k the largest |commit| so far
    (induction: s <= 0 commits a ΔL in [0, M], s > 0 one in [−M, 0)). With one-signed matrices a crossing
    commits dead-zone ΔL of the same sign as the crossing one, so the induction covers every commit."""
    scores = _pure_sign_scores(shapes)
    _, trace = greedy_ranks(shapes, 0.5, scores, "zero_sum")
    _, _, log = _reference_greedy(shapes, 0.5, scores, "zero_sum")
    assert all(e["both_signs"] for e in log)  # the construction keeps both signs on offer throughout
    assert len(trace) == sum(e["commits"] for e in log) > 100
    assert sum(e["crossing"] for e in log) >= 2  # lumped commits do happen
    assert all(_in_band(trace))
    # min_abs on the same scores keeps taking the small negatives and leaves the band
    _, trace_abs = greedy_ranks(shapes, 0.5, scores, "min_abs")
    assert not all(_in_band(trace_abs))
    # random mixed signs, where a step sometimes offers one sign only: every single-component commit that
    # offers both signs moves s towards zero or past it by at most its own |ΔL|, |s_k| <= max(|s_k−1|, |ΔL_k|)
    # (the induction step), so one that starts inside the band stays inside. A crossing commits the matrix's
    # dead-zone ΔL, chosen earlier under either sign of s, in one lump: it is exempt and may leave the band.
    scores = _mixed_scores(shapes, 11)
    _, trace = greedy_ranks(shapes, 0.4, scores, "zero_sum")
    _, _, log = _reference_greedy(shapes, 0.4, scores, "zero_sum")
    commits = [e for e in log if e["commits"]]
    assert len(commits) == len(trace)
    steps = [k for k in range(1, len(trace)) if commits[k]["both_signs"] and not commits[k]["crossing"]]
    assert len(steps) >= len(trace) // 3
    for k in steps:
        assert abs(trace[k]) <= max(abs(trace[k - 1]), abs(commits[k]["delta"])) * (1 + 1e-9) + 1e-15, k
    band = _in_band(trace)
    assert all(band[k] for k in steps if band[k - 1])


@pytest.mark.parametrize("shapes", [LLAMA_SHAPES, MIXED_SHAPES], ids=["llama", "mixed"])
def test_zero_sum_equals_min_abs_with_one_signed_scores(shapes):
    """With every ΔL >= 0 both rules take the smallest ΔL on offer at every step (zero_sum: s > 0 finds no
    negative and falls back to the smallest positive); with every ΔL < 0 both take the one closest to zero
    (zero_sum: s <= 0 finds no positive and falls back to the negative closest to zero)."""
    positive = {n: v.abs() for n, v in _mixed_scores(shapes, 2).items()}
    negative = {n: -v for n, v in positive.items()}
    for scores in (positive, negative):
        for rho in (0.3, 0.6, 0.9):
            zs = greedy_ranks(shapes, rho, scores, "zero_sum")
            assert zs == greedy_ranks(shapes, rho, scores, "min_abs")
            ref_ranks, ref_trace, _ = _reference_greedy(shapes, rho, scores, "zero_sum")
            assert zs[0] == ref_ranks and zs[1] == pytest.approx(ref_trace, rel=1e-9, abs=1e-12)
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
    # a score vector must have one ΔL per component, min(m, n) of them (scores of another model, or padded)
    for bad in (scores["k"][:-1], torch.cat([scores["k"], scores["k"][:1]])):
        for allocator in GREEDY:
            with pytest.raises(ValueError, match=r"scores of k have \d+ components.*32x64 has 32"):
                allocate(allocator, LLAMA_SHAPES, 0.5, {**scores, "k": bad})
    assert set(ALLOCATORS) >= {"uniform", "zero_sum", "min_abs"}
    # uniform ignores scores and the floor
    assert allocate("uniform", LLAMA_SHAPES, 0.5, None, 0.5).ranks == allocate_uniform(LLAMA_SHAPES, 0.5)

"""lowrank.accounting: dense / factored parameter counts, the break-even rank, budgets."""

from __future__ import annotations

import itertools

import pytest

from lowrank.accounting import (
    Budget,
    TargetShape,
    breakeven_rank,
    bytes_per_element,
    dense_params,
    factored_params,
    stored_params,
)


def test_dense_and_factored_counts():
    s = TargetShape(m=128, n=64)
    assert dense_params(s) == 128 * 64
    assert factored_params(s, 10) == 10 * (128 + 64)
    sb = TargetShape(m=128, n=64, bias=True)
    assert dense_params(sb) == 128 * 64 + 128
    assert factored_params(sb, 10) == 10 * (128 + 64) + 128
    assert factored_params(s, 0) == 0
    assert s.full_rank == 64 and TargetShape(3, 7).full_rank == 3


def test_stored_params_dense_when_rank_none():
    s = TargetShape(m=50, n=30, bias=True)
    assert stored_params(s, None) == dense_params(s)
    assert stored_params(s, 4) == factored_params(s, 4)


SHAPES = [TargetShape(m, n, b) for (m, n), b in itertools.product(
    [(1, 1), (1, 2), (2, 2), (3, 5), (64, 64), (32, 64), (128, 64), (64, 128), (4096, 11008), (97, 13)],
    [False, True])]


@pytest.mark.parametrize("s", SHAPES, ids=lambda s: f"{s.m}x{s.n}{'b' if s.bias else ''}")
def test_breakeven_rank(s):
    r = breakeven_rank(s)
    assert r == (s.m * s.n - 1) // (s.m + s.n)
    # r* is the largest rank whose factors are strictly smaller than the dense matrix
    assert factored_params(s, r) < dense_params(s) <= factored_params(s, r + 1)
    brute = max(k for k in range(0, min(s.m, s.n) + 2) if factored_params(s, k) < dense_params(s))
    assert r == brute
    assert 0 <= r < s.full_rank  # r* < mn/(m+n) < min(m, n)


def test_breakeven_square_and_llama_shapes():
    assert breakeven_rank(TargetShape(64, 64)) == 31  # (4096-1)//128
    assert breakeven_rank(TargetShape(4096, 4096)) == 2047
    assert breakeven_rank(TargetShape(1, 1)) == 0


def test_negative_rank_rejected():
    with pytest.raises(ValueError):
        factored_params(TargetShape(4, 4), -1)


@pytest.mark.parametrize("m,n", [(0, 4), (4, 0), (-1, 3)])
def test_non_positive_shape_rejected(m, n):
    with pytest.raises(ValueError):
        TargetShape(m, n)


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1])
def test_budget_rejects_out_of_range_fraction(fraction):
    with pytest.raises(ValueError, match="kept fraction"):
        Budget(fraction, 1000)


def test_budget_rejects_empty_target_set():
    with pytest.raises(ValueError):
        Budget(0.5, 0)


def test_budget_numbers():
    b = Budget(0.8, 1001)
    assert b.max_kept_params == 800  # ⌊0.8·1001⌋ = ⌊800.8⌋
    assert b.removed_fraction == pytest.approx(0.2, abs=1e-15)
    assert Budget(1.0, 1001).max_kept_params == 1001


def test_bytes_per_element():
    assert bytes_per_element("float32") == 4
    assert bytes_per_element("bfloat16") == 2
    assert bytes_per_element("float16") == 2
    with pytest.raises(ValueError):
        bytes_per_element("int3")

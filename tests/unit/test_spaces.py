"""lowrank.spaces: the whitening-space registry (which input factor ``S`` each kind uses)."""

from __future__ import annotations

import pytest
import torch

from lowrank.calibration import InputGrams
from lowrank.spaces import SPACES, bind, input_factor

N = 12


def _grams() -> InputGrams:
    """Two targets sharing one anisotropic PD second moment, a third with its own rank-deficient one."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, N, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, N, dtype=torch.float64)
    Y = torch.randn(5, N, generator=g, dtype=torch.float64)  # 5 tokens < 12 dims: singular without damping
    return InputGrams(C={"a": X.T @ X / 200, "b": Y.T @ Y / 5}, group_of={"q": "a", "k": "a", "o": "b"},
                      tokens={"a": 200, "b": 5})


def test_registry():
    assert set(SPACES) >= {"none", "input_gram"}
    assert SPACES["none"].stat is None
    assert SPACES["input_gram"].stat == "input_gram"


def test_none_is_identity():
    assert input_factor("none", "q", {}, 1e-6) is None
    # the plain space reads no statistics, even when some are given
    assert input_factor("none", "q", {"input_gram": _grams()}, 1e-6) is None


@pytest.mark.parametrize("damping", [1e-6, 1e-2])
@pytest.mark.parametrize("name", ["q", "o"])
def test_input_gram_is_cholesky_of_damped_gram(name, damping):
    grams = _grams()
    S = input_factor("input_gram", name, {"input_gram": grams}, damping)
    C = grams.for_target(name)
    # ε = damping · tr(C)/n (relative damping, lowrank.whitening); the first rung of the ladder suffices here
    eps = damping * float(torch.trace(C)) / N
    expected = torch.linalg.cholesky(C + eps * torch.eye(N, dtype=torch.float64))
    assert S.dtype == torch.float64 and S.shape == (N, N)
    assert torch.equal(S, torch.tril(S))
    # same LAPACK factorisation of the same matrix: equal up to float64 round-off (|S| ~ 1..10)
    torch.testing.assert_close(S, expected, rtol=0, atol=1e-12)
    assert grams.factor_methods[grams.group_of[name]] == "cholesky"


def test_input_gram_shared_group_shares_factor():
    grams = _grams()
    stats = {"input_gram": grams}
    assert input_factor("input_gram", "q", stats, 1e-6) is input_factor("input_gram", "k", stats, 1e-6)


def test_unknown_kind_and_missing_stats_rejected():
    with pytest.raises(ValueError, match="unknown whitening 'pca'"):
        input_factor("pca", "q", {"input_gram": _grams()}, 1e-6)
    with pytest.raises(ValueError, match="needs the 'input_gram' statistics"):
        input_factor("input_gram", "q", {}, 1e-6)
    with pytest.raises(KeyError, match="no input statistics"):
        input_factor("input_gram", "nope", {"input_gram": _grams()}, 1e-6)


@pytest.mark.parametrize("damping", [1e-6, 1e-2])
def test_bound_space_gives_the_registry_factors(damping):
    """bind(kind, stats, damping, decomposition, device): S and T of each target, the same tensors as the
    registry's lookups; unknown kinds fail at bind, missing statistics at the first factor asked for."""
    grams = _grams()
    space = bind("input_gram", {"input_gram": grams}, damping, "eigh", "cpu")
    assert (space.kind, space.decomposition, space.two_sided) == ("input_gram", "eigh", False)
    for name in ("q", "k", "o"):
        S, T = space.factors(name)
        assert T is None and torch.equal(S, input_factor("input_gram", name, {"input_gram": grams}, damping))
    assert bind("none").factors("q") == (None, None) and bind("io_kl", {}).two_sided
    with pytest.raises(ValueError, match="unknown whitening 'pca'"):
        bind("pca", {"input_gram": grams})
    with pytest.raises(ValueError, match="needs the 'input_gram' statistics"):
        bind("input_gram", {}).input("q")

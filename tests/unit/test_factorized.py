"""lowrank.factorized.LowRankLinear: y = A (B x) + b, parameter count, dense form, state dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank.factorized import LowRankLinear

N_IN, M_OUT, K = 12, 20, 5


def _layer(bias: bool, dtype=torch.float64, seed: int = 0) -> LowRankLinear:
    torch.manual_seed(seed)
    return LowRankLinear(N_IN, M_OUT, K, bias=bias, dtype=dtype)


@pytest.mark.parametrize("bias", [False, True])
def test_forward_is_up_down_plus_bias(bias):
    layer = _layer(bias)
    x = torch.randn(3, 7, N_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    W = layer.up.weight @ layer.down.weight
    expected = x @ W.T + (layer.up.bias if bias else 0)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    assert layer(x).shape == (3, 7, M_OUT)


def test_forward_float32_tolerance():
    layer = _layer(True, dtype=torch.float32)
    x = torch.randn(4, N_IN, generator=torch.Generator().manual_seed(2))
    expected = (x.double() @ (layer.up.weight.double() @ layer.down.weight.double()).T + layer.up.bias.double())
    torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_parameter_count(bias):
    layer = _layer(bias)
    n = sum(p.numel() for p in layer.parameters())
    assert n == K * (M_OUT + N_IN) + (M_OUT if bias else 0)
    assert layer.down.weight.shape == (K, N_IN) and layer.up.weight.shape == (M_OUT, K)
    assert layer.down.bias is None


def test_from_factors_and_to_dense():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(M_OUT, K, dtype=torch.float64, generator=g)
    B = torch.randn(K, N_IN, dtype=torch.float64, generator=g)
    b = torch.randn(M_OUT, dtype=torch.float64, generator=g)
    layer = LowRankLinear.from_factors(A, B, b, dtype=torch.float32)
    assert layer.rank == K and layer.in_features == N_IN and layer.out_features == M_OUT
    assert layer.up.weight.dtype == torch.float32
    torch.testing.assert_close(layer.weight.double(), A @ B, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.bias.double(), b, rtol=0, atol=1e-6)
    dense = layer.to_dense()
    assert type(dense) is nn.Linear and dense.weight.shape == (M_OUT, N_IN)
    torch.testing.assert_close(dense.weight, layer.weight, rtol=0, atol=0)
    x = torch.randn(6, N_IN, generator=g)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-5)
    assert int(torch.linalg.matrix_rank(layer.weight.detach())) == K  # float32 tolerance


def test_to_dense_without_bias():
    layer = _layer(False)
    dense = layer.to_dense()
    assert dense.bias is None
    x = torch.randn(2, N_IN, dtype=torch.float64)
    torch.testing.assert_close(dense(x), layer(x), rtol=0, atol=1e-12)


def test_state_dict_round_trip():
    layer = _layer(True, dtype=torch.float32)
    sd = layer.state_dict()
    assert set(sd) == {"down.weight", "up.weight", "up.bias"}
    fresh = LowRankLinear(N_IN, M_OUT, K, bias=True)
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(5, N_IN)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    wrong = LowRankLinear(N_IN, M_OUT, K + 1, bias=True)
    with pytest.raises(RuntimeError):
        wrong.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("rank", [0, -2, min(N_IN, M_OUT) + 1])
def test_bad_rank_rejected(rank):
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(N_IN, M_OUT, rank)


def test_full_rank_allowed():
    assert LowRankLinear(N_IN, M_OUT, min(N_IN, M_OUT)).rank == N_IN


def test_from_factors_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="chain"):
        LowRankLinear.from_factors(torch.zeros(4, 3), torch.zeros(2, 5))

"""lowrank.grams: the mixed-precision Gram update equals the float64 one to float32 round-off (relative 1e-6)."""

from __future__ import annotations

import pytest
import torch

from lowrank.grams import gram_update, resolve_precision


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_equals_float64(dtype):
    g = torch.Generator().manual_seed(0)
    xs = [(torch.randn(300, 24, generator=g) + 0.5).to(dtype) for _ in range(3)]
    exact = torch.zeros(24, 24, dtype=torch.float64)
    mixed = torch.zeros_like(exact)
    for x in xs:
        gram_update(exact, x, "float64")
        gram_update(mixed, x, "mixed")
    ref = sum(x.double().T @ x.double() for x in xs)
    torch.testing.assert_close(exact, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(mixed, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    assert not torch.equal(mixed, exact) or dtype == torch.bfloat16  # float32 products do round


def test_mixed_keeps_float64_inputs_exact():
    x = torch.randn(200, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    G = torch.zeros(16, 16, dtype=torch.float64)
    gram_update(G, x, "mixed")
    assert torch.equal(G, torch.zeros_like(G).addmm_(x.T, x))


def test_precision_resolution(monkeypatch):
    assert resolve_precision("auto") == "mixed"
    assert resolve_precision("float64") == "float64"
    assert resolve_precision("mixed") == "mixed"
    monkeypatch.setenv("LOWRANK_GRAM_PRECISION", "float64")  # the config key statistics.input_gram.precision
    assert resolve_precision("auto") == "mixed"  # replaced the environment switch
    with pytest.raises(ValueError, match="Gram precision"):
        resolve_precision("fp8")

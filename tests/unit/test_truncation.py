"""lowrank.truncation: plain and whitened rank-k factors, Eckart-Young in both metrics, model-level swap."""

from __future__ import annotations

import pytest
import torch

from lowrank.calibration import collect_input_grams
from lowrank.factorized import LowRankLinear
from lowrank.model import find_targets, linear_weight
from lowrank.truncation import Factors, truncate, truncate_model
from lowrank.whitening import whitening_factor

M, N = 24, 32


def _weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(M, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _anisotropic_inputs(n_tokens: int = 512, seed: int = 1) -> torch.Tensor:
    """Calibration inputs whose channel scales span four orders of magnitude (X ∈ R^{N_tok×n})."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, N, dtype=torch.float64)
    scales = scales[torch.randperm(N, generator=g)]
    return torch.randn(n_tokens, N, generator=g, dtype=torch.float64) * scales


def _S(X: torch.Tensor, damping: float = 1e-8):
    C = X.T @ X / X.shape[0]
    return whitening_factor(C, damping=damping)


def test_full_rank_plain_reproduces_weight():
    W = _weight()
    f = truncate(W, min(M, N))
    assert f.A.shape == (M, M) and f.B.shape == (M, N)
    torch.testing.assert_close(f.A @ f.B, W, rtol=0, atol=1e-12)
    assert f.discarded_energy() == pytest.approx(0.0, abs=1e-20)


def test_full_rank_whitened_reproduces_weight():
    W = _weight()
    S = _S(_anisotropic_inputs(), damping=1e-6).S
    f = truncate(W, min(M, N), S)
    # ‖W‖ ~ 5, S has condition ~ 1e4: a float64 round trip through S⁻¹ stays below 1e-9
    torch.testing.assert_close(f.A @ f.B, W, rtol=0, atol=1e-9)


@pytest.mark.parametrize("k", [1, 5, 12, 23])
def test_whitened_error_is_discarded_spectrum(k):
    """Eckart-Young in the whitened metric: ‖(W − A B) S‖²_F = Σ_{i>k} σ_i²(W S) = discarded_energy()."""
    W = _weight(2)
    S = _S(_anisotropic_inputs(), damping=1e-6).S
    f = truncate(W, k, S)
    assert isinstance(f, Factors) and f.rank == k
    assert f.A.shape == (M, k) and f.B.shape == (k, N)
    sigma = torch.linalg.svdvals(W @ S)
    torch.testing.assert_close(f.sigma, sigma, rtol=1e-10, atol=0)
    tail = float((sigma[k:] ** 2).sum())
    err = float(torch.linalg.matrix_norm((W - f.A @ f.B) @ S) ** 2)
    assert err == pytest.approx(tail, rel=1e-8)
    assert f.discarded_energy() == pytest.approx(tail, rel=1e-12)
    assert int(torch.linalg.matrix_rank(f.A @ f.B)) == k


@pytest.mark.parametrize("k", [1, 7, 20])
def test_plain_error_is_tail_of_spectrum(k):
    W = _weight(3)
    f = truncate(W, k)
    sigma = torch.linalg.svdvals(W)
    tail = float((sigma[k:] ** 2).sum())
    err = float(torch.linalg.matrix_norm(W - f.A @ f.B) ** 2)
    assert err == pytest.approx(tail, rel=1e-10)
    assert f.discarded_energy() == pytest.approx(tail, rel=1e-12)
    # balanced factors: A = U Σ^{1/2}, B = Σ^{1/2} Vᵀ have equal column / row norms √σ_i
    torch.testing.assert_close(f.A.norm(dim=0), sigma[:k].sqrt(), rtol=1e-10, atol=0)
    torch.testing.assert_close(f.B.norm(dim=1), sigma[:k].sqrt(), rtol=1e-10, atol=0)


def test_float32_weight_gives_float64_factors():
    W = _weight().to(torch.float32)
    f = truncate(W, 4)
    assert f.A.dtype == f.B.dtype == torch.float64
    assert float(torch.linalg.matrix_norm(W.double() - f.A @ f.B) ** 2) == pytest.approx(f.discarded_energy(),
                                                                                         rel=1e-8)


@pytest.mark.parametrize("k", [4, 8, 16])
def test_whitened_beats_plain_on_anisotropic_inputs(k):
    """Calibration output error ‖(W − W') Xᵀ‖_F: whitened truncation is optimal for it, plain SVD is not."""
    W = _weight(4)
    X = _anisotropic_inputs()
    wf = _S(X, damping=1e-8)
    fw = truncate(W, k, wf.S)
    fp = truncate(W, k)
    err_w = float(torch.linalg.matrix_norm((W - fw.A @ fw.B) @ X.T))
    err_p = float(torch.linalg.matrix_norm((W - fp.A @ fp.B) @ X.T))
    assert err_w < 0.5 * err_p, (err_w, err_p)
    # exact bookkeeping: Σ_{i>k}σ² = ‖ΔXᵀ‖²/N + ε‖Δ‖²_F  (S Sᵀ = XᵀX/N + εI)
    delta = W - fw.A @ fw.B
    predicted = err_w**2 / X.shape[0] + wf.epsilon * float(torch.linalg.matrix_norm(delta) ** 2)
    assert fw.discarded_energy() == pytest.approx(predicted, rel=1e-8)


@pytest.mark.parametrize("k", [0, -1, min(M, N) + 1])
def test_bad_rank_rejected(k):
    with pytest.raises(ValueError, match="rank"):
        truncate(_weight(), k)


def test_truncate_model_swaps_targets_and_reports(tiny_llama, token_windows, cpu):
    model = tiny_llama
    targets = find_targets(model)
    grams = collect_input_grams(model, token_windows, 4, cpu, targets)
    dense = {t.name: linear_weight(model.get_submodule(t.name)).detach().clone() for t in targets}
    ranks = {t.name: (None if i == 0 else 8) for i, t in enumerate(targets)}  # first target stays dense
    report = truncate_model(model, targets, ranks, "input_gram", {"input_gram": grams}, damping=1e-6)
    assert report[targets[0].name] == {"rank": None}
    assert isinstance(model.get_submodule(targets[0].name), torch.nn.Linear)
    for t in targets[1:]:
        mod = model.get_submodule(t.name)
        assert isinstance(mod, LowRankLinear) and mod.rank == 8
        assert mod.weight.dtype == torch.float32
        row = report[t.name]
        assert set(row) == {"rank", "relative_error"} and row["rank"] == 8
        assert grams.factor_methods[grams.group_of[t.name]] == "cholesky"  # how S was obtained, per input group
        # the reported relative error is the whitened tail fraction of this very weight
        wf = whitening_factor(grams.for_target(t.name), damping=1e-6)
        sigma = torch.linalg.svdvals(dense[t.name].double() @ wf.S)
        expected = float((sigma[8:] ** 2).sum() / (sigma**2).sum())
        assert row["relative_error"] == pytest.approx(expected, rel=1e-6)
        assert 0.0 < row["relative_error"] < 1.0
        # and the stored product is the rank-8 whitened fit (float32 storage: atol 1e-6 on weights ~0.02)
        f = truncate(dense[t.name], 8, wf.S)
        torch.testing.assert_close(mod.weight.double(), f.A @ f.B, rtol=0, atol=1e-6)


def test_truncate_model_plain_matches_truncate(tiny_llama):
    model = tiny_llama
    targets = find_targets(model)
    name = targets[4].name
    W = linear_weight(model.get_submodule(name)).detach().clone()
    report = truncate_model(model, targets, {name: 10}, "none")
    assert set(report) == {t.name for t in targets}
    assert all(report[t.name] == {"rank": None} for t in targets if t.name != name)
    f = truncate(W, 10)
    torch.testing.assert_close(model.get_submodule(name).weight.double(), f.A @ f.B, rtol=0, atol=1e-6)
    assert report[name]["relative_error"] == pytest.approx(
        f.discarded_energy() / float((f.sigma**2).sum()), rel=1e-9)


def test_truncate_model_rejects_bad_whitening(tiny_llama):
    targets = find_targets(tiny_llama)
    with pytest.raises(ValueError, match="unknown whitening"):
        truncate_model(tiny_llama, targets, {}, "pca")
    with pytest.raises(ValueError, match="needs the 'input_gram' statistics"):
        truncate_model(tiny_llama, targets, {targets[0].name: 4}, "input_gram", None)
    with pytest.raises(ValueError, match="needs the 'input_gram' statistics"):
        truncate_model(tiny_llama, targets, {targets[0].name: 4}, "input_gram", {})
    # nothing was replaced by the failed calls
    assert not any(isinstance(m, LowRankLinear) for m in tiny_llama.modules())

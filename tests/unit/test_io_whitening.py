"""IO-SVD's two-sided whitening ``B = Tᵀ W S``: round trip, Eckart-Young in the two-sided metric, first-order scores.

``S Sᵀ`` is the damped input second moment and ``T Tᵀ`` the damped top-K KL output metric; the factors are
``A = T^{-T} U_k Σ_k^{1/2}``, ``B = Σ_k^{1/2} V_kᵀ S⁻¹`` and the score of component ``i`` is
``ΔL_i = −σ_i u_iᵀ T^{-1} G S^{-T} v_i``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lowrank.calibration import collect_input_grams
from lowrank.factorized import LowRankLinear
from lowrank.gradients import calibration_gradients, calibration_loss
from lowrank.model import find_targets
from lowrank.output_metric import collect_output_kl
from lowrank.scoring import first_order_delta, score_targets
from lowrank.spaces import SPACES, input_factor, output_factor, space_stats
from lowrank.truncation import truncate, truncate_model
from lowrank.whitening import whitening_factor

M, N = 20, 28


def _pd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * d, d, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, d, dtype=torch.float64)
    return X.T @ X / X.shape[0]


def _factors():
    W = torch.randn(M, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    S = whitening_factor(_pd(N, 1), damping=1e-8).S
    T = whitening_factor(_pd(M, 2), damping=1e-8).S
    return W, S, T


def test_registry_and_stats():
    assert SPACES["io_kl"].stat == "input_gram" and SPACES["io_kl"].output_stat == "output_kl"
    assert space_stats("io_kl") == ("input_gram", "output_kl")
    assert space_stats("input_gram") == ("input_gram",) and space_stats("none") == ()
    assert all(SPACES[k].output is None for k in ("none", "input_gram", "act_scale", "fisher"))
    assert output_factor("input_gram", "x", {}) is None
    with pytest.raises(ValueError, match="output_kl"):
        output_factor("io_kl", "x", {"input_gram": None})


def test_full_rank_round_trip_reproduces_weight():
    W, S, T = _factors()
    f = truncate(W, min(M, N), S, T)
    assert f.A.shape == (M, M) and f.B.shape == (M, N)
    torch.testing.assert_close(f.A @ f.B, W, rtol=0, atol=1e-10)
    torch.testing.assert_close(f.sigma, torch.linalg.svdvals(T.T @ W @ S), rtol=1e-12, atol=0)


@pytest.mark.parametrize("k", [1, 5, 13])
def test_two_sided_error_is_discarded_spectrum_and_optimal(k):
    W, S, T = _factors()
    f = truncate(W, k, S, T)
    err = float((T.T @ (W - f.A @ f.B) @ S).pow(2).sum())
    assert err == pytest.approx(f.discarded_energy(), rel=1e-9)
    # the one-sided (input-only) factors of the same rank are worse in the two-sided metric
    g = truncate(W, k, S)
    assert float((T.T @ (W - g.A @ g.B) @ S).pow(2).sum()) > err * (1 + 1e-6)


def test_identity_output_factor_is_one_sided():
    W, S, _ = _factors()
    eye = torch.eye(M, dtype=torch.float64)
    a, b = truncate(W, 7, S, eye), truncate(W, 7, S)
    torch.testing.assert_close(a.A @ a.B, b.A @ b.B, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def io_setup(_llama_base):
    model = copy.deepcopy(_llama_base).double()
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1234))
    targets = find_targets(model)
    stats = {"input_gram": collect_input_grams(model, windows, 4, torch.device("cpu"), targets),
             "output_kl": collect_output_kl(model, windows, 4, torch.device("cpu"), targets, top_k=5)}
    grads = calibration_gradients(model, windows, 2, "cpu", targets)
    scores = score_targets(model, targets, "first_order", "io_kl", stats, 1e-6, "cpu", grads)
    return {"model": model, "windows": windows, "stats": stats, "grads": grads, "scores": scores}


FD_TARGETS = ("model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj")


def test_first_order_scores_match_finite_differences(io_setup):
    """D(t) = (L(W + tΔW_i) − L(W))/t → ΔL_i, with ΔW_i = −σ_i T^{-T} u_i v_iᵀ S⁻¹ the removal of component i."""
    model, windows, stats, scores = (io_setup[k] for k in ("model", "windows", "stats", "scores"))
    L0 = calibration_loss(model, windows, 4)
    checked = []
    for name in FD_TARGETS:
        mod = model.get_submodule(name)
        W = mod.weight.detach().clone()
        S = input_factor("io_kl", name, stats, 1e-6)
        T = output_factor("io_kl", name, stats)
        U, sigma, Vh = torch.linalg.svd(T.T @ W @ S, full_matrices=False)
        torch.testing.assert_close(scores[name]["sigma"], sigma, rtol=1e-10, atol=0)
        d = scores[name]["score"]
        r = len(sigma)
        tail = sorted(range(r // 2, r), key=lambda i: -abs(float(d[i])))[:2]  # the tail's clearest signals
        for i in tail:
            dW = -sigma[i] * torch.linalg.solve_triangular(T.T, U[:, i : i + 1], upper=True) @ \
                torch.linalg.solve_triangular(S, Vh[i : i + 1], upper=False, left=False)
            # algebra: ΔL_i = ⟨G, ΔW_i⟩
            assert float((io_setup["grads"].G[name] * dW).sum()) == pytest.approx(float(d[i]), rel=1e-8)
            with torch.no_grad():
                mod.weight.copy_(W + 0.1 * dW)
            fd = (calibration_loss(model, windows, 4) - L0) / 0.1
            with torch.no_grad():
                mod.weight.copy_(W)
            checked.append((name, i, float(d[i]), fd))
    for name, i, dl, fd in checked:
        assert abs(dl) > 1e-6, (name, i, dl)
        assert fd == pytest.approx(dl, rel=0.03), (name, i, dl, fd)
    assert calibration_loss(model, windows, 4) == L0


def test_first_order_delta_in_output_coordinates_equals_direct_formula(io_setup):
    name = FD_TARGETS[1]
    stats, G = io_setup["stats"], io_setup["grads"].G[name]
    W = io_setup["model"].get_submodule(name).weight.detach()
    S, T = input_factor("io_kl", name, stats, 1e-6), output_factor("io_kl", name, stats)
    U, sigma, Vh = torch.linalg.svd(T.T @ W @ S, full_matrices=False)
    H = torch.linalg.inv(T) @ G @ torch.linalg.inv(S).T  # explicit inverses, for the check only
    direct = -sigma * ((U.T @ H) * Vh).sum(dim=1)
    torch.testing.assert_close(io_setup["scores"][name]["score"], direct, rtol=1e-7, atol=1e-14)
    # and it differs from the one-sided (input_gram) score: the output factor matters
    _, one_sided = first_order_delta(W, S, G)
    assert not torch.allclose(one_sided, direct, rtol=1e-2)


def test_truncate_model_io_kl_meets_the_two_sided_error(io_setup):
    model = copy.deepcopy(io_setup["model"])
    targets = find_targets(model)
    ranks = {t.name: max(1, t.shape.full_rank // 3) for t in targets}
    report = truncate_model(model, targets, ranks, "io_kl", io_setup["stats"], 1e-6)
    name = FD_TARGETS[2]
    mod = model.get_submodule(name)
    assert isinstance(mod, LowRankLinear) and mod.rank == ranks[name]
    W = io_setup["model"].get_submodule(name).weight.detach()
    S = input_factor("io_kl", name, io_setup["stats"], 1e-6)
    T = output_factor("io_kl", name, io_setup["stats"])
    sig = torch.linalg.svdvals(T.T @ W @ S)
    err = float((T.T @ (W - mod.weight.detach()) @ S).pow(2).sum()) / float(sig.pow(2).sum())
    assert err == pytest.approx(report[name]["relative_error"], rel=1e-8)

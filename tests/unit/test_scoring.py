"""lowrank.scoring: the ``sigma`` spectra and the ZS-SVD first-order loss change ``ΔL_i = −σ_i (Uᵀ G S^{-T} V)_ii``.

The first-order scores are checked three ways: algebraically (``ΔL_i = ⟨G, ΔW_i⟩`` with ``ΔW_i`` the removal of
component ``i`` in weight space, and ``Σ_i ΔL_i = −⟨G, W⟩``), and against finite differences of the calibration
loss of a float64 tiny LLaMA.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lowrank.calibration import InputGrams, collect_input_grams
from lowrank.gradients import TargetGradients, calibration_gradients, calibration_loss
from lowrank.model import find_targets, linear_weight
from lowrank.scoring import SCORERS, Scorer, first_order_delta, score_targets, whitened_gradient
from lowrank.spaces import input_factor
from lowrank.truncation import truncate
from lowrank.whitening import whitening_factor


def _synthetic_grams(model) -> InputGrams:
    """One random anisotropic PD second moment per target input width (no calibration forward needed)."""
    targets = find_targets(model)
    C, group_of, tokens = {}, {}, {}
    g = torch.Generator().manual_seed(0)
    for t in targets:
        key = f"n{t.shape.n}.{t.block}"
        if key not in C:
            X = torch.randn(4 * t.shape.n, t.shape.n, generator=g, dtype=torch.float64)
            X = X * torch.logspace(-1.5, 1.5, t.shape.n, dtype=torch.float64)
            C[key] = X.T @ X / X.shape[0]
            tokens[key] = X.shape[0]
        group_of[t.name] = key
    return InputGrams(C=C, group_of=group_of, tokens=tokens)


def _synthetic_gradients(model, seed: int = 1) -> TargetGradients:
    g = torch.Generator().manual_seed(seed)
    G = {t.name: torch.randn(t.shape.m, t.shape.n, generator=g, dtype=torch.float64) * 1e-3
         for t in find_targets(model)}
    return TargetGradients(G=G, fisher=None, tokens=1, loss=0.0)


# ---------------------------------------------------------------------------------------------------------------
# registry and the sigma scorer


def test_registry():
    assert set(SCORERS) >= {"sigma", "first_order"}
    assert all(isinstance(s, Scorer) and s.description for s in SCORERS.values())
    assert SCORERS["sigma"].needs_gradients is False
    assert SCORERS["first_order"].needs_gradients is True


def test_sigma_plain_is_svdvals(tiny_llama):
    targets = find_targets(tiny_llama)
    scores = score_targets(tiny_llama, targets, "sigma", "none", {})
    assert list(scores) == [t.name for t in targets]
    for t in targets:
        W = linear_weight(tiny_llama.get_submodule(t.name)).detach().double()
        s = scores[t.name]
        assert set(s) == {"sigma", "score"}
        assert s["sigma"].dtype == torch.float64 and s["sigma"].shape == (t.shape.full_rank,)
        # float64 SVD of the same float64 matrix: round-off only
        torch.testing.assert_close(s["sigma"], torch.linalg.svdvals(W), rtol=1e-12, atol=0)
        assert torch.equal(s["score"], s["sigma"])
        assert torch.all(s["sigma"][:-1] >= s["sigma"][1:])
        # Σσ² = ‖W‖²_F
        assert float((s["sigma"] ** 2).sum()) == pytest.approx(float(W.pow(2).sum()), rel=1e-12)


@pytest.mark.parametrize("damping", [1e-6, 1e-2])
def test_sigma_whitened_is_svdvals_of_WS(tiny_llama, damping):
    grams = _synthetic_grams(tiny_llama)
    targets = find_targets(tiny_llama)
    scores = score_targets(tiny_llama, targets, "sigma", "input_gram", {"input_gram": grams}, damping=damping)
    for t in targets:
        W = linear_weight(tiny_llama.get_submodule(t.name)).detach().double()
        C = grams.for_target(t.name)
        wf = whitening_factor(C, damping=damping)
        s = scores[t.name]["sigma"]
        # S has condition ~1e3 (input scales 10^±1.5): 1e-10 relative is float64 round-off with margin
        torch.testing.assert_close(s, torch.linalg.svdvals(W @ wf.S), rtol=1e-10, atol=0)
        # Σσ_w² = ‖W S‖²_F = tr(W (C + εI) Wᵀ): the calibration output energy (plus damping)
        energy = float(torch.trace(W @ (C + wf.epsilon * torch.eye(C.shape[0], dtype=C.dtype)) @ W.T))
        assert float((s**2).sum()) == pytest.approx(energy, rel=1e-10)
        # the truncation cuts the same spectrum
        torch.testing.assert_close(truncate(W, 1, wf.S).sigma, s, rtol=1e-10, atol=0)


def test_whitened_differs_from_plain(tiny_llama):
    grams = _synthetic_grams(tiny_llama)
    targets = find_targets(tiny_llama)[:1]
    a = score_targets(tiny_llama, targets, "sigma", "none", {})[targets[0].name]["sigma"]
    b = score_targets(tiny_llama, targets, "sigma", "input_gram", {"input_gram": grams})[targets[0].name]["sigma"]
    assert not torch.allclose(a, b, rtol=1e-2)


def test_scorer_errors(tiny_llama):
    targets = find_targets(tiny_llama)
    grams = {"input_gram": _synthetic_grams(tiny_llama)}
    with pytest.raises(ValueError, match="unknown scorer"):
        score_targets(tiny_llama, targets, "fisher", "none", {})
    with pytest.raises(ValueError, match="unknown whitening"):
        score_targets(tiny_llama, targets, "sigma", "pca", grams)
    with pytest.raises(ValueError, match="needs the 'input_gram' statistics"):
        score_targets(tiny_llama, targets, "sigma", "input_gram", {})
    with pytest.raises(ValueError, match="needs calibration gradients"):
        score_targets(tiny_llama, targets, "first_order", "input_gram", grams)
    with pytest.raises(ValueError, match="needs calibration gradients"):
        SCORERS["first_order"].fn(torch.eye(3), None, None)


# ---------------------------------------------------------------------------------------------------------------
# first-order ΔL: algebra


def _components(W: torch.Tensor, S: torch.Tensor | None):
    """``(U, σ, Vh, ΔW)`` with ``ΔW[i] = −σ_i u_i v_iᵀ S⁻¹``: removing component ``i`` in weight space."""
    S = torch.eye(W.shape[1], dtype=torch.float64) if S is None else S
    U, sigma, Vh = torch.linalg.svd(W.double() @ S, full_matrices=False)
    Vs = torch.linalg.solve_triangular(S, Vh, upper=False, left=False)  # rows v_iᵀ S⁻¹
    dW = -sigma[:, None, None] * U.T[:, :, None] * Vs[:, None, :]  # [r, m, n]
    return U, sigma, Vh, dW


def test_whitened_gradient_solves_H_St_equals_G():
    g = torch.Generator().manual_seed(3)
    S = torch.linalg.cholesky(torch.eye(8, dtype=torch.float64) + 0.3 * torch.ones(8, 8, dtype=torch.float64))
    G = torch.randn(5, 8, generator=g)  # float32 in: float64 out
    H = whitened_gradient(G, S)
    assert H.dtype == torch.float64
    torch.testing.assert_close(H @ S.T, G.double(), rtol=0, atol=1e-12)
    torch.testing.assert_close(H, G.double() @ torch.linalg.inv(S).T, rtol=0, atol=1e-12)
    assert torch.equal(whitened_gradient(G, None), G.double())


@pytest.mark.parametrize("space", ["none", "input_gram"])
def test_first_order_is_inner_product_with_removal(tiny_llama, space):
    """``ΔL_i = ⟨G, ΔW_i⟩`` exactly, and ``Σ_i ΔL_i = −⟨G, W⟩`` (removing every component removes W)."""
    grams = {"input_gram": _synthetic_grams(tiny_llama)}
    grads = _synthetic_gradients(tiny_llama)
    targets = find_targets(tiny_llama)
    scores = score_targets(tiny_llama, targets, "first_order", space, grams, 1e-6, "cpu", grads)
    for t in targets[::3]:
        W = linear_weight(tiny_llama.get_submodule(t.name)).detach().double()
        G = grads.G[t.name]
        S = input_factor(space, t.name, grams, 1e-6)
        _, sigma, _, dW = _components(W, S)
        got = scores[t.name]
        assert got["score"].dtype == torch.float64 and got["score"].shape == (t.shape.full_rank,)
        torch.testing.assert_close(got["sigma"], sigma, rtol=1e-10, atol=0)
        expected = (dW * G).sum(dim=(1, 2))
        # float64 throughout; 1e-9 of the largest score covers the S⁻¹ round trip (cond(S) ~ 1e3)
        scale = float(expected.abs().max())
        torch.testing.assert_close(got["score"], expected, rtol=0, atol=1e-9 * scale)
        assert float(got["score"].sum()) == pytest.approx(-float((G * W).sum()), rel=1e-9)


def test_first_order_sign_convention():
    """Removing a component along +G raises the loss (ΔL > 0); along −G lowers it (ΔL < 0)."""
    u = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    W = 3.0 * torch.outer(u, v) + 0.5 * torch.outer(torch.tensor([0.0, 1.0], dtype=torch.float64),
                                                     torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    sigma, d = first_order_delta(W, None, -torch.outer(u, v))  # G = −u vᵀ: the loss falls along +u vᵀ
    assert sigma.tolist() == [3.0, 0.5]
    # removing σ₀ u vᵀ moves against the descent direction: ΔL = −σ₀ (uᵀ G v) = +3
    assert d.tolist() == [3.0, 0.0]
    _, d = first_order_delta(W, None, torch.outer(u, v))
    assert d.tolist() == [-3.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# first-order ΔL: finite differences of the real calibration loss


@pytest.fixture(scope="module")
def fd_setup(_llama_base):
    """A float64 copy of the tiny LLaMA, its input Grams, gradients and first-order scores (input_gram space)."""
    model = copy.deepcopy(_llama_base).double()
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1234))
    targets = find_targets(model)
    grams = {"input_gram": collect_input_grams(model, windows, 4, torch.device("cpu"), targets)}
    grads = calibration_gradients(model, windows, 2, "cpu", targets)
    scores = score_targets(model, targets, "first_order", "input_gram", grams, 1e-6, "cpu", grads)
    return {"model": model, "windows": windows, "grams": grams, "grads": grads, "scores": scores}


# Components are taken from the smallest-σ quarter of each target, keeping those with |ΔL| >= MIN_DELTA.
# The floor is needed because HF's LlamaRMSNorm computes in float32 even in a float64 model: loss differences
# carry rounding noise of ~1e-9 (measured: std 1.3e-9, max 3e-9 over 41 tiny perturbations of one weight). At
# t = 0.1 that is <= 3e-9 / (0.1 · 1e-5) = 0.3 % of ΔL; the q/k projections of a random model have tail
# |ΔL| ~ 1e-11, pure noise for a finite difference, so they are not used.
FD_TARGETS = ("model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.gate_proj",
              "model.layers.1.mlp.up_proj")
MIN_DELTA = 1e-5
PER_TARGET = 3
# The forward difference D(t) = (L(W + tΔW_i) − L(W))/t misses ΔL_i by the curvature term t·c_i/2 (+ noise/t).
# t = 1 is the actual removal of component i; t = 0.1 is closer to the derivative. Measured on these 12
# components: |D(1)/ΔL − 1| <= 4.1e-2 and |D(0.1)/ΔL − 1| <= 4.3e-3. Tolerances: 10 % at t = 1 and 1 % at
# t = 0.1 (>= 2.3x margin each). Where the curvature term dominates (the v_proj components) the error falls
# ~10x from t = 1 to t = 0.1, as an O(t) remainder must; the test requires at least 5x on the worst one.
FD_RTOL = {1.0: 0.10, 0.1: 0.01}
FD_SHRINK = 0.2


def test_first_order_matches_finite_differences(fd_setup):
    model, windows, grams, scores = fd_setup["model"], fd_setup["windows"], fd_setup["grams"], fd_setup["scores"]
    L0 = calibration_loss(model, windows, 4)
    assert L0 == pytest.approx(fd_setup["grads"].loss, rel=1e-12)
    checked = []
    for name in FD_TARGETS:
        mod = model.get_submodule(name)
        W = mod.weight.detach().clone()
        S = input_factor("input_gram", name, grams, 1e-6)
        _, sigma, _, dW = _components(W, S)
        d = scores[name]["score"]
        torch.testing.assert_close(scores[name]["sigma"], sigma, rtol=1e-10, atol=0)
        r = len(sigma)
        picked = [i for i in range(r - 1, r - r // 4 - 1, -1) if abs(float(d[i])) >= MIN_DELTA][:PER_TARGET]
        assert len(picked) == PER_TARGET, (name, d[r - r // 4 :])
        for i in picked:
            fd = {}
            for t in FD_RTOL:
                with torch.no_grad():
                    mod.weight.copy_(W + t * dW[i])
                fd[t] = (calibration_loss(model, windows, 4) - L0) / t
            with torch.no_grad():
                mod.weight.copy_(W)
            dl = float(d[i])
            checked.append((name, i, dl, fd))
            for t, rtol in FD_RTOL.items():
                assert fd[t] == pytest.approx(dl, rel=rtol), (name, i, t, dl, fd)
                assert (fd[t] > 0) == (dl > 0), (name, i, t, dl, fd)
    # both signs were exercised, and the weights are restored
    assert {dl > 0 for _, _, dl, _ in checked} == {True, False}
    # D(t) -> ΔL as t -> 0: on the component with the largest error at t = 1, the error shrinks like t
    _, _, dl, fd = max(checked, key=lambda c: abs(c[3][1.0] / c[2] - 1))
    assert abs(fd[0.1] - dl) <= FD_SHRINK * abs(fd[1.0] - dl), (dl, fd)
    assert calibration_loss(model, windows, 4) == L0
    # the check has teeth: the unwhitened formula −σ_i u_iᵀ G v_i (forgetting S^{-T}) misses the finite
    # differences by far more than the 1 % tolerance on these very components
    worst = 0.0
    for name, i, dl, fd in checked:
        W = model.get_submodule(name).weight.detach()
        S = input_factor("input_gram", name, grams, 1e-6)
        U, sigma, Vh = torch.linalg.svd(W @ S, full_matrices=False)
        wrong = float(-sigma[i] * (U[:, i] @ fd_setup["grads"].G[name] @ Vh[i]))
        worst = max(worst, abs(wrong / fd[0.1] - 1))
    assert worst > 0.5

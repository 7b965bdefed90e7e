"""lowrank.whitening: damped Cholesky factors of second moments, fallbacks, whitening round trips."""

from __future__ import annotations

import pytest
import torch

from lowrank.whitening import WhiteningFactor, unwhiten_right, whiten, whitening_factor

F64_RTOL = 1e-12  # float64 reconstruction, relative to the scale of C


def _gram(n_tokens: int, n: int, seed: int = 0, scales: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_tokens, n, generator=g, dtype=torch.float64)
    if scales is not None:
        X = X * scales
    return X.T @ X / n_tokens


def _assert_lower(S: torch.Tensor) -> None:
    assert torch.equal(S, torch.tril(S)), "S must be exactly lower triangular"


def test_cholesky_reconstructs_damped_second_moment():
    n = 24
    C = _gram(200, n, scales=torch.logspace(-1, 1, n, dtype=torch.float64))
    damping = 1e-3
    wf = whitening_factor(C, damping=damping)
    assert isinstance(wf, WhiteningFactor)
    assert wf.method == "cholesky"
    assert wf.S.dtype == torch.float64 and wf.S.shape == (n, n)
    scale = float(torch.trace(C)) / n
    assert wf.epsilon == pytest.approx(damping * scale, rel=1e-12)
    _assert_lower(wf.S)
    target = C + wf.epsilon * torch.eye(n, dtype=torch.float64)
    err = (wf.S @ wf.S.T - target).abs().max()
    assert err <= F64_RTOL * float(C.abs().max())
    assert (torch.diagonal(wf.S) > 0).all()


def test_float32_input_is_factored_in_float64():
    C = _gram(100, 16).to(torch.float32)
    wf = whitening_factor(C)
    assert wf.S.dtype == torch.float64
    target = C.double() + wf.epsilon * torch.eye(16, dtype=torch.float64)
    assert (wf.S @ wf.S.T - target).abs().max() <= F64_RTOL * float(C.abs().max())


def test_damping_is_relative_to_scale():
    """ε = damping · tr(C)/n: scaling C by 1e6 scales ε by 1e6 and S by 1e3."""
    C = _gram(100, 12, seed=3)
    a = whitening_factor(C, damping=1e-4)
    b = whitening_factor(C * 1e6, damping=1e-4)
    assert b.epsilon == pytest.approx(a.epsilon * 1e6, rel=1e-12)
    torch.testing.assert_close(b.S, a.S * 1e3, rtol=1e-10, atol=0)


def test_jitter_ladder_takes_next_rung():
    """An indefinite C with λ_min = −3e-6·scale fails at ε = 1e-6·scale and factors at the 1e-5 rung."""
    n = 10
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    evals = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
    evals[0] = -3e-6  # relative to scale ≈ 1
    C = (Q * evals) @ Q.T
    C = 0.5 * (C + C.T)
    scale = float(torch.trace(C)) / n
    wf = whitening_factor(C, damping=1e-6, ladder=4)
    assert wf.method == "jitter"
    assert wf.epsilon == pytest.approx(1e-5 * scale, rel=1e-12)
    _assert_lower(wf.S)
    target = C + wf.epsilon * torch.eye(n, dtype=torch.float64)
    assert (wf.S @ wf.S.T - target).abs().max() <= 1e-12


def _check_eig_clamp(C: torch.Tensor, wf: WhiteningFactor, eig_floor: float) -> None:
    n = C.shape[0]
    assert wf.method != "cholesky"
    assert wf.method == "eig_clamp"
    _assert_lower(wf.S)
    assert torch.isfinite(wf.S).all()
    assert (torch.diagonal(wf.S) > 0).all()
    evals = torch.linalg.eigvalsh(C)
    floor = eig_floor * float(evals.max())
    assert wf.epsilon == pytest.approx(floor, rel=1e-9)
    SS = wf.S @ wf.S.T
    # S Sᵀ is C with its eigenvalues raised to the floor: PD, and within `floor` of C in spectral norm
    assert float(torch.linalg.eigvalsh(SS).min()) >= floor * (1 - 1e-6)
    assert float(torch.linalg.matrix_norm(SS - C, ord=2)) <= floor * (1 + 1e-6) + 1e-12 * float(evals.max())
    # and the factor is usable for triangular solves (the whole point of keeping it triangular)
    W = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(unwhiten_right(whiten(W, wf.S), wf.S), W, rtol=1e-6, atol=1e-8)


def test_fewer_tokens_than_dims_takes_fallback():
    n = 32
    C = _gram(8, n, seed=1)  # rank 8 < 32: singular, not PD without damping
    assert int(torch.linalg.matrix_rank(C)) == 8
    wf = whitening_factor(C, damping=0.0, eig_floor=1e-6)
    _check_eig_clamp(C, wf, 1e-6)


def test_zero_channel_takes_fallback():
    n = 16
    C = _gram(100, n, seed=2)
    C[5, :] = 0.0
    C[:, 5] = 0.0  # a dead input channel
    wf = whitening_factor(C, damping=0.0, eig_floor=1e-4)
    _check_eig_clamp(C, wf, 1e-4)


def test_strongly_indefinite_takes_fallback_even_with_damping():
    n = 8
    C = torch.eye(n, dtype=torch.float64)
    C[0, 0] = -1.0  # far beyond what the ladder's damping can repair
    wf = whitening_factor(C, damping=1e-6, ladder=4, eig_floor=1e-3)
    assert wf.method == "eig_clamp"
    _assert_lower(wf.S)
    assert torch.isfinite(wf.S).all()
    # negative eigenvalues are raised to the floor (not reflected): S Sᵀ = diag(floor, 1, ..., 1)
    floor = 1e-3 * 1.0  # eig_floor · λ_max
    assert wf.epsilon == pytest.approx(floor, rel=1e-12)
    expected = torch.eye(n, dtype=torch.float64)
    expected[0, 0] = floor
    assert (wf.S @ wf.S.T - expected).abs().max() <= 1e-12


def test_rank_deficient_with_damping_is_exactly_damped():
    """With ε > 0 a PSD singular C is PD after damping: plain Cholesky of C + εI, no clamp."""
    n = 32
    C = _gram(8, n, seed=1)
    wf = whitening_factor(C, damping=1e-2)
    assert wf.method in ("cholesky", "jitter")
    target = C + wf.epsilon * torch.eye(n, dtype=torch.float64)
    assert (wf.S @ wf.S.T - target).abs().max() <= 1e-12 * float(C.abs().max())


def test_unwhiten_inverts_whiten():
    n, m = 20, 12
    C = _gram(300, n, scales=torch.logspace(-1, 1, n, dtype=torch.float64))
    S = whitening_factor(C, damping=1e-4).S
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(7))  # float32 weight
    WS = whiten(W, S)
    assert WS.dtype == torch.float64
    torch.testing.assert_close(WS, W.double() @ S, rtol=0, atol=1e-12)
    back = unwhiten_right(WS, S)
    torch.testing.assert_close(back, W.double(), rtol=0, atol=1e-10)
    # and unwhiten_right(Y) solves X S = Y for an arbitrary Y
    Y = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(unwhiten_right(Y, S) @ S, Y, rtol=0, atol=1e-10)


@pytest.mark.parametrize("bad", [torch.zeros(3, 4), torch.zeros(4), torch.zeros(2, 3, 3)])
def test_non_square_rejected(bad):
    with pytest.raises(ValueError, match="square"):
        whitening_factor(bad)


def test_negative_damping_rejected():
    with pytest.raises(ValueError, match="damping"):
        whitening_factor(torch.eye(4), damping=-1e-6)


def test_non_finite_rejected():
    C = torch.eye(4, dtype=torch.float64)
    C[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        whitening_factor(C)

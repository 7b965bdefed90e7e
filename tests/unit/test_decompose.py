"""lowrank.decompose: the eigh-of-the-smaller-Gram route equals LAPACK's SVD within stated tolerances.

Tolerances (float64, ε = 2.2e-16): |σ_i(eigh) − σ_i(svd)| ≤ 100·ε·σ₁²/σ_i (the Gram squares the condition
number); singular vectors of components with σ_i ≥ 1e-2·σ₁ agree entrywise to 1e-10, all others to 1e-6, after
the shared sign convention; the reconstruction ‖B − UΣVᵀ‖_F ≤ 1e-6·‖B‖_F
even for rank-deficient B (whose zero singular values come out ≤ 1e-7·σ₁, :data:`lowrank.decompose.RCOND`);
rank-k truncations and first-order scores agree to 1e-8 relative.
"""

from __future__ import annotations

import pytest
import torch

from lowrank.decompose import RCOND, singular_values, thin_svd, thin_svd_many
from lowrank.model import find_targets, linear_weight
from lowrank.scoring import first_order_delta, score_targets
from lowrank.truncation import truncate, truncate_model


def _spectrum_matrix(m: int, n: int, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return (U * sigma) @ V.T


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_eigh_matches_svd_full_rank(shape):
    m, n = shape
    r = min(m, n)
    sigma = torch.logspace(0, -4, r, dtype=torch.float64)  # distinct, condition 1e4
    B = _spectrum_matrix(m, n, sigma, seed=m + n)
    a, b = thin_svd(B, "svd"), thin_svd(B, "eigh")
    assert a.U.shape == b.U.shape == (m, r) and a.Vh.shape == b.Vh.shape == (r, n)
    eps = torch.finfo(torch.float64).eps
    bound = 100 * eps * a.S[0] ** 2 / a.S
    assert bool(((b.S - a.S).abs() <= bound).all())
    assert bool(((b.S - sigma).abs() <= bound).all())
    big = a.S >= 1e-2 * a.S[0]
    torch.testing.assert_close(b.U[:, big], a.U[:, big], rtol=0, atol=1e-10)
    torch.testing.assert_close(b.Vh[big], a.Vh[big], rtol=0, atol=1e-10)
    torch.testing.assert_close(b.U, a.U, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.Vh, a.Vh, rtol=0, atol=1e-6)
    assert float((b.U.T @ b.U - torch.eye(r, dtype=torch.float64)).abs().max()) < 1e-6
    assert bool(((singular_values(B, "eigh") - a.S).abs() <= bound).all())


@pytest.mark.parametrize("shape", [(20, 36), (36, 20)])
def test_eigh_rank_deficient(shape):
    m, n = shape
    r = min(m, n)
    sigma = torch.cat([torch.linspace(3, 1, 12, dtype=torch.float64), torch.zeros(r - 12, dtype=torch.float64)])
    B = _spectrum_matrix(m, n, sigma, seed=5)
    a, b = thin_svd(B, "svd"), thin_svd(B, "eigh")
    torch.testing.assert_close(b.S[:12], a.S[:12], rtol=1e-10, atol=0)
    assert float(b.S[12:].max()) <= RCOND * float(b.S[0])  # the zeros come out as noise below rcond·σ₁
    assert float(a.S[12:].max()) < 1e-12  # LAPACK resolves them to round-off: the documented difference
    recon = (b.U * b.S) @ b.Vh
    assert float((recon - B).norm()) <= 1e-6 * float(B.norm())
    for k in (5, 12):  # truncations inside the numerical rank are identical
        ta, tb = truncate(B, k, method="svd"), truncate(B, k, method="eigh")
        torch.testing.assert_close(tb.A @ tb.B, ta.A @ ta.B, rtol=0, atol=1e-8 * float(B.abs().max()))
    # derived vectors of the null components are unit vectors (or zero), never blown up by 1/σ
    derived = b.Vh if m <= n else b.U.T
    norms = derived.norm(dim=1)
    assert bool(((norms - 1).abs() < 1e-6).logical_or(norms == 0).all())


def test_batched_equals_one_by_one_and_keeps_order():
    g = torch.Generator().manual_seed(0)
    Bs = [torch.randn(8, 12, generator=g, dtype=torch.float64) for _ in range(3)] + \
         [torch.randn(12, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    Bs = [Bs[0], Bs[3], Bs[1], Bs[4], Bs[2]]
    for method in ("svd", "eigh"):
        many = thin_svd_many(Bs, method)
        for B, d in zip(Bs, many):
            one = thin_svd(B, method)
            torch.testing.assert_close(d.S, one.S, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close((d.U * d.S) @ d.Vh, B, rtol=0, atol=1e-10)


def test_bad_method_is_named():
    with pytest.raises(ValueError, match="decomposition.method"):
        thin_svd(torch.eye(3), "qr")


def test_first_order_scores_and_truncation_agree_on_a_model(tiny_llama, cpu):
    from lowrank.calibration import collect_input_grams
    from lowrank.gradients import calibration_gradients

    w = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    grams = collect_input_grams(tiny_llama, w, 2, cpu)
    grads = calibration_gradients(tiny_llama, w, 2)
    targets = find_targets(tiny_llama)
    stats = {"input_gram": grams}
    a = score_targets(tiny_llama, targets, "first_order", "input_gram", stats, gradients=grads)
    b = score_targets(tiny_llama, targets, "first_order", "input_gram", stats, gradients=grads,
                      decomposition="eigh")
    for name in a:
        torch.testing.assert_close(b[name]["sigma"], a[name]["sigma"], rtol=0,
                                   atol=1e-9 * float(a[name]["sigma"][0]))
        scale = float(a[name]["score"].abs().max())
        torch.testing.assert_close(b[name]["score"], a[name]["score"], rtol=0, atol=1e-8 * scale)
    W = linear_weight(tiny_llama.get_submodule(targets[0].name)).detach()
    sa, la = first_order_delta(W, None, grads.G[targets[0].name])
    sb, lb = first_order_delta(W, None, grads.G[targets[0].name], "eigh")
    torch.testing.assert_close(lb, la, rtol=0, atol=1e-8 * float(la.abs().max()))
    ranks = {t.name: 5 for t in targets}
    import copy

    m2 = copy.deepcopy(tiny_llama)
    ra = truncate_model(tiny_llama, targets, ranks, "input_gram", stats)
    rb = truncate_model(m2, targets, ranks, "input_gram", stats, decomposition="eigh")
    for t in targets:
        assert rb[t.name]["relative_error"] == pytest.approx(ra[t.name]["relative_error"], rel=1e-8)
        wa = tiny_llama.get_submodule(t.name).weight.detach()
        wb = m2.get_submodule(t.name).weight.detach()
        torch.testing.assert_close(wb, wa, rtol=0, atol=1e-5 * float(wa.abs().max()))


def test_eigh32_keeps_the_leading_components():
    """float32 eigh of the float64 Gram: σ_i within 1e-6·σ₁²/σ_i, leading vectors to 1e-4, truncations to 1e-4."""
    sigma = torch.logspace(0, -2, 30, dtype=torch.float64)
    B = _spectrum_matrix(30, 50, sigma, seed=9)
    a, b = thin_svd(B, "svd"), thin_svd(B, "eigh32")
    assert bool(((b.S - a.S).abs() <= 1e-6 * a.S[0] ** 2 / a.S).all())
    big = a.S >= 0.3 * a.S[0]
    torch.testing.assert_close(b.U[:, big], a.U[:, big], rtol=0, atol=1e-4)
    ta, tb = truncate(B, 10, method="svd"), truncate(B, 10, method="eigh32")
    torch.testing.assert_close(tb.A @ tb.B, ta.A @ ta.B, rtol=0, atol=1e-4 * float(B.abs().max()))
    assert bool(((singular_values(B, "eigh32") - a.S).abs() <= 1e-6 * a.S[0] ** 2 / a.S).all())

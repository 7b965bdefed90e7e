"""One stored thin SVD per model and space, cut at any rank: the factors of decomposing in every job.

lowrank.truncation.decompose_targets + lowrank.decompose.save_decompositions / StoredDecompositions, read by
truncate_model, truncate_blocks (resumable truncation) and quantize_model (the pipeline's rule decompose)."""

from __future__ import annotations

import copy

import pytest
import torch

from lowrank.calibration import collect_input_grams
from lowrank.decompose import StoredDecompositions, ThinSVD, save_decompositions
from lowrank.model import find_targets, linear_weight
from lowrank.quantization import allocate_bytes, quantize_model
from lowrank.resume import truncate_blocks
from lowrank.spaces import bind, input_factor
from lowrank.truncation import (decompose_targets, factors_from_directions, truncate, truncate_model,
                                unwhitened_directions, whitened_svd)


def _stats(model, windows):
    return {"input_gram": collect_input_grams(model, windows, 4, torch.device("cpu"), find_targets(model))}


def _weights(model):
    return {t.name: linear_weight(model.get_submodule(t.name)).detach().clone() for t in find_targets(model)}


@pytest.mark.parametrize("k", [1, 7, 32])
def test_factors_cut_from_stored_directions_equal_truncate(k):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 48, generator=g, dtype=torch.float64)
    X = torch.randn(256, 48, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 48, dtype=torch.float64)
    S = torch.linalg.cholesky(X.T @ X / 256)
    T = torch.linalg.cholesky(torch.eye(32, dtype=torch.float64) + 0.1 * torch.ones(32, 32, dtype=torch.float64))
    for s_, t_ in ((None, None), (S, None), (S, T)):
        d = unwhitened_directions(whitened_svd(W, s_, t_), s_, t_)
        torch.testing.assert_close(d.U * d.S @ d.Vh, W, rtol=0, atol=1e-11)  # W = P_out Σ P_inᵀ
        f, g_ = truncate(W, k, s_, t_), factors_from_directions(d, k)
        torch.testing.assert_close(g_.A, f.A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g_.B, f.B, rtol=1e-12, atol=1e-14)
        assert torch.equal(f.sigma, g_.sigma)
    # the rank-k error in the two-sided metric is the discarded spectrum
    svd = whitened_svd(W, S, T)
    f = factors_from_directions(unwhitened_directions(svd, S, T), k)
    err = torch.linalg.matrix_norm(T.T @ (W - f.A @ f.B) @ S) ** 2
    assert float(err) == pytest.approx(float((svd.S[k:] ** 2).sum()), rel=1e-9, abs=1e-18)


def test_float32_directions_cost_the_factors_one_float32_rounding():
    """Stored in float32, unwhitened directions give factors within float32 rounding of the float64 ones even when
    S is ill-conditioned (whitened vectors rounded before the S⁻¹ solve would be off by cond(S) times more)."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 48, generator=g, dtype=torch.float64)
    X = torch.randn(512, 48, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, 48, dtype=torch.float64)
    S = torch.linalg.cholesky(X.T @ X / 512)
    d = unwhitened_directions(whitened_svd(W, S), S)
    f64 = factors_from_directions(d, 16)
    f32 = factors_from_directions(ThinSVD(d.U.float(), d.S, d.Vh.float()), 16)
    for a, b in ((f32.A, f64.A), (f32.B, f64.B)):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-6


def test_a_decomposition_of_another_shape_is_refused():
    W = torch.randn(8, 12, dtype=torch.float64)
    other = unwhitened_directions(whitened_svd(torch.randn(12, 8, dtype=torch.float64)))
    with pytest.raises(ValueError, match="8x12.*another model"):
        truncate(W, 4, directions=other)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 8\]"):
        factors_from_directions(unwhitened_directions(whitened_svd(W)), 9)


def test_stored_decompositions_round_trip_and_read_lazily(tmp_path, tiny_llama, token_windows):
    stats = _stats(tiny_llama, token_windows)
    targets = find_targets(tiny_llama)
    directions = decompose_targets(tiny_llama, targets, "input_gram", stats, 1e-6)
    assert set(directions) == {t.name for t in targets}
    for t in targets:  # the components of W S, unwhitened: P_out Σ P_inᵀ = W, P_inᵀ S = Vᵀ orthonormal rows
        S = input_factor("input_gram", t.name, stats, 1e-6, "cpu")
        U, s, Vh = directions[t.name]
        W = linear_weight(tiny_llama.get_submodule(t.name)).double()
        torch.testing.assert_close(U * s @ Vh, W, rtol=0, atol=1e-8)
        V = Vh @ S
        torch.testing.assert_close(V @ V.T, torch.eye(V.shape[0], dtype=torch.float64), rtol=0, atol=1e-8)
    path = tmp_path / "d.safetensors"
    save_decompositions(path, directions, {"whitening": "input_gram"})
    back = StoredDecompositions(path)
    assert back.metadata["whitening"] == "input_gram" and len(back) == len(directions)
    assert set(back) == set(directions)
    name = targets[3].name
    assert name in back and "model.nothing" not in back
    U, s, Vh = back[name]  # U, Vᵀ in float32 (the factors' precision), σ exact
    assert U.dtype == Vh.dtype == torch.float32 and torch.equal(s, directions[name].S)
    assert torch.equal(U, directions[name].U.float()) and torch.equal(Vh, directions[name].Vh.float())
    save_decompositions(path, directions, {}, dtype=torch.float64)  # full precision on request
    assert all(torch.equal(a, b) for a, b in zip(StoredDecompositions(path)[name], directions[name]))
    with pytest.raises(KeyError):
        back["model.nothing"]


def test_truncation_from_the_stored_file_equals_decomposing_in_the_job(tmp_path, tiny_llama, token_windows):
    """The pipeline's two paths (decomposition.share true / false): the same factors to the last bit from a float64
    file, to float32 rounding from the default float32 one (the precision the factors are stored in)."""
    stats = _stats(tiny_llama, token_windows)
    targets = find_targets(tiny_llama)
    path = tmp_path / "d.safetensors"
    directions = decompose_targets(tiny_llama, targets, "input_gram", stats, 1e-6)
    save_decompositions(path, directions, {}, dtype=torch.float64)
    save_decompositions(tmp_path / "d32.safetensors", directions, {})
    ranks = {t.name: (None if i == 0 else 3 + i % 5) for i, t in enumerate(targets)}
    a, b, c = (copy.deepcopy(tiny_llama) for _ in range(3))
    rep_a = truncate_model(a, targets, ranks, "input_gram", stats, 1e-6)
    rep_b = truncate_model(b, targets, ranks, "input_gram", stats, 1e-6, directions=StoredDecompositions(path))
    rep_c = truncate_blocks(c, targets, ranks, "input_gram", stats, 1e-6, "cpu", tmp_path / "parts",
                            directions=StoredDecompositions(path))
    assert rep_a == rep_b == rep_c
    for x, y in ((a, b), (a, c)):
        for k, v in x.state_dict().items():
            assert torch.equal(v, y.state_dict()[k]), k
    d = copy.deepcopy(tiny_llama)
    assert truncate_model(d, targets, ranks, "input_gram", stats, 1e-6,
                          directions=StoredDecompositions(tmp_path / "d32.safetensors")).keys() == rep_a.keys()
    for k, v in a.state_dict().items():
        w = d.state_dict()[k]
        assert torch.equal(v, w) if "weight" not in k or v.ndim < 2 else (v - w).abs().max() <= 1e-5 * v.abs().max()


@pytest.mark.parametrize("mode", ["remap", "loss_aware"])
def test_quantize_from_the_stored_file_equals_decomposing_in_the_job(tmp_path, tiny_llama, token_windows, mode):
    stats = _stats(tiny_llama, token_windows)
    targets = find_targets(tiny_llama)
    path = tmp_path / "d.safetensors"
    save_decompositions(path, decompose_targets(tiny_llama, targets, "input_gram", stats, 1e-6), {},
                        dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    scores = {t.name: torch.randn(t.shape.full_rank, generator=g, dtype=torch.float64) for t in targets}
    grads_of = None
    if mode == "loss_aware":
        from lowrank.gradients import calibration_gradients
        grads_of = (lambda m: calibration_gradients(m, token_windows[:2], 2, "cpu", targets))

    space = bind("input_gram", stats, 1e-6)

    a, b = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    ranks = allocate_bytes(mode, {t.name: t.shape for t in targets}, 0.5, scores).ranks
    ra = quantize_model(a, targets, mode, 0.5, ranks, space, grads_of)
    rb = quantize_model(b, targets, mode, 0.5, ranks, space, grads_of, directions=StoredDecompositions(path))
    assert ra.layouts == rb.layouts and ra.accounted_bytes == rb.accounted_bytes
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # the dense weights were not what the file decomposed: a file of another model is refused by shape
    bad = {t.name: unwhitened_directions(whitened_svd(torch.randn(3, 5, dtype=torch.float64))) for t in targets}
    with pytest.raises(ValueError, match="another model"):
        quantize_model(copy.deepcopy(tiny_llama), targets, mode, 0.5, ranks, space, grads_of,
                       directions=bad)

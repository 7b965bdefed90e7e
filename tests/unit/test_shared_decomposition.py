"""One stored thin SVD per model and space, cut at any rank: the same factors as decomposing in every job.

lowrank.truncation.decompose_targets + lowrank.decompose.save_decompositions / StoredDecompositions, read by
truncate_model, truncate_blocks (resumable truncation) and quantize_model (the pipeline's rule decompose)."""

from __future__ import annotations

import copy

import pytest
import torch

from lowrank.calibration import collect_input_grams
from lowrank.decompose import StoredDecompositions, ThinSVD, save_decompositions
from lowrank.model import find_targets, linear_weight
from lowrank.quantization import quantize_model
from lowrank.resume import truncate_blocks
from lowrank.spaces import input_factor
from lowrank.truncation import decompose_targets, factors_from_svd, truncate, truncate_model, whitened_svd


def _stats(model, windows):
    return {"input_gram": collect_input_grams(model, windows, 4, torch.device("cpu"), find_targets(model))}


def _weights(model):
    return {t.name: linear_weight(model.get_submodule(t.name)).detach().clone() for t in find_targets(model)}


@pytest.mark.parametrize("k", [1, 7, 32])
def test_factors_cut_from_a_whitened_svd_equal_truncate(k):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 48, generator=g, dtype=torch.float64)
    X = torch.randn(256, 48, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 48, dtype=torch.float64)
    S = torch.linalg.cholesky(X.T @ X / 256)
    T = torch.linalg.cholesky(torch.eye(32, dtype=torch.float64) + 0.1 * torch.ones(32, 32, dtype=torch.float64))
    svd = whitened_svd(W, S, T)
    for s_, t_ in ((None, None), (S, None), (S, T)):
        f = truncate(W, k, s_, t_)
        g_ = factors_from_svd(whitened_svd(W, s_, t_), k, s_, t_)
        assert torch.equal(f.A, g_.A) and torch.equal(f.B, g_.B) and torch.equal(f.sigma, g_.sigma)
    # and the rank-k error in the two-sided metric is the discarded spectrum
    f = factors_from_svd(svd, k, S, T)
    err = torch.linalg.matrix_norm(T.T @ (W - f.A @ f.B) @ S) ** 2
    assert float(err) == pytest.approx(float((svd.S[k:] ** 2).sum()), rel=1e-9, abs=1e-18)


def test_a_decomposition_of_another_shape_is_refused():
    W = torch.randn(8, 12, dtype=torch.float64)
    other = whitened_svd(torch.randn(12, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="8x12.*another model"):
        truncate(W, 4, svd=other)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 8\]"):
        factors_from_svd(whitened_svd(W), 9)


def test_stored_decompositions_round_trip_and_read_lazily(tmp_path, tiny_llama, token_windows):
    stats = _stats(tiny_llama, token_windows)
    targets = find_targets(tiny_llama)
    svds = decompose_targets(tiny_llama, targets, "input_gram", stats, 1e-6)
    assert set(svds) == {t.name for t in targets}
    for t in targets:  # the SVD of W S itself (U Σ Vᵀ reproduces it)
        S = input_factor("input_gram", t.name, stats, 1e-6, "cpu")
        U, s, Vh = svds[t.name]
        W = linear_weight(tiny_llama.get_submodule(t.name)).double()
        torch.testing.assert_close(U * s @ Vh, W @ S, rtol=0, atol=1e-10)
    path = tmp_path / "d.safetensors"
    save_decompositions(path, svds, {"whitening": "input_gram"})
    back = StoredDecompositions(path)
    assert back.metadata["whitening"] == "input_gram" and len(back) == len(svds) and set(back) == set(svds)
    name = targets[3].name
    assert name in back and "model.nothing" not in back
    assert all(torch.equal(a, b) and a.dtype == torch.float64 for a, b in zip(back[name], svds[name]))
    with pytest.raises(KeyError):
        back["model.nothing"]


def test_truncation_from_the_stored_file_equals_decomposing_in_the_job(tmp_path, tiny_llama, token_windows):
    """The pipeline's two paths (decomposition.share true / false) give the same factors to the last bit."""
    stats = _stats(tiny_llama, token_windows)
    targets = find_targets(tiny_llama)
    path = tmp_path / "d.safetensors"
    save_decompositions(path, decompose_targets(tiny_llama, targets, "input_gram", stats, 1e-6), {})
    ranks = {t.name: (None if i == 0 else 3 + i % 5) for i, t in enumerate(targets)}
    a, b, c = (copy.deepcopy(tiny_llama) for _ in range(3))
    rep_a = truncate_model(a, targets, ranks, "input_gram", stats, 1e-6)
    rep_b = truncate_model(b, targets, ranks, "input_gram", stats, 1e-6, svds=StoredDecompositions(path))
    rep_c = truncate_blocks(c, targets, ranks, "input_gram", stats, 1e-6, "cpu", tmp_path / "parts",
                            svds=StoredDecompositions(path))
    assert rep_a == rep_b == rep_c
    for x, y in ((a, b), (a, c)):
        for k, v in x.state_dict().items():
            assert torch.equal(v, y.state_dict()[k]), k


@pytest.mark.parametrize("mode", ["remap", "loss_aware"])
def test_quantize_from_the_stored_file_equals_decomposing_in_the_job(tmp_path, tiny_llama, token_windows, mode):
    stats = _stats(tiny_llama, token_windows)
    targets = find_targets(tiny_llama)
    path = tmp_path / "d.safetensors"
    save_decompositions(path, decompose_targets(tiny_llama, targets, "input_gram", stats, 1e-6), {})
    g = torch.Generator().manual_seed(0)
    scores = {t.name: torch.randn(t.shape.full_rank, generator=g, dtype=torch.float64) for t in targets}
    grads_of = None
    if mode == "loss_aware":
        from lowrank.gradients import calibration_gradients
        grads_of = (lambda m: calibration_gradients(m, token_windows[:2], 2, "cpu", targets))

    def factor_of(n):
        return input_factor("input_gram", n, stats, 1e-6, "cpu"), None

    a, b = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    ra = quantize_model(a, targets, mode, 0.5, scores, factor_of, "zero_sum", 0.0, grads_of)
    rb = quantize_model(b, targets, mode, 0.5, scores, factor_of, "zero_sum", 0.0, grads_of,
                        svds=StoredDecompositions(path))
    assert ra.layouts == rb.layouts and ra.accounted_bytes == rb.accounted_bytes
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # the dense weights were not what the file decomposed: a file of another model is refused by shape
    bad = {t.name: ThinSVD(*whitened_svd(torch.randn(3, 5, dtype=torch.float64))) for t in targets}
    with pytest.raises(ValueError, match="another model"):
        quantize_model(copy.deepcopy(tiny_llama), targets, mode, 0.5, scores, factor_of, "zero_sum", 0.0,
                       grads_of, svds=bad)

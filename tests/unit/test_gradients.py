"""lowrank.gradients: calibration-loss gradients of every target against plain autograd on HF's loss."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from lowrank.gradients import calibration_gradients, calibration_loss, causal_lm_loss
from lowrank.model import find_targets, linear_weight

GRAD_ATOL = 1e-7  # float32 forward/backward; gradients of the tiny models are ~1e-3


@pytest.fixture
def grad_windows() -> torch.Tensor:
    return torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(4))


def _reference(model, windows):
    """∂L/∂W (m×n) of HF's token-mean loss over all windows in one batch (equal lengths: one mean)."""
    targets = find_targets(model)
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad()
    loss = model(input_ids=windows, labels=windows).loss
    loss.backward()
    out = {}
    for t in targets:
        mod = model.get_submodule(t.name)
        g = mod.weight.grad
        out[t.name] = (g.T if isinstance(mod, Conv1D) else g).double().clone()  # Conv1D stores Wᵀ
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(False)
    return out, float(loss.detach())


@pytest.mark.parametrize("batch_size", [2, 5])
def test_gradients_match_autograd(tiny_llama, grad_windows, batch_size):
    for p in tiny_llama.parameters():
        p.requires_grad_(False)
    tg = calibration_gradients(tiny_llama, grad_windows, batch_size)
    ref, loss = _reference(tiny_llama, grad_windows)
    assert tg.tokens == 5 * 11
    assert tg.loss == pytest.approx(loss, rel=1e-5)
    assert set(tg.G) == set(ref)
    for name, g in ref.items():
        assert tg.G[name].dtype == torch.float64 and tg.G[name].shape == g.shape
        torch.testing.assert_close(tg.G[name], g, rtol=1e-4, atol=GRAD_ATOL)
    assert tg.fisher is None
    # requires_grad flags are restored
    assert not any(p.requires_grad for p in tiny_llama.parameters())


def test_gradients_conv1d_orientation(tiny_gpt2, grad_windows):
    tg = calibration_gradients(tiny_gpt2, grad_windows, 5)
    ref, _ = _reference(tiny_gpt2, grad_windows)
    for t in find_targets(tiny_gpt2):
        assert tg.G[t.name].shape == (t.shape.m, t.shape.n)
        torch.testing.assert_close(tg.G[t.name], ref[t.name], rtol=1e-4, atol=GRAD_ATOL)


def test_fisher_is_sum_of_squared_batch_gradients(tiny_llama, grad_windows):
    tg = calibration_gradients(tiny_llama, grad_windows, 2, fisher=True)
    name = find_targets(tiny_llama)[3].name
    w = linear_weight(tiny_llama.get_submodule(name))
    expected = torch.zeros_like(w, dtype=torch.float64)
    for s in range(0, 5, 2):
        w.requires_grad_(True)
        loss, _ = causal_lm_loss(tiny_llama, grad_windows[s : s + 2])
        (g,) = torch.autograd.grad(loss, [w])
        w.requires_grad_(False)
        expected += g.double() ** 2
    torch.testing.assert_close(tg.fisher[name], expected, rtol=1e-4, atol=1e-12)


def _per_module_reference(model, windows, batch_size):
    """``∂L/∂W`` target by target: for each module, one forward + backward per batch w.r.t. that module alone
    (what the ZS-SVD reference code does), each batch weighted by its share of the predicted tokens."""
    total = windows.shape[0] * (windows.shape[1] - 1)
    out = {}
    for t in find_targets(model):
        w = model.get_submodule(t.name).weight
        acc = torch.zeros(t.shape.m, t.shape.n, dtype=torch.float64)
        w.requires_grad_(True)
        for s in range(0, windows.shape[0], batch_size):
            loss, n_b = causal_lm_loss(model, windows[s : s + batch_size])
            (g,) = torch.autograd.grad(loss, [w])
            acc += g.double() * (n_b / total)
        w.requires_grad_(False)
        out[t.name] = acc
    return out


def test_one_backward_equals_per_module_backward(tiny_llama, grad_windows):
    """All targets from one backward per batch = one backward per (module, batch), to float64 round-off."""
    for p in tiny_llama.parameters():
        p.requires_grad_(False)
    tg = calibration_gradients(tiny_llama, grad_windows, 2)
    ref = _per_module_reference(tiny_llama, grad_windows, 2)
    assert set(tg.G) == set(ref) and len(ref) == 14
    for name, g in ref.items():
        # same forward, same backward kernels for each weight: measured 3e-16 relative (the float64 sums only)
        torch.testing.assert_close(tg.G[name], g, rtol=0, atol=1e-12 * float(g.abs().max()))


@pytest.fixture
def llama64(_llama_base):
    return copy.deepcopy(_llama_base).double()


def test_float64_model_keeps_float64_loss(llama64, grad_windows):
    """Logits of a float64 model are not rounded to float32 before the cross-entropy (finite differences of the
    loss need the precision); half-precision logits are still upcast to float32."""
    with torch.no_grad():
        loss, n = causal_lm_loss(llama64, grad_windows)
    assert loss.dtype == torch.float64 and n == 5 * 11
    # (HF's own `labels=` loss upcasts to float32 whatever the model dtype, so the reference is written out)
    with torch.no_grad():
        logits = llama64(input_ids=grad_windows).logits
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                grad_windows[:, 1:].reshape(-1))
    assert logits.dtype == ref.dtype == torch.float64
    assert float(loss) == pytest.approx(float(ref), rel=1e-14)
    bf = copy.deepcopy(llama64).to(torch.bfloat16)
    with torch.no_grad():
        assert causal_lm_loss(bf, grad_windows)[0].dtype == torch.float32


def test_token_weighting_exact_for_unequal_last_batch(llama64, grad_windows):
    """5 windows in batches of 2: batches of 22, 22 and 11 predictions. The accumulated gradient and loss are
    the all-window token mean, not the mean of the three batch means."""
    tg2 = calibration_gradients(llama64, grad_windows, 2)
    tg5 = calibration_gradients(llama64, grad_windows, 5)  # one batch: the token mean by definition
    assert tg2.tokens == tg5.tokens == 55
    assert tg2.loss == pytest.approx(tg5.loss, rel=1e-12)
    assert tg2.loss == pytest.approx(calibration_loss(llama64, grad_windows, 2), rel=1e-12)
    assert calibration_loss(llama64, grad_windows, 2) == pytest.approx(calibration_loss(llama64, grad_windows, 5),
                                                                      rel=1e-12)
    # equal-weight mean of the batch means: the mistake this guards against
    naive = {k: torch.zeros_like(v) for k, v in tg5.G.items()}
    for s in range(0, 5, 2):
        part = calibration_gradients(llama64, grad_windows[s : s + 2], 2)
        for k in naive:
            naive[k] += part.G[k] / 3
    # LlamaRMSNorm runs in float32 even in a float64 model, and its rounding depends on the batch shape: batch
    # 2 vs 5 gradients differ by ~1e-7 of max|G| (measured 9.5e-8). Tolerance 1e-6 of max|G|.
    worst_naive = 0.0
    for k, g in tg5.G.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(tg2.G[k], g, rtol=0, atol=1e-6 * scale)
        worst_naive = max(worst_naive, float((naive[k] - g).abs().max()) / scale)
    assert worst_naive > 1e-2  # the weighting matters far beyond the tolerance

"""lowrank.output_metric: IO-SVD's top-K KL output metric ``C_e``.

The metric is checked against the quantity it approximates: with one position (seq_len 1) and K = |V| the K-FAC
proxy ``½ tr(ΔWᵀ C ΔW R)`` (R = x xᵀ of that position) is the exact second-order term of the KL divergence
between the model's and the perturbed model's next-token distributions, so ``KL(p ‖ p_t) / t²`` must approach it
for a perturbation ``W + t ΔW`` of a float64 tiny LLaMA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowrank.calibration import STAT_LOADERS, STATS
from lowrank.model import find_targets, linear_weight
from lowrank.output_metric import OutputMetrics, collect_output_kl

from conftest import target_inputs


def _next_token_logp(model, window: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.log_softmax(model(input_ids=window, use_cache=False).logits.double(), dim=-1)


# q/k projections do nothing at one position (a softmax over one key); the others all change the output
@pytest.mark.parametrize("name", ["model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj",
                                  "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.gate_proj"])
def test_metric_is_the_second_order_kl_at_one_position(make_llama, name):
    model = make_llama(seed=3).double()
    window = torch.tensor([[17]])
    vocab = model.config.vocab_size
    metric = collect_output_kl(model, window, 1, torch.device("cpu"), top_k=vocab, max_windows=None)
    C = metric.for_target(name)
    assert metric.tokens == 1 and C.shape[0] == C.shape[1]
    X = target_inputs(model, window, [name])[name]
    R = X.T @ X  # N = 1
    mod = model.get_submodule(name)
    W0 = mod.weight.detach().clone()
    dW = torch.randn(W0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dW *= W0.norm() / dW.norm()
    predicted = 0.5 * float(torch.trace(dW.T @ C @ dW @ R))
    assert predicted > 0
    logp = _next_token_logp(model, window)[0, -1]
    ratios = []
    for t in (1e-2, 1e-3):
        with torch.no_grad():
            mod.weight.copy_(W0 + t * dW)
        logq = _next_token_logp(model, window)[0, -1]
        kl = float((logp.exp() * (logp - logq)).sum())
        ratios.append(kl / t**2)
    with torch.no_grad():
        mod.weight.copy_(W0)
    # the error of the quadratic term is O(t): 10x smaller t, ~10x closer; at t = 1e-3 within 1 %
    assert ratios[1] == pytest.approx(predicted, rel=1e-2)
    assert abs(ratios[1] - predicted) < abs(ratios[0] - predicted) + 1e-12 * predicted


def test_top_k_metric_is_dominated_by_the_full_one(make_llama, token_windows):
    """C_full − C_K = Σ of the dropped passes' outer products: positive semidefinite, for any sequence length."""
    model = make_llama(seed=1).double()
    w = token_windows[:2, :6]
    full = collect_output_kl(model, w, 1, torch.device("cpu"), top_k=model.config.vocab_size)
    top = collect_output_kl(model, w, 1, torch.device("cpu"), top_k=5)
    top1 = collect_output_kl(model, w, 1, torch.device("cpu"), top_k=1)
    assert top.tokens == full.tokens == 12
    for t in find_targets(model):
        C_f, C_5, C_1 = (m.for_target(t.name) for m in (full, top, top1))
        for big, small in ((C_f, C_5), (C_5, C_1)):
            ev = torch.linalg.eigvalsh(big - small)
            assert float(ev.min()) >= -1e-9 * max(float(ev.abs().max()), 1e-30)
        if "q_proj" not in t.name and "k_proj" not in t.name:
            assert float(torch.trace(C_5)) > float(torch.trace(C_1)) > 0


def test_registered_round_trip_and_factor(make_llama, token_windows, cpu):
    assert STATS["output_kl"].collect is collect_output_kl
    model = make_llama(seed=0)
    m = STATS["output_kl"].collect(model, token_windows, 4, cpu, top_k=3, max_windows=2, damping=1e-2)
    assert m.windows == 2 and m.tokens == 2 * token_windows.shape[1]
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    tensors, meta = m.to_tensors()
    back = STAT_LOADERS["output_kl"](tensors, meta)
    assert isinstance(back, OutputMetrics) and back.top_k == 3 and back.damping == 1e-2
    name = find_targets(model)[-1].name
    torch.testing.assert_close(back.for_target(name), m.for_target(name), rtol=1e-6, atol=1e-12)
    L = back.factor_for(name).S
    C = back.for_target(name)
    eps = 1e-2 * float(torch.trace(C)) / C.shape[0]
    torch.testing.assert_close(L @ L.T, C + eps * torch.eye(C.shape[0], dtype=C.dtype), rtol=1e-10, atol=1e-12)
    assert torch.equal(L, torch.tril(L))


def test_gpt2_conv1d_outputs(tiny_gpt2, token_windows, cpu):
    m = collect_output_kl(tiny_gpt2, token_windows[:1, :8], 1, cpu, top_k=2)
    for t in find_targets(tiny_gpt2):
        assert m.for_target(t.name).shape == (t.shape.m, t.shape.m)
        assert linear_weight(tiny_gpt2.get_submodule(t.name)).shape == (t.shape.m, t.shape.n)


@pytest.mark.parametrize("bad", [{"top_k": 257}, {"top_k": 0}, {"max_windows": 0}, {"damping": -1.0}])
def test_bad_options_name_the_value(make_llama, token_windows, cpu, bad):
    model = make_llama()
    with pytest.raises(ValueError, match="output_kl") as e:
        collect_output_kl(model, token_windows, 1, cpu, **bad)
    if "top_k" in bad and bad["top_k"] > 1:
        assert "256" in str(e.value) and "257" in str(e.value)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("windows_per_backward", [1, 2])
def test_streamed_metric_equals_the_whole_model_one(tiny_llama, tiny_gpt2, token_windows, cpu, arch,
                                                    windows_per_backward):
    """One block at a time (boundaries kept, K output gradients pulled back block by block): the same C."""
    model = tiny_llama if arch == "llama" else tiny_gpt2
    kw = dict(top_k=3, max_windows=3, windows_per_backward=windows_per_backward)
    whole = collect_output_kl(model, token_windows, 4, cpu, **kw)
    streamed = collect_output_kl(model, token_windows, 4, cpu, streamed=True, **kw)
    assert (streamed.tokens, streamed.windows, streamed.top_k) == (whole.tokens, whole.windows, whole.top_k)
    assert list(streamed.C) == list(whole.C)
    for n, C in whole.C.items():
        torch.testing.assert_close(streamed.C[n], C, rtol=1e-6, atol=1e-6 * float(C.abs().max()))
    assert all(p.requires_grad for p in model.parameters())  # flags restored

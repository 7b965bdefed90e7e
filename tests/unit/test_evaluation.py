"""lowrank.evaluation: perplexity against HF's own loss; parameter / byte counts of dense and factored models."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank.accounting import dense_params
from lowrank.evaluation import dense_target_params, model_size, perplexity
from lowrank.model import find_targets
from lowrank.truncation import truncate_model


@pytest.fixture
def eval_windows() -> torch.Tensor:
    return torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(21))


@pytest.mark.parametrize("batch_size", [1, 4, 6])
def test_perplexity_matches_hf_loss(tiny_llama, eval_windows, batch_size):
    res = perplexity(tiny_llama, eval_windows, batch_size=batch_size)
    # independent: HF's causal-LM loss (mean CE over the T-1 predictions of each window); equal-length windows,
    # so the mean of the per-window means is the token-weighted mean
    with torch.no_grad():
        losses = [float(tiny_llama(input_ids=w[None], labels=w[None]).loss) for w in eval_windows]
    nll = sum(losses) / len(losses)
    assert res["nll"] == pytest.approx(nll, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert res["tokens"] == 6 * 23 and res["windows"] == 6 and res["seq_len"] == 24
    assert res["nonfinite_windows"] == 0
    # a random-init model over a 256-token vocabulary is near-uniform: PPL within 20 % of 256
    assert 0.8 * 256 < res["ppl"] < 1.2 * 256


def test_perplexity_reports_non_finite(tiny_llama, eval_windows):
    with torch.no_grad():
        tiny_llama.lm_head.weight[3, 0] = float("nan")  # every logit row has a NaN
    res = perplexity(tiny_llama, eval_windows, batch_size=4)
    assert res["ppl"] == float("inf")
    assert res["nonfinite_windows"] == 6


def test_model_size_dense(tiny_llama):
    size = model_size(tiny_llama)
    total = sum(p.numel() for p in tiny_llama.parameters())
    assert size["total_params"] == total
    assert size["total_bytes"] == 4 * total
    D = sum(dense_params(t.shape) for t in find_targets(tiny_llama))
    assert size["target_params"] == D == dense_target_params(tiny_llama)
    assert D == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    assert size["target_bytes"] == 4 * D and size["n_factored"] == 0


def test_model_size_counts_tied_embeddings_once(make_llama, tiny_llama):
    tied = make_llama(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = model_size(tiny_llama)["total_params"]
    assert model_size(tied)["total_params"] == untied - 256 * 64
    # tied by storage rather than by Parameter object (two Parameters over one buffer): still counted once
    tiny_llama.lm_head.weight = torch.nn.Parameter(tiny_llama.model.embed_tokens.weight.data)
    assert sum(p.numel() for p in tiny_llama.parameters()) == untied
    size = model_size(tiny_llama)
    assert size["total_params"] == untied - 256 * 64
    assert size["total_bytes"] == 4 * (untied - 256 * 64)


def test_model_size_factored(tiny_llama):
    targets = find_targets(tiny_llama)
    ranks = {t.name: 3 + (i % 5) for i, t in enumerate(targets)}
    ranks[targets[0].name] = None  # one stays dense
    truncate_model(tiny_llama, targets, ranks, "none")
    size = model_size(tiny_llama)
    expected = sum(dense_params(t.shape) if ranks[t.name] is None else ranks[t.name] * (t.shape.m + t.shape.n)
                   for t in targets)
    assert size["target_params"] == expected
    assert size["target_bytes"] == 4 * expected
    assert size["n_factored"] == len(targets) - 1
    assert size["total_params"] == sum(p.numel() for p in tiny_llama.parameters())
    # the dense-equivalent count is unchanged by factoring
    assert dense_target_params(tiny_llama) == sum(dense_params(t.shape) for t in targets)


@pytest.mark.parametrize("batch_size", [2, 4])
def test_streamed_perplexity_equals_the_whole_model_forward(tiny_llama, eval_windows, batch_size):
    """One block at a time over the captured block inputs, then the model's own head: the same numbers."""
    whole = perplexity(tiny_llama, eval_windows, batch_size=batch_size)
    streamed = perplexity(tiny_llama, eval_windows, batch_size=batch_size, streamed=True)
    assert streamed["nll"] == pytest.approx(whole["nll"], rel=1e-6)
    assert streamed["ppl"] == pytest.approx(whole["ppl"], rel=1e-6)
    assert {k: v for k, v in streamed.items() if k not in ("nll", "ppl")} == \
        {k: v for k, v in whole.items() if k not in ("nll", "ppl")}
    assert all(p.device.type == "cpu" for p in tiny_llama.parameters())  # every block back home

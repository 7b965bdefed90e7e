"""lowrank.scoring.progressive_allocation: allocate to an intermediate kept fraction, truncate, re-score the
components still kept on the compressed model (the dense model's directions, the compressed model's gradients),
allocate again; on a float64 tiny LLaMA."""

from __future__ import annotations

import pytest
import torch

from lowrank.accounting import dense_params
from lowrank.allocation import allocate
from lowrank.calibration import collect_input_grams
from lowrank.model import find_targets, linear_weight
from lowrank.scoring import (ComponentProbe, ComponentStats, component_directions, prefix_scores,
                             progressive_allocation, stage_fractions, tail_curvature_delta)
from lowrank.spaces import input_factor
from lowrank.streaming import fused_scores, streamed_gradients

from conftest import build_llama


@pytest.fixture(scope="module")
def setup():
    model = build_llama(initializer_range=0.1).double()
    windows = torch.randint(0, model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(7))
    targets = find_targets(model)
    stats = {"input_gram": collect_input_grams(model, windows, 3, torch.device("cpu"), targets)}
    scores, _ = fused_scores(model, windows, 2, "cpu", targets, "tail_curvature", "input_gram", stats)
    return model, windows, targets, stats, {n: d["score"] for n, d in scores.items()}


def _run(setup, kept, stages, allocator="zero_sum", streamed=True):
    model, windows, targets, stats, scores = setup
    return progressive_allocation(model, targets, scores, kept, stages, allocator, "tail_curvature", "input_gram",
                                  stats, windows, 2, streamed=streamed)


def test_stage_fractions():
    assert stage_fractions(0.4, [0.6, 0.8, 0.4, 1.0, 0.3, 0.6]) == [0.8, 0.6]
    assert stage_fractions(0.8, [0.6]) == []


def test_prefix_scores_read_only_the_kept_components():
    g = torch.randn(5, 6, dtype=torch.float64)
    sigma = torch.linspace(3, 0.5, 6, dtype=torch.float64)
    c = ComponentStats(sigma, g, g.square(), g.square(), 15)
    s = prefix_scores("tail_curvature", c, 4)
    assert torch.equal(s[:4], tail_curvature_delta(sigma[:4], g[:, :4], 15))
    assert torch.equal(s[4:], torch.zeros(2, dtype=torch.float64))
    g2 = g.clone()
    g2[:, 4:] = 100.0  # the removed components' statistics are never read
    assert torch.equal(prefix_scores("tail_curvature", ComponentStats(sigma, g2, g2.square(), None, 15), 4), s)


def test_fixed_directions_on_the_dense_model_equal_the_probe(setup):
    model, windows, targets, stats, _ = setup
    plain = ComponentProbe(model, "input_gram", stats, per_window=True)
    streamed_gradients(model, windows, 2, "cpu", targets, probe=plain, need_G=False)
    dirs = {t.name: component_directions(linear_weight(model.get_submodule(t.name)).detach(),
                                         input_factor("input_gram", t.name, stats, 1e-6), None) for t in targets}
    fixed = ComponentProbe(model, "input_gram", stats, per_window=True, directions=dirs)
    streamed_gradients(model, windows, 2, "cpu", targets, probe=fixed, need_G=False)
    for t in targets:
        torch.testing.assert_close(fixed.result[t.name].g, plain.result[t.name].g, rtol=1e-10, atol=1e-14)


def test_no_stage_between_is_one_shot(setup):
    model, _, targets, _, scores = setup
    shapes = {t.name: t.shape for t in targets}
    alloc, trace = _run(setup, 0.5, [0.5, 0.3])
    assert alloc.ranks == allocate("zero_sum", shapes, 0.5, scores).ranks
    assert trace == [{"kept_fraction": 0.5, "rescored": False}]


def test_two_stages_budget_nesting_and_restored_weights(setup):
    model, _, targets, _, scores = setup
    shapes = {t.name: t.shape for t in targets}
    before = {t.name: linear_weight(model.get_submodule(t.name)).detach().clone() for t in targets}
    first = allocate("zero_sum", shapes, 0.7, scores).ranks
    alloc, trace = _run(setup, 0.4, [0.7])
    total = sum(dense_params(s) for s in shapes.values())
    widest = max(s.m + s.n for s in shapes.values())
    assert int(0.4 * total) - widest <= alloc.kept_params <= int(0.4 * total)
    # nothing removed at the first stage comes back: ranks only shrink
    for n, k in alloc.ranks.items():
        k0 = shapes[n].full_rank if first[n] is None else first[n]
        assert (shapes[n].full_rank if k is None else k) <= k0
    assert alloc.ranks != allocate("zero_sum", shapes, 0.4, scores).ranks  # the re-scoring changed the choice
    assert [s["kept_fraction"] for s in trace] == [0.7, 0.4] and trace[1]["rescored"]
    for t in targets:
        assert torch.equal(linear_weight(model.get_submodule(t.name)).detach(), before[t.name])


def test_needs_a_component_scorer(setup):
    model, windows, targets, stats, scores = setup
    with pytest.raises(ValueError, match="per-component statistics"):
        progressive_allocation(model, targets, scores, 0.4, [0.7], "zero_sum", "first_order", "input_gram", stats,
                               windows, 2)


def test_whole_model_rescoring_pass_equals_the_streamed_one(setup):
    model, _, targets, _, _ = setup
    streamed, trace_s = _run(setup, 0.4, [0.7])
    whole, trace_w = _run(setup, 0.4, [0.7], streamed=False)
    assert whole.ranks == streamed.ranks and whole.kept_params == streamed.kept_params
    assert trace_w[1]["predicted_delta_loss"] == pytest.approx(trace_s[1]["predicted_delta_loss"], rel=1e-9)

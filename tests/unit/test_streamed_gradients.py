"""lowrank.streaming: block-by-block gradients equal the whole-model backward; streamed statistics equal a
whole-model forward.

Tolerance: relative 1e-6 of each matrix's largest entry (float32 forward/backward; the streamed path only changes
the order of float64 summations, and on CPU it is bit-identical in practice).
"""

from __future__ import annotations

import pytest
import torch

from lowrank.calibration import collect_fisher, collect_input_grams
from lowrank.gradients import calibration_gradients
from lowrank.model import find_targets, linear_weight
from lowrank.streaming import BoundaryStore, boundary_bytes, streamed_gradients

from conftest import target_inputs

REL = 1e-6


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float64
    scale = float(b.abs().max())
    assert scale > 0
    torch.testing.assert_close(a, b, rtol=REL, atol=REL * scale)


@pytest.fixture
def gwin() -> torch.Tensor:
    return torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("batch_size", [2, 5])
def test_streamed_gradients_match_whole_model(arch, batch_size, gwin, request):
    model = request.getfixturevalue(arch)
    for p in model.parameters():
        p.requires_grad_(False)
    ref = calibration_gradients(model, gwin, batch_size, streamed=False, fisher=True)
    got = streamed_gradients(model, gwin, batch_size, fisher="full")
    assert got.loss == pytest.approx(ref.loss, rel=1e-7) and got.tokens == ref.tokens == 5 * 11
    assert list(got.G) == [t.name for t in find_targets(model)] == list(ref.G)
    for name in ref.G:
        _close(got.G[name], ref.G[name])
        _close(got.fisher[name], ref.fisher[name])
    cols = streamed_gradients(model, gwin, batch_size, fisher="columns", need_G=False)
    assert cols.G == {}
    for name in ref.G:
        _close(cols.fisher[name], ref.fisher[name].sum(dim=0))
    assert not any(p.requires_grad for p in model.parameters())  # flags restored


def test_streamed_is_the_default_and_offload_modes_agree(tiny_llama, gwin):
    a = calibration_gradients(tiny_llama, gwin, 2)  # streamed by default
    b = streamed_gradients(tiny_llama, gwin, 2, offload="cpu", accumulate_dtype=torch.float32)
    name = find_targets(tiny_llama)[-1].name
    assert a.G[name].abs().max() > 0
    torch.testing.assert_close(b.G[name], a.G[name], rtol=1e-5, atol=1e-6 * float(a.G[name].abs().max()))
    with pytest.raises(ValueError, match="offload"):
        streamed_gradients(tiny_llama, gwin, 2, offload="disk")
    with pytest.raises(ValueError, match="fisher"):
        streamed_gradients(tiny_llama, gwin, 2, fisher="diag")


def test_on_block_sees_blocks_last_first_and_keep_false_holds_nothing(tiny_llama, gwin):
    seen: list[tuple[int, list[str]]] = []
    ref = calibration_gradients(tiny_llama, gwin, 3, streamed=False)
    got = streamed_gradients(tiny_llama, gwin, 3, keep=False,
                             on_block=lambda i, G, F: seen.append((i, sorted(G))) or _check(G, ref.G))
    assert [i for i, _ in seen] == [1, 0]
    assert all(len(names) == 7 and all(f"layers.{i}." in n for n in names) for i, names in seen)
    assert got.G == {} and got.loss == pytest.approx(ref.loss, rel=1e-7)


def _check(G, ref):
    for n, g in G.items():
        _close(g, ref[n])


def test_collect_fisher_streams_columns(tiny_llama, gwin):
    fisher = collect_fisher(tiny_llama, gwin, 4, torch.device("cpu"), max_windows=None, windows_per_backward=2)
    full = calibration_gradients(tiny_llama, gwin, 2, streamed=False, fisher=True)
    for name, f in full.fisher.items():
        _close(fisher.F[name], f.sum(dim=0) / 3)


def test_streamed_input_grams_equal_whole_model_forward(tiny_llama, gwin):
    """Block-by-block Grams (batch 2) against hooks on one whole-model forward of every window at once."""
    grams = collect_input_grams(tiny_llama, gwin, 2, torch.device("cpu"))
    X = target_inputs(tiny_llama, gwin)
    assert len(grams.C) == 2 * 4  # qkv, o, gate/up, down per block
    for name, x in X.items():
        _close(grams.for_target(name), x.T @ x / x.shape[0])


def test_boundary_store_and_size():
    store = BoundaryStore(torch.device("cpu"), torch.device("cpu"))
    store.put(0, 0, torch.ones(2, 3))
    store.put(0, 0, torch.zeros(2, 3))
    assert float(store.get(0, 0).sum()) == 0.0
    store.drop(0)
    assert store.h[0] == []
    assert boundary_bytes(torch.zeros(256, 2048, dtype=torch.long), 4096, 32, torch.bfloat16) == \
        256 * 2048 * 4096 * 33 * 2


def test_fused_scores_equal_scores_of_full_gradients(tiny_llama, gwin):
    from lowrank.scoring import score_targets
    from lowrank.streaming import fused_scores

    cpu = torch.device("cpu")
    stats = {"input_gram": collect_input_grams(tiny_llama, gwin, 2, cpu)}
    targets = find_targets(tiny_llama)
    ref = score_targets(tiny_llama, targets, "first_order", "input_gram", stats,
                        gradients=calibration_gradients(tiny_llama, gwin, 2, streamed=False))
    got, grads = fused_scores(tiny_llama, gwin, 2, cpu, targets, "first_order", "input_gram", stats)
    assert list(got) == [t.name for t in targets] and grads.G == {}
    for name in ref:
        torch.testing.assert_close(got[name]["sigma"], ref[name]["sigma"], rtol=1e-12, atol=0)
        _close(got[name]["score"], ref[name]["score"])

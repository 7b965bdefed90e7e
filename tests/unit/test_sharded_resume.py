"""lowrank.sharded + lowrank.resume: a lazy (meta-skeleton) model streams like the loaded one; block-wise
truncation resumes after a crash with identical factors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lowrank.calibration import collect_input_grams
from lowrank.checkpoint import factor_state
from lowrank.model import find_blocks, find_targets
from lowrank.resume import part_path, truncate_blocks
from lowrank.blocks import resident
from lowrank.sharded import ShardedCheckpoint, is_lazy, load_lazy_model
from lowrank.streaming import streamed_gradients


@pytest.fixture
def saved_llama(tiny_llama, tmp_path):
    """The tiny LLaMA saved in two safetensors shards (an index), as a large checkpoint is."""
    tiny_llama.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    return tiny_llama, tmp_path


@pytest.fixture
def win() -> torch.Tensor:
    return torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(11))


def test_lazy_model_has_meta_blocks_and_same_statistics(saved_llama, win, cpu):
    eager, folder = saved_llama
    lazy = load_lazy_model(folder)
    assert is_lazy(lazy) and not is_lazy(eager)
    _, blocks = find_blocks(lazy)
    assert all(p.is_meta for b in blocks for p in b.parameters())
    assert not any(p.is_meta for n, p in lazy.named_parameters() if ".layers." not in n)
    ref = collect_input_grams(eager, win, 2, cpu)
    got = collect_input_grams(lazy, win, 2, cpu)
    for g in ref.C:
        torch.testing.assert_close(got.C[g], ref.C[g], rtol=0, atol=1e-12)
    g_ref = streamed_gradients(eager, win, 2)
    g_lazy = streamed_gradients(lazy, win, 2)
    assert g_lazy.loss == pytest.approx(g_ref.loss, rel=1e-7)
    for n in g_ref.G:
        torch.testing.assert_close(g_lazy.G[n], g_ref.G[n], rtol=0, atol=1e-12)
    assert all(p.is_meta for b in blocks for p in b.parameters())  # every block released again
    with resident(lazy, 1, cpu) as blk:
        torch.testing.assert_close(blk.mlp.down_proj.weight, eager.model.layers[1].mlp.down_proj.weight)
    assert ShardedCheckpoint(folder).total_numel() == sum(p.numel() for p in eager.parameters())


def _factors(model):
    tensors, ranks = factor_state(model)
    return {k: v.clone() for k, v in tensors.items()}, ranks


def test_killed_run_resumes_with_identical_factors(saved_llama, win, cpu, tmp_path):
    eager, folder = saved_llama
    stats = {"input_gram": collect_input_grams(eager, win, 2, cpu)}
    targets = find_targets(eager)
    ranks = {t.name: 3 + t.block for t in targets}
    # reference: one uninterrupted run on the loaded model
    full = copy.deepcopy(eager)
    rep_full = truncate_blocks(full, targets, ranks, "input_gram", stats, 1e-6, cpu, tmp_path / "full")
    ref_t, ref_r = _factors(full)
    assert len(ref_r) == len(targets)
    # lazy model, killed after block 0
    parts = tmp_path / "parts"
    lazy = load_lazy_model(folder)
    with pytest.raises(RuntimeError, match="stopped after block 0"):
        truncate_blocks(lazy, targets, ranks, "input_gram", stats, 1e-6, cpu, parts, stop_after=0)
    assert part_path(parts, 0).exists() and not part_path(parts, 1).exists()
    stamp = part_path(parts, 0).stat().st_mtime_ns
    # a fresh process: new lazy model, same parts folder -> block 0 loaded, block 1 computed
    lazy2 = load_lazy_model(folder)
    rep = truncate_blocks(lazy2, targets, ranks, "input_gram", stats, 1e-6, cpu, parts)
    assert part_path(parts, 0).stat().st_mtime_ns == stamp  # not recomputed
    got_t, got_r = _factors(lazy2)
    assert got_r == ref_r and set(got_t) == set(ref_t)
    for k in ref_t:
        assert torch.equal(got_t[k], ref_t[k]), k
    assert rep == rep_full
    # other ranks change the fingerprint: the stale part is recomputed, not reused
    lazy3 = load_lazy_model(folder)
    ranks2 = {**ranks, targets[0].name: 2}
    truncate_blocks(lazy3, targets, ranks2, "input_gram", stats, 1e-6, cpu, parts)
    assert part_path(parts, 0).stat().st_mtime_ns != stamp
    assert lazy3.get_submodule(targets[0].name).rank == 2


def test_auto_streams_when_the_model_does_not_fit_the_device(saved_llama):
    """``lazy_load: auto``: a model that fits in host memory still streams when the stage would put it whole on a
    device without room for it (evaluation, correction, quantize); given values win."""
    from lowrank.sharded import streams

    _, folder = saved_llama
    need = ShardedCheckpoint(folder).total_numel() * 4
    assert streams(folder, torch.float32, None) is False  # 0.1 MB: fits in host memory
    assert streams(folder, torch.float32, None, device_free=10 * need) is False
    assert streams(folder, torch.float32, None, device_free=need) is True  # over half the free device memory
    assert streams(folder, torch.float32, False, device_free=1) is False and streams(folder, torch.float32, True)

"""lowrank.calibration: block-streamed input second moments against a direct whole-model computation."""

from __future__ import annotations

import copy

import pytest
import torch

from lowrank.calibration import STATS, InputGrams, capture_block_inputs, collect_input_grams, stream_blocks
from lowrank.model import find_blocks, find_targets

from conftest import target_inputs

# streamed and whole-model forwards run the same float32 kernels; the float64 Gram sums may differ in order
GRAM_RTOL = 1e-12


def _direct_grams(model, windows):
    """XᵀX/N per target from forward hooks over one ordinary whole-model forward (float64)."""
    return {name: (X.T @ X / X.shape[0], X.shape[0]) for name, X in target_inputs(model, windows).items()}


def _assert_gram_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == torch.float64 and got.shape == ref.shape
    assert float((got - ref).abs().max()) <= GRAM_RTOL * float(ref.abs().max())


@pytest.fixture(scope="module")
def llama_grams(_llama_base):
    model = copy.deepcopy(_llama_base)
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(11))
    cpu = torch.device("cpu")
    # float64 products: the streamed sums equal the direct ones to round-off; "mixed" (the default "auto") to 1e-6
    return {"model": model, "windows": windows, "bs4": collect_input_grams(model, windows, 4, cpu, precision="float64"),
            "bs1": collect_input_grams(model, windows, 1, cpu, precision="float64"),
            "auto": collect_input_grams(model, windows, 4, cpu)}


def test_streamed_grams_equal_direct_hooks(llama_grams):
    model, windows, grams = llama_grams["model"], llama_grams["windows"], llama_grams["bs4"]
    ref = _direct_grams(model, windows)
    assert set(ref) == set(grams.group_of)
    for name, (C_ref, n_tok) in ref.items():
        _assert_gram_close(grams.for_target(name), C_ref)
        auto = llama_grams["auto"].for_target(name)
        assert float((auto - C_ref).abs().max()) <= 1e-6 * float(C_ref.abs().max())
        assert grams.tokens[grams.group_of[name]] == n_tok == 4 * 16
        # a second moment is symmetric PSD
        C = grams.for_target(name)
        assert torch.equal(C, C.T)
        assert float(torch.linalg.eigvalsh(C).min()) >= -1e-12 * float(C.abs().max())


def test_batch_size_does_not_change_grams(llama_grams):
    a, b = llama_grams["bs4"], llama_grams["bs1"]
    assert a.group_of == b.group_of and a.tokens == b.tokens
    for g in a.C:
        _assert_gram_close(b.C[g], a.C[g])


def test_shared_inputs_grouped_by_identity(llama_grams, llama_projections):
    grams = llama_grams["bs4"]
    assert len(grams.C) == 2 * 4
    for b in range(2):
        p = f"model.layers.{b}."
        g = {proj: grams.group_of[p + proj] for proj in llama_projections}
        assert g["self_attn.q_proj"] == g["self_attn.k_proj"] == g["self_attn.v_proj"] == p + "self_attn.q_proj"
        assert g["mlp.gate_proj"] == g["mlp.up_proj"] == p + "mlp.gate_proj"
        assert g["self_attn.o_proj"] == p + "self_attn.o_proj"
        assert g["mlp.down_proj"] == p + "mlp.down_proj"
        assert len(set(g.values())) == 4
        assert grams.C[g["mlp.down_proj"]].shape == (128, 128)
        assert grams.C[g["self_attn.q_proj"]].shape == (64, 64)


def test_model_restored_after_calibration(llama_grams):
    model, windows = llama_grams["model"], llama_grams["windows"]
    _, blocks = find_blocks(model)
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in blocks)
    assert all("forward" not in b.__dict__ for b in blocks)
    assert all(not b._forward_hooks for b in model.modules())
    assert all(not b._forward_pre_hooks for b in model.modules())
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=windows).logits, fresh(input_ids=windows).logits, rtol=0, atol=0)


def test_gpt2_conv1d_grams_equal_direct(tiny_gpt2, token_windows, cpu):
    grams = collect_input_grams(tiny_gpt2, token_windows, 2, cpu, precision="float64")
    ref = _direct_grams(tiny_gpt2, token_windows)
    assert len(grams.C) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj read four distinct inputs
    for name, (C_ref, _) in ref.items():
        assert grams.group_of[name] == name
        _assert_gram_close(grams.for_target(name), C_ref)


def test_stream_blocks_reproduces_hidden_states(tiny_llama, token_windows, cpu):
    """Capture + streaming through every block gives the last block's output of an ordinary forward."""
    model = tiny_llama
    with torch.no_grad():
        hs = model(input_ids=token_windows, output_hidden_states=True, use_cache=False).hidden_states
    inputs = capture_block_inputs(model, token_windows, 3, cpu)
    assert len(inputs.hidden) == 2  # batches of 3 and 1
    torch.testing.assert_close(torch.cat(inputs.hidden), hs[0], rtol=0, atol=0)
    seen = []
    stream_blocks(model, inputs, cpu, on_block=lambda i, blk: (seen.append(i), None)[1])
    assert seen == [0, 1]
    # hidden_states[-1] has the final norm applied; compare before it
    final = model.model.norm(torch.cat(inputs.hidden))
    torch.testing.assert_close(final, hs[-1], rtol=1e-6, atol=1e-6)


def test_input_grams_tensor_round_trip(llama_grams):
    grams = llama_grams["bs4"]
    tensors, meta = grams.to_tensors()
    assert all(v.dtype == torch.float32 for v in tensors.values())
    back = InputGrams.from_tensors(tensors, meta)
    assert back.group_of == grams.group_of and back.tokens == grams.tokens
    for g, C in grams.C.items():
        assert back.C[g].dtype == torch.float64
        torch.testing.assert_close(back.C[g], C, rtol=1e-6, atol=1e-7 * float(C.abs().max()))
    with pytest.raises(KeyError):
        grams.for_target("model.layers.0.nope")


def test_target_subset(tiny_llama, token_windows, cpu):
    targets = [t for t in find_targets(tiny_llama) if t.name.endswith("down_proj")]
    grams = collect_input_grams(tiny_llama, token_windows, 4, cpu, targets)
    assert set(grams.group_of) == {t.name for t in targets}
    assert len(grams.C) == 2


def test_stats_registry():
    assert STATS["input_gram"].collect is collect_input_grams


def test_whitening_factor_cached_per_group(llama_grams):
    from lowrank.whitening import whitening_factor

    grams = llama_grams["bs4"]
    p = "model.layers.0."
    wq = grams.factor_for(p + "self_attn.q_proj", 1e-6)
    ref = whitening_factor(grams.for_target(p + "self_attn.q_proj"), damping=1e-6)
    assert wq.method == ref.method and wq.epsilon == ref.epsilon
    torch.testing.assert_close(wq.S, ref.S, rtol=0, atol=0)
    # q/k/v read one input: one factor
    assert grams.factor_for(p + "self_attn.k_proj", 1e-6) is wq
    assert grams.factor_for(p + "self_attn.v_proj", 1e-6) is wq
    # another group or another damping is a different factor of its own moment
    wo = grams.factor_for(p + "self_attn.o_proj", 1e-6)
    C = grams.for_target(p + "self_attn.o_proj")
    assert (wo.S @ wo.S.T - C - wo.epsilon * torch.eye(64, dtype=C.dtype)).abs().max() <= 1e-12 * C.abs().max()
    w2 = grams.factor_for(p + "self_attn.o_proj", 1e-2)
    assert w2.epsilon == pytest.approx(1e4 * wo.epsilon, rel=1e-12)
    with pytest.raises(KeyError):
        grams.factor_for("model.layers.0.nope", 1e-6)


def test_load_stat_round_trip(llama_grams, tmp_path):
    """A statistics file names its kind in its metadata; load_stat dispatches on it (STAT_LOADERS)."""
    from lowrank.calibration import STAT_LOADERS, load_stat
    from lowrank.io import save_tensors

    assert STAT_LOADERS["input_gram"] == InputGrams.from_tensors
    assert set(STAT_LOADERS) == set(STATS)
    grams = llama_grams["bs4"]
    tensors, meta = grams.to_tensors()
    save_tensors(tmp_path / "grams.safetensors", tensors, meta)
    back = load_stat(tmp_path / "grams.safetensors")
    assert isinstance(back, InputGrams)
    assert back.group_of == grams.group_of and back.tokens == grams.tokens and set(back.C) == set(grams.C)
    for g, C in grams.C.items():
        # stored as float32: 1e-7 of the largest entry is float32 rounding
        torch.testing.assert_close(back.C[g], C, rtol=1e-6, atol=1e-7 * float(C.abs().max()))
    save_tensors(tmp_path / "other.safetensors", tensors, {**meta, "kind": "hessian"})
    with pytest.raises(ValueError, match="unknown statistics kind 'hessian'"):
        load_stat(tmp_path / "other.safetensors")

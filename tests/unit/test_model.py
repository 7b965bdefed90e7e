"""lowrank.model: structural discovery of blocks and targets, Conv1D orientation, module swaps, sources."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank.accounting import TargetShape
from lowrank.factorized import LowRankLinear
from lowrank.model import (
    find_blocks,
    find_targets,
    get_module,
    linear_bias,
    linear_weight,
    materialize_source,
    replace_module,
    resolve_source,
    swap_in_low_rank,
)

LLAMA_SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
                "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
                "mlp.down_proj": (64, 128)}


def _check_llama_targets(model, projections):
    targets = find_targets(model)
    assert len(targets) == 2 * 7
    for b in range(2):
        names = [t.name for t in targets if t.block == b]
        assert names == [f"model.layers.{b}.{p}" for p in projections]
    for t in targets:
        rel = t.name.split(".", 3)[3]
        m, n = LLAMA_SHAPES[rel]
        assert t.shape == TargetShape(m, n, False)
        assert tuple(linear_weight(get_module(model, t.name)).shape) == (m, n)
    names = {t.name for t in targets}
    assert not any("embed" in n or "lm_head" in n for n in names)
    return targets


def test_find_blocks_llama(tiny_llama):
    prefix, blocks = find_blocks(tiny_llama)
    assert prefix == "model.layers"
    assert len(blocks) == 2 and blocks is tiny_llama.model.layers


def test_find_targets_llama(tiny_llama, llama_projections):
    _check_llama_targets(tiny_llama, llama_projections)


def test_find_targets_llama_tied(make_llama, llama_projections):
    model = make_llama(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    _check_llama_targets(model, llama_projections)


def test_gpt2_conv1d_discovered_structurally(tiny_gpt2):
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2
    prefix, blocks = find_blocks(model)
    assert prefix == "transformer.h" and len(blocks) == 2
    targets = find_targets(model)
    H = 32
    expected = {"attn.c_attn": (3 * H, H), "attn.c_proj": (H, H), "mlp.c_fc": (4 * H, H), "mlp.c_proj": (H, 4 * H)}
    assert [t.name for t in targets] == [f"transformer.h.{b}.{k}" for b in range(2) for k in expected]
    for t in targets:
        mod = get_module(model, t.name)
        assert isinstance(mod, Conv1D)
        m, n = expected[t.name.split(".", 3)[3]]
        assert t.shape == TargetShape(m, n, True)
        W = linear_weight(mod)
        assert tuple(W.shape) == (m, n)
        xin = torch.randn(5, n, generator=torch.Generator().manual_seed(1))
        # y = W x + b in the nn.Linear convention
        torch.testing.assert_close(mod(xin), xin @ W.T + linear_bias(mod), rtol=0, atol=1e-6)
    assert not any("wte" in t.name or "lm_head" in t.name for t in targets)


class _NormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x)


class _NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_NormBlock() for _ in range(3)])


def test_model_without_linear_blocks_rejected():
    with pytest.raises(ValueError, match="nothing to compress"):
        find_targets(_NoLinear())


class _HeadBlock(nn.Module):
    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head


class _OnlyTiedHead(nn.Module):
    """Blocks whose only linear is the output embedding: no compressible target is left."""

    def __init__(self):
        super().__init__()
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.layers = nn.ModuleList([_HeadBlock(self.lm_head)])

    def get_output_embeddings(self):
        return self.lm_head


def test_model_with_only_embedding_linears_rejected():
    with pytest.raises(ValueError, match="no linear layers"):
        find_targets(_OnlyTiedHead())


class _SharedBlock(nn.Module):
    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.readout = nn.Linear(8, 16, bias=False)
        self.readout.weight = emb.weight  # a different module over the embedding's storage
        self.mix = nn.Linear(8, 8)


class _SharedStorage(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([_SharedBlock(self.emb) for _ in range(2)])

    def get_input_embeddings(self):
        return self.emb


def test_linear_sharing_embedding_storage_excluded():
    model = _SharedStorage()
    targets = find_targets(model)
    assert [t.name for t in targets] == ["layers.0.mix", "layers.1.mix"]
    assert all(t.shape == TargetShape(8, 8, True) for t in targets)


class _LinearList(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 6) for _ in range(3)])


def test_blocks_that_are_linears_get_valid_names():
    model = _LinearList()
    targets = find_targets(model)
    assert [t.name for t in targets] == ["layers.0", "layers.1", "layers.2"]
    for t in targets:
        assert get_module(model, t.name) is model.layers[t.block]


def test_replace_module_swaps_and_preserves_function(tiny_llama, token_windows):
    model = tiny_llama
    with torch.no_grad():
        ref = model(input_ids=token_windows).logits
    name = "model.layers.1.mlp.down_proj"
    old = get_module(model, name)
    W = old.weight.detach().double()
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    new = LowRankLinear.from_factors(U * s, Vh, dtype=torch.float32)  # full rank: exact up to float32
    returned = replace_module(model, name, new)
    assert returned is old
    assert get_module(model, name) is new
    with torch.no_grad():
        out = model(input_ids=token_windows).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # the factored layer is still one target (its inner down/up are not), with the same shape
    targets = find_targets(model)
    assert len(targets) == 14
    t = next(t for t in targets if t.name == name)
    assert t.shape == TargetShape(64, 128, False)
    assert not any(t.name.endswith((".down", ".up")) for t in targets)


def test_replace_top_level_module():
    model = _LinearList()
    new = nn.ModuleList([nn.Linear(4, 6)])
    old = replace_module(model, "layers", new)
    assert model.layers is new and len(old) == 3


def test_swap_in_low_rank_skeleton(tiny_gpt2):
    name = "transformer.h.0.mlp.c_fc"
    new = swap_in_low_rank(tiny_gpt2, name, 7)
    assert get_module(tiny_gpt2, name) is new
    assert (new.out_features, new.in_features, new.rank) == (128, 32, 7)
    assert new.up.bias is not None and new.up.bias.shape == (128,)


def test_linear_weight_rejects_non_linear():
    with pytest.raises(TypeError):
        linear_weight(nn.LayerNorm(4))


def test_resolve_source_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model source"):
        resolve_source({"source": "ftp"})
    with pytest.raises(FileNotFoundError):
        resolve_source({"source": "hf", "path": str(tmp_path / "missing")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_source({"source": "hf", "path": str(tmp_path / "empty")})
    with pytest.raises(FileNotFoundError):
        resolve_source({"source": "gguf_file", "path": str(tmp_path / "x.gguf")})


def test_random_init_is_seeded(make_llama):
    a, b, c = make_llama(seed=0), make_llama(seed=0), make_llama(seed=1)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    assert wa.dtype == torch.float32 and not a.training


def test_materialize_random_init(tmp_path, tiny_llama_spec, tiny_llama):
    from lowrank.io import write_json
    from lowrank.model import load_model, model_path

    body = materialize_source(tiny_llama_spec, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    assert body["has_tokenizer"] is False and body["path_relative"] is True
    arch = body["architecture"]
    assert arch["blocks_path"] == "model.layers" and arch["n_blocks"] == 2 and arch["n_targets"] == 14
    assert arch["hidden_size"] == 64 and arch["vocab_size"] == 256 and arch["tie_word_embeddings"] is False
    assert arch["target_params"] == 2 * sum(m * n for m, n in LLAMA_SHAPES.values())
    assert arch["total_params"] == sum(p.numel() for p in tiny_llama.parameters())
    # the workflow records the folder relative to the manifest: loading resolves it against the manifest
    manifest = tmp_path / "pretrained.json"
    write_json(manifest, {**body, "path": "hf"})
    assert model_path(manifest) == str((tmp_path / "hf").resolve())
    reloaded = load_model(manifest)
    ref, got = tiny_llama.state_dict(), reloaded.state_dict()
    assert list(ref) == list(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # the saved folder is now a valid `hf` source
    assert resolve_source({"source": "hf", "path": str(tmp_path / "hf")})["kind"] == "hf"


def test_materialize_rejects_model_without_targets(tmp_path):
    spec = {"source": "random_init", "model_type": "llama", "seed": 0,
            "config": {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 0,
                       "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 16}}
    with pytest.raises(ValueError):
        materialize_source(spec, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

"""lowrank.checkpoint: compressed model = base manifest + factors; exact reload, strict factor checks."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

from lowrank.allocation import allocate
from lowrank.calibration import collect_input_grams
from lowrank.checkpoint import FACTORS, MANIFEST, factor_state, load_compressed, save_compressed
from lowrank.factorized import LowRankLinear
from lowrank.io import load_tensors, read_json, save_tensors, write_json
from lowrank.model import find_targets
from lowrank.truncation import truncate_model

LOGITS_ATOL = 1e-5  # same float32 weights, same kernels: reload differences are round-off at most


@pytest.fixture(scope="module")
def compressed(_llama_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    base = copy.deepcopy(_llama_base)
    base.save_pretrained(str(root / "base"))
    manifest = root / "pretrained.json"
    write_json(manifest, {"path": "base", "path_relative": True, "has_tokenizer": False,
                          "architecture": {"n_targets": 14}})
    model = copy.deepcopy(_llama_base)
    cpu = torch.device("cpu")
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    targets = find_targets(model)
    grams = collect_input_grams(model, windows, 2, cpu, targets)
    alloc = allocate("uniform", {t.name: t.shape for t in targets}, 0.5)
    truncate_model(model, targets, alloc.ranks, "input_gram", {"input_gram": grams}, damping=1e-6)
    out = root / "compressed"
    body = save_compressed(out, model, manifest, {"method": "svd_llm", "ratio": 0.5})
    return {"root": root, "out": out, "model": model, "base": base, "alloc": alloc, "body": body,
            "windows": windows, "manifest": manifest}


def test_files_and_manifest(compressed):
    out, body, alloc = compressed["out"], compressed["body"], compressed["alloc"]
    assert (out / FACTORS).is_file() and (out / MANIFEST).is_file()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    on_disk = read_json(out / MANIFEST)
    assert on_disk == body
    assert body["ranks"] == alloc.ranks
    assert body["method"] == "svd_llm" and body["ratio"] == 0.5
    assert body["base_manifest"] == os.path.join("..", "pretrained.json")
    assert body["base_architecture"] == {"n_targets": 14}
    assert body["dtype"] == "float32"
    # factor bytes = 4 · Σ k (m + n) over the bias-free LLaMA targets
    shapes = alloc.shapes
    assert body["factor_bytes"] == 4 * sum(k * (shapes[n].m + shapes[n].n) for n, k in alloc.ranks.items())
    tensors, meta = load_tensors(out / FACTORS)
    assert meta == {"ranks": alloc.ranks}
    assert len(tensors) == 2 * len(alloc.ranks)


def test_reload_gives_identical_logits_and_ranks(compressed):
    model, windows = compressed["model"], compressed["windows"]
    loaded = load_compressed(compressed["out"])
    assert not loaded.training
    _, ranks = factor_state(loaded)
    assert ranks == compressed["alloc"].ranks
    for name, k in ranks.items():
        mod = loaded.get_submodule(name)
        assert isinstance(mod, LowRankLinear) and mod.rank == k
        torch.testing.assert_close(mod.weight, model.get_submodule(name).weight, rtol=0, atol=0)
    with torch.no_grad():
        a = model(input_ids=windows).logits
        b = loaded(input_ids=windows).logits
        dense = compressed["base"](input_ids=windows).logits
    torch.testing.assert_close(b, a, rtol=0, atol=LOGITS_ATOL)
    # the reload is the compressed model, not the base (rank 0.5 changes the logits visibly)
    assert float((b - dense).abs().max()) > 100 * LOGITS_ATOL
    # non-target weights come from the base unchanged
    torch.testing.assert_close(loaded.model.embed_tokens.weight, compressed["base"].model.embed_tokens.weight,
                               rtol=0, atol=0)


def test_reload_survives_moving_the_results_folder(compressed, tmp_path):
    """The base is referenced relative to the compressed folder, so the whole tree can move."""
    moved = tmp_path / "moved"
    shutil.copytree(compressed["root"], moved)
    loaded = load_compressed(moved / "compressed")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=compressed["windows"]).logits,
                                   compressed["model"](input_ids=compressed["windows"]).logits,
                                   rtol=0, atol=LOGITS_ATOL)


def _tampered_copy(compressed, tmp_path, edit):
    root = tmp_path / "t"
    shutil.copytree(compressed["root"], root)
    path = root / "compressed" / FACTORS
    tensors, meta = load_tensors(path)
    edit(tensors)
    save_tensors(path, tensors, meta)
    return root / "compressed"


def test_extra_factor_key_rejected(compressed, tmp_path):
    def add(t):
        t["model.layers.0.self_attn.q_proj.extra.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="does not match"):
        load_compressed(_tampered_copy(compressed, tmp_path, add))


def test_missing_factor_key_rejected(compressed, tmp_path):
    def drop(t):
        del t["model.layers.1.mlp.up_proj.down.weight"]
    with pytest.raises(ValueError, match="missing"):
        load_compressed(_tampered_copy(compressed, tmp_path, drop))


def test_dense_model_saves_no_factors(_llama_base):
    tensors, ranks = factor_state(_llama_base)
    assert tensors == {} and ranks == {}


def test_reload_in_float64(compressed):
    """load_compressed(dtype=float64): base and factors both in float64, values exactly the float32 ones."""
    loaded = load_compressed(compressed["out"], dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    for name in compressed["alloc"].ranks:
        a, b = loaded.get_submodule(name), compressed["model"].get_submodule(name)
        assert torch.equal(a.up.weight, b.up.weight.double()) and torch.equal(a.down.weight, b.down.weight.double())
    assert torch.equal(loaded.model.embed_tokens.weight, compressed["base"].model.embed_tokens.weight.double())
    with torch.no_grad():
        a = loaded(input_ids=compressed["windows"]).logits
        b = compressed["model"](input_ids=compressed["windows"]).logits
    # float64 vs float32 forward of the same weights: float32 round-off of logits ~0.1 in size
    torch.testing.assert_close(a.float(), b, rtol=0, atol=1e-5)


def test_load_model_absolute_and_relative_paths(compressed, tmp_path):
    from lowrank.model import load_model, model_path

    base_dir = compressed["root"] / "base"
    absolute = tmp_path / "abs.json"
    write_json(absolute, {"path": str(base_dir), "path_relative": False})
    assert model_path(absolute) == str(base_dir)
    # relative to the manifest's folder, not to the working directory
    assert model_path(compressed["manifest"]) == str(base_dir.resolve())
    model = load_model(absolute, dtype=torch.float32)
    assert not model.training
    ref = compressed["base"].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_lazy_reload_streams_the_same_perplexity(compressed):
    """A lazy compressed model: blocks and factors on meta until placed, factors read from the factor file with
    their block and dropped after it; its streamed perplexity and sizes equal the whole-model ones."""
    from lowrank.evaluation import model_size, perplexity
    from lowrank.model import find_blocks
    from lowrank.sharded import is_lazy

    whole = load_compressed(compressed["out"])
    lazy = load_compressed(compressed["out"], lazy=True)
    assert is_lazy(lazy) and not is_lazy(whole)
    _, blocks = find_blocks(lazy)
    assert all(p.is_meta for b in blocks for p in b.parameters())
    windows = torch.randint(0, 256, (5, 20), generator=torch.Generator().manual_seed(8))
    ref = perplexity(whole, windows, batch_size=2)
    got = perplexity(lazy, windows, batch_size=2)  # streamed: the model is lazy
    assert got["tokens"] == ref["tokens"] == 5 * 19 and got["nonfinite_windows"] == 0
    assert got["nll"] == pytest.approx(ref["nll"], rel=1e-6)
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)
    assert all(p.is_meta for b in blocks for p in b.parameters())  # every block released, factors too
    assert model_size(lazy) == model_size(whole)


def test_lazy_reload_checks_the_factor_keys(compressed, tmp_path):
    def drop(t):
        del t["model.layers.1.mlp.up_proj.down.weight"]
    with pytest.raises(ValueError, match="missing"):
        load_compressed(_tampered_copy(compressed, tmp_path, drop), lazy=True)


@pytest.mark.parametrize("cfg", [dict(damping=1e-6, refit_b=True, b_anchor=1.0), dict(mode="adam", steps=3, lr=1e-3)],
                         ids=["closed_form_A_then_B", "adam"])
def test_lazy_refine_gives_the_in_memory_factors(compressed, cfg, tmp_path):
    """scripts/refine.py on a lazy model: the dense base and the compressed model (``keep``: its factors stay on
    CPU once read, the dense weights go back to meta) one block at a time; the refined factors, the report and
    the saved factor file equal the in-memory refinement's, bitwise."""
    from lowrank.model import find_blocks
    from lowrank.refine import RefineConfig, refine_model
    from lowrank.sharded import is_lazy, load_lazy_model

    config = RefineConfig(windows=3, batch_size=2, **cfg)
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(11))
    whole = load_compressed(compressed["out"])
    ref = refine_model(whole, copy.deepcopy(compressed["base"]), windows, config)
    lazy = load_compressed(compressed["out"], lazy=True, keep=True)
    dense = load_lazy_model(compressed["root"] / "base")
    got = refine_model(lazy, dense, windows, config)
    assert is_lazy(lazy) and got.blocks == ref.blocks
    assert any(b["error_after"] < b["error_before"] for b in ref.blocks)  # the refit changed something
    for model in (lazy, dense):  # every dense weight back on meta: at most one block was ever resident
        _, blocks = find_blocks(model)
        awake = [f"{i}.{n}" for i, b in enumerate(blocks) for n, p in b.named_parameters() if not p.is_meta]
        assert not (bad := [n for n in awake if not (".up." in n or ".down." in n)]), bad
    mine, want = factor_state(lazy), factor_state(whole)
    assert mine[1] == want[1] and mine[0].keys() == want[0].keys()
    assert all(v.device.type == "cpu" and torch.equal(v, want[0][k]) for k, v in mine[0].items())
    save_compressed(tmp_path / "lazy", lazy, compressed["manifest"], {"stage": "refine"})
    save_compressed(tmp_path / "whole", whole, compressed["manifest"], {"stage": "refine"})
    assert (tmp_path / "lazy" / FACTORS).read_bytes() == (tmp_path / "whole" / FACTORS).read_bytes()

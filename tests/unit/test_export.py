"""lowrank.export: a compressed model back as a transformers model (generate, training) and as a plain HF folder."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowrank.allocation import allocate
from lowrank.checkpoint import save_compressed
from lowrank.export import export_hf, load_for_inference
from lowrank.factorized import LowRankLinear
from lowrank.io import write_json
from lowrank.model import find_targets
from lowrank.truncation import truncate_model

LOGITS_ATOL = 1e-4  # A B merged in float64 then rounded to float32 vs up(down(x)) in float32: round-off only


def _compressed_folder(base: torch.nn.Module, root, kept: float = 0.5):
    base.save_pretrained(str(root / "base"))
    manifest = root / "pretrained.json"
    write_json(manifest, {"path": "base", "path_relative": True, "has_tokenizer": False, "architecture": {}})
    model = copy.deepcopy(base)
    targets = find_targets(model)
    alloc = allocate("uniform", {t.name: t.shape for t in targets}, kept)
    truncate_model(model, targets, alloc.ranks, "none", {}, damping=1e-6)
    save_compressed(root / "stage0", model, manifest, {"method": "svd", "ratio": kept})
    return root / "stage0", model


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_generate_runs_and_logits_match_the_compressed_model(arch, request, tmp_path) -> None:
    base = request.getfixturevalue(arch)
    folder, reference = _compressed_folder(base, tmp_path)
    model, tokenizer = load_for_inference(folder)
    assert tokenizer is None  # a random-init model without a tokenizer
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(find_targets(base))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 17) and torch.equal(out[:, :12], ids)
    # greedy decoding with the KV cache picks the argmax of a full forward at every step
    with torch.no_grad():
        full = model(input_ids=out[:, :-1]).logits[:, 11:].argmax(-1)
    assert torch.equal(full, out[:, 12:])


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_plain_hf_export_loads_without_lowrank_and_gives_the_same_logits(arch, request, tmp_path) -> None:
    base = request.getfixturevalue(arch)
    folder, reference = _compressed_folder(base, tmp_path)
    out = export_hf(folder, tmp_path / "export")
    assert (out / "lowrank_manifest.json").is_file() and not list(tmp_path.glob(".export*"))
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, reference(input_ids=ids).logits, atol=LOGITS_ATOL,
                                   rtol=0)
        # and it differs from the dense base: the export carries the truncation
        assert (plain(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3
    with pytest.raises(FileExistsError, match="export"):
        export_hf(folder, out)


def test_trainable_load_trains_only_the_factors(tiny_llama, tmp_path) -> None:
    folder, _ = _compressed_folder(tiny_llama, tmp_path)
    model, _ = load_for_inference(folder, trainable=True)
    assert model.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".down." in n or ".up." in n for n in trainable)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    emb = model.get_input_embeddings().weight
    assert emb.grad is None

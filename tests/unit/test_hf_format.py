"""lowrank.hf_format: a compressed model as a self-contained HF folder that AutoModelForCausalLM loads (factors,
int8 rows, tied embeddings, Conv1D), round-trips through save_pretrained, and that stock transformers refuses."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowrank.allocation import allocate
from lowrank.checkpoint import save_compressed
from lowrank.evaluation import model_size, perplexity
from lowrank.cli import main as lowrank_main
from lowrank.export import export_folder, is_lowrank_hf
from lowrank.factorized import LowRankLinear
from lowrank.hf_format import QUANT_METHOD, densify_above, module_layouts, save_hf_folder
from lowrank.io import write_json
from lowrank.model import find_targets, linear_weight, replace_module
from lowrank.quantized_linear import QuantizedLinear
from lowrank.truncation import truncate_model


def _factored(base: torch.nn.Module, kept: float = 0.5) -> torch.nn.Module:
    model = copy.deepcopy(base)
    targets = find_targets(model)
    alloc = allocate("uniform", {t.name: t.shape for t in targets}, kept)
    truncate_model(model, targets, alloc.ranks, "none", {}, damping=1e-6)
    return model


def _int8(base: torch.nn.Module) -> torch.nn.Module:
    """Block 0's targets factored at rank 8 with half their rows int8; block 1's dense with a third int8."""
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(find_targets(model)):
        W = linear_weight(model.get_submodule(t.name)).detach()
        if t.name.startswith("model.layers.0."):
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            mats = {"up": U[:, :8] * S[:8], "down": Vh[:8]}
        else:
            mats = {"weight": W}
        masks = {k: torch.rand(v.shape[0], generator=g) < (0.5 if "up" in mats else 0.33) for k, v in mats.items()}
        replace_module(model, t.name, QuantizedLinear.from_matrices(mats, masks))
    return model


def _fresh_copy(folder: Path, tmp_path: Path) -> Path:
    """The folder alone in a new temporary directory: nothing else of where it was written comes along."""
    dest = tmp_path / "elsewhere" / "model"
    shutil.copytree(folder, dest)
    shutil.rmtree(folder)
    return dest


def _assert_same_function(a: torch.nn.Module, b: torch.nn.Module, windows: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=windows).logits, b(input_ids=windows).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_folder_loads_with_from_pretrained_as_the_compressed_model(arch, request, tmp_path, token_windows) -> None:
    compressed = _factored(request.getfixturevalue(arch))
    folder = _fresh_copy(save_hf_folder(compressed, tmp_path / "hf"), tmp_path)
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == QUANT_METHOD and cfg["modules"] == module_layouts(compressed)
    assert (folder / "generation_config.json").is_file() and is_lowrank_hf(folder)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    n_factored = sum(isinstance(m, LowRankLinear) for m in loaded.modules())
    assert n_factored == len(cfg["modules"]) == len(find_targets(compressed)) > 0
    # the parameter count of the compressed model, well under the dense one
    size, dense = model_size(loaded), model_size(request.getfixturevalue(arch))
    assert size == model_size(compressed)
    assert size["target_params"] < 0.55 * dense["target_params"]
    _assert_same_function(loaded, compressed, token_windows)
    ref = perplexity(compressed, token_windows)["ppl"]
    assert perplexity(loaded, token_windows)["ppl"] == pytest.approx(ref, rel=1e-6)
    out = loaded.generate(token_windows[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12) and torch.equal(out[:, :8], token_windows[:1, :8])


def test_save_pretrained_round_trips_the_factors(tiny_llama, tmp_path, token_windows) -> None:
    compressed = _factored(tiny_llama, kept=0.4)
    loaded = AutoModelForCausalLM.from_pretrained(str(save_hf_folder(compressed, tmp_path / "hf"))).eval()
    loaded.save_pretrained(str(tmp_path / "again"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "again")).eval()
    first, second = loaded.state_dict(), again.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert cfg["modules"] == module_layouts(compressed)
    _assert_same_function(again, compressed, token_windows)


def test_tied_embeddings_stay_tied(make_llama, tmp_path, token_windows) -> None:
    compressed = _factored(make_llama(tie_word_embeddings=True))
    loaded = AutoModelForCausalLM.from_pretrained(str(save_hf_folder(compressed, tmp_path / "hf"))).eval()
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert model_size(loaded)["total_params"] == model_size(compressed)["total_params"]
    _assert_same_function(loaded, compressed, token_windows)


def test_int8_rows_load_as_stored(tiny_llama, tmp_path, token_windows) -> None:
    compressed = _int8(tiny_llama)
    folder = _fresh_copy(save_hf_folder(compressed, tmp_path / "hf"), tmp_path)
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    name = "model.layers.0.self_attn.q_proj"
    assert cfg["modules"][name]["rank"] == 8 and set(cfg["modules"][name]["int8_rows"]) == {"down", "up"}
    assert cfg["modules"]["model.layers.1.mlp.up_proj"]["rank"] is None
    loaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    q = loaded.get_submodule(name)
    ref = compressed.get_submodule(name)
    assert isinstance(q, QuantizedLinear) and q.up.q.dtype == torch.int8 and q.up.f.dtype == torch.float16
    assert torch.equal(q.up.q, ref.up.q) and torch.equal(q.down.scale, ref.down.scale)
    assert sum(m.stored_bytes() for m in loaded.modules() if isinstance(m, QuantizedLinear)) == \
        sum(m.stored_bytes() for m in compressed.modules() if isinstance(m, QuantizedLinear))
    _assert_same_function(loaded, compressed, token_windows)


def test_import_lowrank_is_cheap_and_registers_once_transformers_loads() -> None:
    code = ("import sys, lowrank\nassert 'torch' not in sys.modules\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q\n"
            "from lowrank.hf_format import LowRankHfQuantizer\nassert Q['lowrank'] is LowRankHfQuantizer\n"
            "import lowrank.hf_format as h\nh.register()\nprint('OK')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_a_layout_that_does_not_fit_the_architecture_is_refused(tiny_llama, tmp_path) -> None:
    folder = save_hf_folder(_factored(tiny_llama), tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["in"] = 65
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="up_proj.*do not belong together"):
        AutoModelForCausalLM.from_pretrained(str(folder))


def test_export_copies_merges_and_converts_stage_folders(tiny_llama, tmp_path, token_windows) -> None:
    compressed = _factored(tiny_llama)
    hf = save_hf_folder(compressed, tmp_path / "hf")
    copied = export_folder(hf, tmp_path / "copy")
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in hf.iterdir())
    with pytest.raises(FileExistsError):
        export_folder(hf, tmp_path / "copy")
    assert lowrank_main(["export", str(hf), str(tmp_path / "merged"), "--merged"]) == 0
    # one interpreter without lowrank: the lowrank folder is refused (never random-initialised), the merged loads
    code = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
            f"try:\n    AutoModelForCausalLM.from_pretrained({str(hf)!r})\n"
            "except RuntimeError as e:\n    print('REFUSED', e)\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r})\n"
            "assert 'lowrank' not in sys.modules and m.config.to_dict().get('quantization_config') is None\n"
            f"torch.save(m(input_ids=torch.tensor({token_windows.tolist()})).logits, {str(tmp_path / 'l.pt')!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout
    assert "model.layers.0.mlp.down_proj.weight" in proc.stderr  # the guard key is the one the report names
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "l.pt"), compressed(input_ids=token_windows).logits,
                                   atol=1e-4, rtol=0)
    # a pipeline stage folder (factors + a manifest pointing at its base) becomes a lowrank folder
    tiny_llama.save_pretrained(str(tmp_path / "base"))
    write_json(tmp_path / "pretrained.json", {"path": "base", "path_relative": True, "has_tokenizer": False,
                                              "architecture": {}})
    save_compressed(tmp_path / "stage0", compressed, tmp_path / "pretrained.json", {"method": "svd", "ratio": 0.5})
    out = export_folder(tmp_path / "stage0", tmp_path / "from_stage")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["provenance"] == {"method": "svd", "ratio": 0.5}
    _assert_same_function(AutoModelForCausalLM.from_pretrained(str(out)).eval(), compressed, token_windows)
    with pytest.raises(ValueError, match="neither a lowrank HF folder"):
        export_folder(tmp_path / "base", tmp_path / "nope")


def test_densify_above_merges_only_matrices_past_the_threshold(tiny_llama, token_windows) -> None:
    compressed = _factored(tiny_llama, kept=0.5)
    reference = copy.deepcopy(compressed)
    rho = {n: m.rank * (m.in_features + m.out_features) / (m.in_features * m.out_features)
           for n, m in compressed.named_modules() if isinstance(m, LowRankLinear)}
    cut = sorted(rho.values())[len(rho) // 2]
    merged = densify_above(compressed, cut)
    assert sorted(merged) == sorted(n for n, r in rho.items() if r > cut) and 0 < len(merged) < len(rho)
    assert all(type(compressed.get_submodule(n)) is torch.nn.Linear for n in merged)
    _assert_same_function(compressed, reference, token_windows)
    with pytest.raises(ValueError, match="max_kept"):
        densify_above(compressed, 0.0)

"""Issue 17: bad input refused at the boundary, nothing non-finite written, no stale source, readable artifacts.

Each test is one case of the README's "Reliability" table, on the tiny model or on a few tensors; each failed on
the code before the issue (the artifact was written, the value passed silently or failed later and unclearly).
"""

from __future__ import annotations

import logging
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from lowrank.accounting import TargetShape
from lowrank.allocation import allocate, check_reachable, min_kept_fraction
from lowrank.data import calibration_windows, check_window_length, corpus_identity, token_stream
from lowrank.io import atomic_path, save_tensors, write_json
from lowrank.model import find_targets, materialize_source, resolve_source, source_fingerprint
from lowrank.whitening import whitening_factor


# ---- nothing non-finite is written ------------------------------------------------------------------------


def test_save_tensors_refuses_nan_naming_the_artifact_and_the_target(tmp_path):
    path = tmp_path / "stats" / "input_gram.safetensors"
    C = torch.eye(4)
    C[1, 2] = float("nan")
    C[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"input_gram\.safetensors: tensor 'C\.model\.layers\.0\.q' has 2 non-finite"):
        save_tensors(path, {"C.model.layers.0.q": C, "C.ok": torch.eye(2)})
    assert not path.exists() and (not path.parent.exists() or os.listdir(path.parent) == [])


def test_non_finite_weight_is_refused_when_the_source_is_resolved(tmp_path, tiny_llama):
    folder = tmp_path / "poisoned"
    with torch.no_grad():
        w = tiny_llama.model.layers[1].mlp.up_proj.weight
        w[0, :3] = float("nan")
    tiny_llama.save_pretrained(str(folder), safe_serialization=True)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight' has 3 non-finite"):
        materialize_source({"source": "hf", "path": str(folder)}, tmp_path / "out")


def test_whitening_message_does_not_send_a_float32_run_to_float32():
    C = torch.eye(3, dtype=torch.float64)
    C[0, 1] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite") as e:
        whitening_factor(C)
    assert "if runtime.dtype is float16 or bfloat16" in str(e.value)


# ---- atomic writes: mode and orphans ------------------------------------------------------------------------


def test_artifacts_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o002)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_tensors(tmp_path / "b.safetensors", {"t": torch.ones(2)})
    finally:
        os.umask(old)
    for name in ("a.json", "b.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o664


def test_orphaned_temp_file_is_removed_and_named_on_the_next_write(tmp_path, caplog):
    target = tmp_path / "factors.safetensors"
    orphan = tmp_path / ".factors.safetensors.k3j_x9ab.tmp"  # what a kill -9 inside atomic_path leaves
    orphan.write_bytes(b"\0" * 1000)
    other = tmp_path / ".other.safetensors.abcdefgh.tmp"  # another target's temp file is not ours to remove
    longer = tmp_path / ".factors.safetensors.bak.abcdefgh.tmp"  # nor one of "factors.safetensors.bak"
    for p in (other, longer):
        p.write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="lowrank"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
    assert not orphan.exists() and other.exists() and longer.exists() and target.read_bytes() == b"new"
    assert orphan.name in caplog.text and "interrupted" in caplog.text


# ---- no stale source: a content fingerprint of local model files -----------------------------------------


def _rewrite_in_place(folder, tiny_llama, value: float) -> None:
    with torch.no_grad():
        tiny_llama.model.layers[0].self_attn.q_proj.weight[0, 0] = value
    tiny_llama.save_pretrained(str(folder), safe_serialization=True)


@pytest.mark.parametrize("small_file_limit", [None, 0], ids=["full-hash", "header-and-mtime"])
def test_rewritten_weights_change_the_fingerprint(tmp_path, tiny_llama, monkeypatch, small_file_limit):
    if small_file_limit is not None:  # as for a large checkpoint: sizes + mtimes + safetensors headers
        monkeypatch.setattr("lowrank.model._SMALL_FILE", small_file_limit)
    folder = tmp_path / "model"
    tiny_llama.save_pretrained(str(folder), safe_serialization=True)
    spec = {"source": "hf", "path": str(folder)}
    before = source_fingerprint(spec)
    assert source_fingerprint(spec) == before  # deterministic
    folder_mtime = folder.stat().st_mtime_ns
    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    _rewrite_in_place(folder, tiny_llama, 0.125)
    os.utime(folder, ns=(folder_mtime, folder_mtime))  # in-place rewrites leave the folder's mtime alone
    if small_file_limit is not None:
        os.utime(weights, ns=(mtime + 10**9, mtime + 10**9))  # a coarse file system: at least a new second
    assert source_fingerprint(spec) != before


def test_fingerprint_of_a_random_init_covers_its_tokenizer_folder(tmp_path, tiny_llama_spec):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    spec = {**tiny_llama_spec, "tokenizer": str(tok)}
    before = source_fingerprint(spec)
    (tok / "tokenizer.json").write_text('{"a": 1}')
    assert source_fingerprint(spec) != before


# ---- sources: refused when resolved -------------------------------------------------------------------------


def test_missing_tokenizer_folder_is_not_taken_for_a_hub_id(tmp_path, tiny_llama_spec, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"tokenizer folder 'byte_tok' does not exist.*models.<key>.tokenizer"):
        resolve_source({**tiny_llama_spec, "tokenizer": "byte_tok"})
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for missing in (str(tmp_path / "tok"), "byte_tok"):  # a tokenizer is a local folder, online too
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve_source({**tiny_llama_spec, "tokenizer": missing})
    assert resolve_source({"source": "hf", "path": "org/model"})["hub"]  # a model path may still be a hub id


def test_typo_in_a_random_init_config_is_refused(tiny_llama_spec):
    spec = {**tiny_llama_spec, "config": {**tiny_llama_spec["config"], "num_hiden_layers": 1}}
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'num_hiden_layers' \(did you mean \['num_hidden_layers'"):
        resolve_source(spec)
    with pytest.raises(ValueError, match="not a transformers model type"):
        resolve_source({**tiny_llama_spec, "model_type": "lama"})


# ---- corpora and windows ----------------------------------------------------------------------------------------


def test_empty_text_file_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt' is empty"):
        corpus_identity({"kind": "text_files", "paths": [str(tmp_path / "empty.txt")]})


def test_whitespace_only_text_is_refused_before_any_reduction(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n  \n")

    def tokenizer(text, add_special_tokens=False):
        return {"input_ids": [int(c) for c in text.split()]}

    with pytest.raises(ValueError, match="has no tokens"):
        token_stream({"kind": "text_files", "paths": [str(tmp_path / "blank.txt")]}, tokenizer)


@pytest.mark.parametrize("tokens, match", [
    (torch.tensor([3, 4, -1, 5, -2]), "2 negative token ids"),
    (torch.tensor([3.0, 4.7, 5.2]), "dtype F32; token ids must be integers"),
])
def test_bad_token_ids_are_refused(tmp_path, tokens, match):
    path = tmp_path / "tokens.safetensors"
    save_file({"tokens": tokens}, str(path))
    with pytest.raises(ValueError, match=match):
        token_stream({"kind": "tokens", "path": str(path)}, None)


def test_more_calibration_windows_than_distinct_windows_is_refused():
    stream = torch.arange(40)
    calibration_windows(stream, n=31, seq_len=10, seed=0)  # 31 distinct offsets: fine
    with pytest.raises(ValueError, match=r"n_samples=32 .* only 31 distinct windows.*<= 31"):
        calibration_windows(stream, n=32, seq_len=10, seed=0)


def test_windows_beyond_the_position_embeddings_are_refused():
    check_window_length("evaluation", 128, 128)
    check_window_length("evaluation", 4096, None)  # a config that does not say: not checked
    with pytest.raises(ValueError, match=r"evaluation.seq_len 256 exceeds .* 128; set evaluation.seq_len <= 128"):
        check_window_length("evaluation", 256, 128)


def test_pretrained_manifest_records_positions_and_target_shapes(tmp_path, tiny_llama_spec):
    arch = materialize_source(tiny_llama_spec, tmp_path / "hf")["architecture"]
    assert arch["max_positions"] == 128
    assert len(arch["target_shapes"]) == arch["n_targets"] == 14


# ---- ratios: the real lower bound --------------------------------------------------------------------------------


def test_ratio_floor_is_the_real_bound_of_allocate(tiny_llama):
    shapes = {t.name: t.shape for t in find_targets(tiny_llama)}
    floor = min_kept_fraction(list(shapes.values()))
    assert 0 < floor < 0.1
    with pytest.raises(ValueError, match=r"ratio 0.001 is below 0.0\d+, .* use ratios >= 0.0"):
        check_reachable(list(shapes.values()), 0.001)
    scores = {n: -torch.linspace(1, 0, s.full_rank) for n, s in shapes.items()}
    below, at = floor * 0.99, floor * 1.001
    for allocator in ("uniform", "zero_sum"):
        allocate(allocator, shapes, at, scores)  # just above the bound: allocate meets it
        with pytest.raises(ValueError):
            allocate(allocator, shapes, below, scores)  # just below: allocate cannot, as the check says
    check_reachable(list(shapes.values()), at)
    with pytest.raises(ValueError):
        check_reachable(list(shapes.values()), below)


def test_ratio_floor_counts_the_greedy_rank_floor():
    shapes = [TargetShape(64, 64), TargetShape(128, 64)]
    assert min_kept_fraction(shapes, 0.5) > min_kept_fraction(shapes, 0.0)
    with pytest.raises(ValueError, match="min_rank_fraction 0.5"):
        check_reachable(shapes, min_kept_fraction(shapes, 0.0) * 1.01, 0.5)


# ---- cases not listed in the issue ------------------------------------------------------------------------------


def test_truncated_safetensors_file_is_refused_by_name(tmp_path, tiny_llama):
    folder = tmp_path / "model"
    tiny_llama.save_pretrained(str(folder), safe_serialization=True)
    weights = folder / "model.safetensors"
    source_fingerprint({"source": "hf", "path": str(folder)})  # complete: fine
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # an interrupted copy
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=rf"model.safetensors is truncated or padded: .* {size} bytes, the file has "
                                         rf"{size // 2}; copy or download it again"):
        source_fingerprint({"source": "hf", "path": str(folder)})


def test_disk_full_during_a_write_keeps_the_old_artifact_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    target = tmp_path / "scores.safetensors"
    save_tensors(target, {"s": torch.ones(3)})
    old = target.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lowrank.io.save_file", full)
    with pytest.raises(OSError, match="No space left"):
        save_tensors(target, {"s": torch.zeros(3)})
    assert target.read_bytes() == old and os.listdir(tmp_path) == ["scores.safetensors"]

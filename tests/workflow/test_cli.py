"""The `lowrank` console script: --help lists the recipes; `lowrank compress` on a local HF folder (a tiny LLaMA with
a byte tokenizer, written here) runs the Snakemake DAG, prints a line per job and the perplexities, and a second
call recomputes nothing; the embedded model plans the same DAG."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wf import REPO, offline_env, planned_jobs, tiny_config, word_lines, write_byte_tokenizer

from lowrank.io import read_json

TINY = tiny_config()["models"]["tiny-llama"]["config"]  # the tests' one tiny LLaMA (tests/data/tiny.yaml)


def lowrank(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lowrank.cli", *args], capture_output=True, text=True,
                          env=offline_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"lowrank {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny random LLaMA saved as a Hugging Face folder with its (byte-level) tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("cli") / "My Tiny-Llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(str(folder))
    write_byte_tokenizer(folder)
    return folder


def test_help_lists_every_recipe_of_the_full_table() -> None:
    out = lowrank("--help").stdout
    for name in yaml.safe_load((REPO / "config" / "full.yaml").read_text())["methods"]:
        assert f"  {name} " in out, name
    assert "zs-svd-remap     input_gram/tail_curvature/zero_sum + int8 remap" in out
    assert "svd-llm-refine   input_gram/sigma/uniform + refine closed_form" in out
    bad = lowrank("compress", "x", "--method", "zs-svdd", check=False)
    assert bad.returncode == 2 and "zs-svdd" in bad.stderr


@pytest.mark.parametrize("flag, value, says", [
    ("--ratio", "abc", "not a kept fraction in (0, 1]"), ("--ratio", "1.5", "not a kept fraction in (0, 1]"),
    ("--samples", "0", "not a positive integer"), ("--seq-len", "-5", "not a positive integer"),
    ("--eval-windows", "2.5", "not a positive integer"), ("--size-b", "nan", "not a positive number"),
    ("--cores", "0", "neither a positive integer nor 'all'")])
def test_bad_numbers_are_refused_before_any_file_is_written(tmp_path: Path, flag: str, value: str,
                                                            says: str) -> None:
    bad = lowrank("compress", "embedded", "--method", "svd-llm", flag, value, "--out", str(tmp_path / "o"),
                  check=False)
    assert bad.returncode == 2 and f"argument {flag}:" in bad.stderr and value in bad.stderr and says in bad.stderr
    assert not (tmp_path / "o").exists()


def test_compress_a_local_hf_folder_then_rerun_does_nothing(hf_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "calib.txt").write_text(word_lines(400, seed=2))
    (tmp_path / "heldout.txt").write_text(word_lines(200, seed=3))
    out = tmp_path / "out"
    args = [str(hf_folder), "--method", "zs-svd", "--ratio", "0.5", "--calibration", str(tmp_path / "calib.txt"),
            "--evaluation", str(tmp_path / "heldout.txt"), "--samples", "8", "--seq-len", "32",
            "--eval-windows", "4", "--out", str(out), "--cores", "2"]
    proc = lowrank("compress", *args, "--", "--max-threads", "1")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["models"] == {"my-tiny-llama": {"source": "hf", "path": str(hf_folder)}}
    assert list(cfg["methods"]) == ["zs-svd"] and cfg["ratios"] == [0.5]
    assert cfg["calibration"]["corpus"] == {"kind": "text_files", "paths": [str(tmp_path / "calib.txt")]}
    lines = proc.stdout.splitlines()
    # one progress line per job (pretrained, 2 windows, input_gram, first_order scores, the decomposition, allocate,
    # truncate, 2 evaluations, the Hugging Face folder, summarize, all), the last one complete
    progress = [ln for ln in lines if ln.startswith("[")]
    assert len(progress) == 13 and progress[-1].startswith("[13/13]")
    assert any(ln.startswith("[") and "export_hf_folder (" in ln for ln in progress)
    assert any("truncate (model=my-tiny-llama, method=zs-svd, ratio=0.50)" in ln for ln in progress)
    res = out / "results" / "my-tiny-llama"
    dense = read_json(res / "pretrained/eval/ppl.json")["ppl"]
    rec = read_json(res / "zs-svd/0.50/eval/ppl.json")
    assert f"dense: ppl {dense:.2f}" in lines
    assert f"zs-svd kept 0.50: ppl {rec['ppl']:.2f}, model in {out / 'results/my-tiny-llama/zs-svd/0.50/hf'}" \
        in lines
    assert (res / "zs-svd/0.50/hf/config.json").is_file()
    assert rec["kept_bytes_fraction"] <= 0.5 and 1 < dense < 1e4 and 1 < rec["ppl"] < 1e5
    assert (out / rec["compressed_dir"] / "factors.safetensors").is_file()
    # the same command again: Snakemake's rerun rules apply, nothing is recomputed
    again = lowrank("compress", *args, "--", "--max-threads", "1")
    assert not [ln for ln in again.stdout.splitlines() if ln.startswith("[")]
    assert f"dense: ppl {dense:.2f}" in again.stdout.splitlines()


def test_compress_the_embedded_model_plans_the_dag(tmp_path: Path) -> None:
    proc = lowrank("compress", "embedded", "--method", "zs-svd-remap", "--ratio", "0.8", "--ratio", "0.4",
                   "--out", str(tmp_path / "out"), "--dry-run")
    cfg = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert cfg["models"]["smollm2-135m"]["source"] == "gguf_package" and cfg["ratios"] == [0.8, 0.4]
    jobs = planned_jobs(proc)
    assert jobs["quantize"] == 2 and jobs["evaluate_compressed"] == 2 and "truncate" not in jobs
    assert not (tmp_path / "out" / "results").exists()

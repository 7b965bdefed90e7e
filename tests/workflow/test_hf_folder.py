"""The DAG's self-contained HF folder of a tiny compressed model (rule export_hf_folder): copied alone to a fresh
temporary directory, `AutoModelForCausalLM.from_pretrained` gives the pipeline's perplexity and parameter count.

Cost: one tiny-DAG run of 8 jobs (module-scoped), about a minute on 2 shared cores.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from wf import planned_jobs, snakemake, tiny_config, write_workdir

from lowrank.evaluation import model_size, perplexity
from lowrank.factorized import LowRankLinear
from lowrank.io import load_tensors, read_json

TARGET = "results/tiny-llama/svd-llm/0.50/hf"


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory) -> Path:
    cfg = tiny_config()
    cfg["methods"] = {"svd-llm": cfg["methods"]["svd-llm"]}
    cfg["ratios"] = [0.5]
    cfg["export"] = {"hf_folder": True}
    cfg["evaluation"]["zeroshot"] = {"tasks": []}
    cfg["evaluation"]["speed"] = {"enabled": False}
    wd = write_workdir(tmp_path_factory.mktemp("hf") / "run", cfg)
    snakemake(wd, TARGET)
    return wd


def test_the_copied_folder_loads_with_the_pipelines_perplexity(hf_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "fresh" / "svd-llm-0.50"
    shutil.copytree(hf_run / TARGET, folder)  # nothing else of results/ is there
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    expected = read_json(hf_run / "results/tiny-llama/svd-llm/0.50/eval/ppl.json")
    windows = load_tensors(hf_run / "results/tiny-llama/data/evaluation.safetensors")[0]["tokens"]
    got = perplexity(model, windows, batch_size=4)
    assert got["tokens"] == expected["tokens"]
    assert got["ppl"] == pytest.approx(expected["ppl"], rel=1e-4)
    size = model_size(model)
    assert size["total_params"] == expected["total_params"] and size["target_params"] == expected["target_params"]
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == expected["n_factored"] > 0
    tok = AutoTokenizer.from_pretrained(str(folder))  # the byte tokenizer came along
    text = "the king rose"
    assert tok(text).input_ids == AutoTokenizer.from_pretrained(str(hf_run / "byte_tokenizer"))(text).input_ids
    card = (folder / "README.md").read_text()
    assert f"{expected['ppl']:.4f}" in card and "svd-llm" in card and "kept 0.50" in card


def test_the_folder_is_up_to_date_after_the_run(hf_run: Path) -> None:
    assert planned_jobs(snakemake(hf_run, "-n", TARGET)) == {}

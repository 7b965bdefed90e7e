"""One Snakemake run of the whole DAG over every tiny architecture, with SVD-LLM, FWSVD and ASVD.

The models are the tiny random configs of tests/data/architectures.yaml (Llama, Mistral, Qwen2, Qwen3, Gemma 3,
Phi-3, GPT-2, OPT; Gemma 2 is covered by the unit tests only, to keep this run short). Nothing in the workflow
names an architecture: the same config with another model entry just works.

The three recipes reach each architecture's targets through each kind of statistic: forward hooks on their inputs
(SVD-LLM's input_gram, ASVD's act_scale) and backward passes through every block (FWSVD's fisher). Plain SVD reads
no statistic: it runs per architecture in tests/unit/test_architectures.py (full-rank truncation in every space)
and through the DAG on the tiny LLaMA (tests/workflow/test_pipeline_tiny.py); here it would add 40 jobs of Python
start-up to CI and no code path.

Cost: 8 models x 22 jobs + 2 = 178 jobs. The models are tiny; each job's time is its Python start-up (importing
torch and transformers, ~2.5-5 s of CPU), so the run takes ~12 CPU-minutes: about 6-7 minutes on 2 idle cores.
Hence the ``slow`` mark (deselect with -m "not slow").
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from wf import REPO, snakemake, write_workdir

from lowrank.io import load_tensors, read_json

SPECS = yaml.safe_load((REPO / "tests" / "data" / "architectures.yaml").read_text())
MODELS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "gpt2", "opt"]
METHODS = {
    "svd-llm": {"whitening": "input_gram", "scorer": "sigma", "allocator": "uniform"},
    "fwsvd": {"whitening": "fisher", "scorer": "sigma", "allocator": "uniform"},
    "asvd": {"whitening": "act_scale", "scorer": "sigma", "allocator": "uniform"},
}
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
           "gpt2": "GPT2LMHeadModel", "opt": "OPTForCausalLM"}
N_TARGETS = {"phi3": 8, "gpt2": 8, "opt": 12}  # 2 blocks; the others have q, k, v, o, gate, up, down per block

pytestmark = pytest.mark.slow


def _config() -> dict:
    return {
        "models": {k: SPECS[k] for k in MODELS},
        "methods": METHODS,
        "ratios": [0.5],
        "calibration": {"corpus": {"kind": "tokens", "path": "calibration_tokens.safetensors"}, "n_samples": 8,
                        "seq_len": 16, "batch_size": 4},
        "evaluation": {"corpus": {"kind": "tokens", "path": "evaluation_tokens.safetensors"}, "seq_len": 16,
                       "max_windows": 4,
                       # no tokenizers or text here, so no zero-shot; speed is covered by tests/unit/test_speed.py
                       "zeroshot": {"tasks": []}, "speed": {"enabled": False}},
        "statistics": {"fisher": {"max_windows": 2}},
        "runtime": {"device": "cpu"},
        "export": {"hf_folder": False},  # the folders are tested in tests/unit/test_hf_format.py
    }


@pytest.fixture(scope="module")
def arch_run(tmp_path_factory) -> Path:
    wd = write_workdir(tmp_path_factory.mktemp("architectures") / "run", _config())
    snakemake(wd)
    return wd


def test_every_architecture_and_method_is_evaluated(arch_run: Path) -> None:
    r = arch_run / "results"
    for model in MODELS:
        manifest = read_json(r / model / "pretrained/manifest.json")
        assert manifest["architecture"]["class"] == CLASSES[model]
        assert manifest["architecture"]["n_targets"] == N_TARGETS.get(model, 14)
        for stat in ("input_gram", "act_scale", "fisher"):  # one file per kind, shared by every method
            assert (r / model / f"pretrained/stats/{stat}.safetensors").is_file(), (model, stat)
        dense = read_json(r / model / "pretrained/eval/ppl.json")["ppl"]
        assert math.isfinite(dense)
        for method in METHODS:
            ev = read_json(r / model / method / "0.50/eval/ppl.json")
            assert math.isfinite(ev["ppl"]) and ev["ppl"] > 1, (model, method, ev["ppl"])
            alloc = read_json(r / model / method / "0.50/allocation.json")
            assert alloc["kept_fraction"] <= 0.5 + 1e-12


def test_the_table_has_every_row(arch_run: Path) -> None:
    table = pd.read_csv(arch_run / "results/summary/table.csv")
    ppl = table[table.metric == "ppl"]
    assert len(ppl) == len(MODELS) * (1 + len(METHODS))
    assert set(ppl.model) == set(MODELS)
    assert set(ppl.method) == {"dense", *METHODS}
    assert ppl.value.map(math.isfinite).all()


def test_statistics_record_their_alpha(arch_run: Path) -> None:
    for model in MODELS:
        _, meta = load_tensors(arch_run / "results" / model / "pretrained/stats/act_scale.safetensors")
        assert meta["kind"] == "act_scale" and meta["alpha"] == 0.5
        _, meta = load_tensors(arch_run / "results" / model / "pretrained/stats/fisher.safetensors")
        assert meta["kind"] == "fisher" and meta["alpha"] == 1.0 and meta["batches"] == 2

"""Prehab / rehab through Snakemake on the tiny LLaMA: who plans what, the bad-input errors, and a full run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from wf import PREHAB, REPO, planned_jobs, snakemake, tiny_config, write_workdir

from lowrank.checkpoint import load_compressed
from lowrank.io import read_json
from lowrank.model import find_targets, linear_weight, load_model

SCHEMA = str(REPO / "schemas" / "config.schema.yaml")


def prehab_config() -> dict:
    cfg = tiny_config()
    cfg["methods"] = {"svd-llm": cfg["methods"]["svd-llm"],
                      "prehab-svd-llm": {"whitening": "input_gram", "scorer": "sigma", "allocator": "uniform",
                                         "prehab": True}}
    cfg["ratios"] = [0.5]
    cfg["prehab"] = dict(PREHAB)
    return cfg


def test_a_config_without_prehab_plans_no_prehab_job(tmp_path: Path) -> None:
    jobs = planned_jobs(snakemake(write_workdir(tmp_path / "run"), "-n"))
    assert jobs and "prehab" not in jobs and "prehab_report" not in jobs and "rehab" not in jobs
    # with a prehab recipe beside: the non-prehab recipe's own chain still reads only pretrained files
    wd = write_workdir(tmp_path / "run2", prehab_config())
    proc = snakemake(wd, "-n", "results/tiny-llama/svd-llm/0.50/eval/ppl.json")
    assert "prehab" not in planned_jobs(proc)
    jobs = planned_jobs(snakemake(wd, "-n"))
    assert jobs["prehab"] == 1 and jobs["prehab_report"] == 1
    assert jobs["calibration_stats"] == 2  # input_gram of the pretrained and of the prehab model
    assert jobs["evaluate_source"] == 2
    # reuse_prehab_whitening: prehab recipes read the pretrained statistics, no second input_gram
    cfg = prehab_config()
    cfg["prehab"]["reuse_prehab_whitening"] = True
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    jobs = planned_jobs(snakemake(wd, "-n"))
    assert jobs["calibration_stats"] == 1 and jobs["prehab"] == 1


@pytest.mark.parametrize("edit, match", [
    ({"prehab": {"surrogate": "frobenius"}}, "frobenius"),
    ({"prehab": {"lambda_max": -1.0}}, "lambda_max"),
    ({"prehab": {"steps": 0}}, "steps"),
])
def test_out_of_range_settings_fail_validation_by_name(edit: dict, match: str) -> None:
    cfg = prehab_config()
    cfg["prehab"].update(edit["prehab"])
    with pytest.raises(WorkflowError, match=match):
        validate(cfg, SCHEMA)


def test_a_prehab_recipe_without_statistics_fails_at_parse_time_with_the_fix(tmp_path: Path) -> None:
    cfg = prehab_config()
    cfg["methods"]["prehab-svd-llm"]["whitening"] = "none"
    proc = snakemake(write_workdir(tmp_path / "run", cfg), "-n", check=False)
    assert proc.returncode != 0
    assert "'prehab-svd-llm' has prehab: true but whitening 'none'" in proc.stdout + proc.stderr
    assert "Set whitening: input_gram" in proc.stdout + proc.stderr


def test_prehab_and_rehab_run_end_to_end(tiny_dag: Path) -> None:
    """prehab-svd-llm (3 prehab steps, 2 rehab steps) of the shared run (conftest.tiny_dag)."""
    wd = tiny_dag
    r = wd / "results"
    man = read_json(r / "tiny-llama/prehab/manifest.json")
    assert len(man["history"]) == 3 and man["history"][-1]["lambda"] == 1.0
    assert not (r / "tiny-llama/prehab/checkpoint.safetensors").exists()  # removed once the run completed
    pre = load_model(r / "tiny-llama/prehab/manifest.json")
    base = load_model(r / "tiny-llama/pretrained/manifest.json")
    moved = [t.name for t in find_targets(base)
             if not torch.equal(linear_weight(pre.get_submodule(t.name)), linear_weight(base.get_submodule(t.name)))]
    assert len(moved) == len(find_targets(base))
    assert torch.equal(pre.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert man["ranks"]["after"]["mean_stable_rank"] < man["ranks"]["before"]["mean_stable_rank"]
    # the prehab recipe truncated the prehab model with its own statistics; evaluation read the rehab stage
    stage0 = read_json(r / "tiny-llama/prehab-svd-llm/0.50/stage0/manifest.json")
    assert stage0["base_manifest"].endswith("prehab/manifest.json")
    reh = read_json(r / "tiny-llama/prehab-svd-llm/0.50/rehab/manifest.json")
    assert reh["history"][-1]["ce"] < reh["history"][0]["ce"] + 0.5
    model = load_compressed(r / "tiny-llama/prehab-svd-llm/0.50/rehab")
    assert sum(1 for _ in model.modules() if type(_).__name__ == "LowRankLinear") == len(reh["ranks"])
    report = read_json(r / "summary/prehab.json")["rows"]
    assert len(report) == 1 and {row["without"] for row in report} == {"svd-llm"}  # one row per kept fraction
    assert all(row["ppl_with_prehab"] > 0 and row["ppl_without_prehab"] > 0 for row in report)
    assert (r / "summary/plots/prehab_spectra.png").stat().st_size > 10_000
    assert planned_jobs(snakemake(wd, "-n")) == {}

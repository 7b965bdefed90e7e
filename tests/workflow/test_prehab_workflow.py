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
    assert (r / "summary/plots/prehab_history.png").stat().st_size > 10_000
    assert planned_jobs(snakemake(wd, "-n")) == {}


def control_config(plan: bool = True) -> dict:
    """prehab_config plus the λ = 0 control recipe and (optionally) a plan: SVD-LLM's ranks at kept 0.5."""
    cfg = prehab_config()
    cfg["methods"]["prehab-control-svd-llm"] = {**cfg["methods"]["prehab-svd-llm"], "prehab": "control"}
    if plan:
        cfg["prehab"].update(surrogate="tail_energy", plan={"method": "svd-llm", "ratio": 0.5})
    return cfg


def test_the_control_source_and_the_plan_are_planned(tmp_path: Path) -> None:
    """`prehab: control` adds the prehab-control source (its own prehab job, statistics and dense row); the plan's
    allocation on the pretrained model is an input of both prehab jobs."""
    wd = write_workdir(tmp_path / "run", control_config())
    validate(control_config(), SCHEMA)
    jobs = planned_jobs(snakemake(wd, "-n"))
    assert jobs["prehab"] == 2 and jobs["prehab_report"] == 1
    assert jobs["calibration_stats"] == 3 and jobs["evaluate_source"] == 3  # pretrained, prehab, control
    for source in ("prehab", "prehab-control"):
        only = planned_jobs(snakemake(wd, "-n", f"results/tiny-llama/{source}/manifest.json"))
        assert only["prehab"] == 1 and only["allocate"] == 1  # svd-llm at 0.50 on the pretrained model
        assert "truncate" not in only


@pytest.mark.parametrize("edit, match", [
    ({"plan": {"method": "nope", "ratio": 0.5}}, "prehab.plan.method 'nope' is not a recipe"),
    ({"plan": {"method": "prehab-svd-llm", "ratio": 0.5}}, "compresses the prehab model"),
    ({"plan": None}, "tail_energy needs prehab.plan"),
])
def test_a_bad_plan_fails_at_parse_time_with_the_fix(tmp_path: Path, edit: dict, match: str) -> None:
    cfg = control_config()
    cfg["prehab"].update(edit)
    proc = snakemake(write_workdir(tmp_path / "run", cfg), "-n", check=False)
    assert proc.returncode != 0
    assert match in proc.stdout + proc.stderr


@pytest.mark.slow
def test_prehab_with_a_plan_and_its_control_end_to_end(tmp_path: Path) -> None:
    """The tail surrogate at SVD-LLM's planned ranks and its λ = 0 control, run to the prehab report: the
    control trains on CE only (λ 0 at every step, the same batches), the planned tail is recorded at every step
    of both and falls further with the surrogate, and the report sets the prehab row beside its control."""
    cfg = control_config()
    cfg["prehab"].update(lambda0=10.0, lambda_max=10.0, warmup_steps=0)
    wd = write_workdir(tmp_path / "run", cfg)
    snakemake(wd, "results/summary/prehab.json")
    r = wd / "results/tiny-llama"
    pre, ctl = read_json(r / "prehab/manifest.json"), read_json(r / "prehab-control/manifest.json")
    assert ctl["source"]["kind"] == "prehab-control" and pre["source"]["kind"] == "prehab"
    assert [h["lambda"] for h in ctl["history"]] == [0.0] * 3 and ctl["prehab"]["lambda_max"] == 0.0
    assert all(h["tail"] is not None for h in pre["history"] + ctl["history"])
    assert pre["history"][0]["tail"] == pytest.approx(ctl["history"][0]["tail"], rel=1e-6)  # same start
    assert pre["history"][-1]["tail"] < ctl["history"][-1]["tail"]
    row = read_json(wd / "results/summary/prehab.json")["rows"][0]
    assert row["control"] == "prehab-control-svd-llm" and row["without"] == "svd-llm"
    assert row["ppl_control"] > 0 and row["gain_over_control"] == pytest.approx(
        1 - row["ppl_with_prehab"] / row["ppl_control"])
    assert row["planned_tail_end"] < row["planned_tail_end_control"]

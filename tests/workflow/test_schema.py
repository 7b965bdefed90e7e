"""Config validation: the schema is the single definition of keys; typos and bad values fail loudly."""

from __future__ import annotations

import copy

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from wf import REPO, planned_jobs, snakemake, tiny_config, write_workdir

SCHEMA = str(REPO / "schemas" / "config.schema.yaml")


def schema() -> dict:
    return yaml.safe_load(open(SCHEMA))


def test_default_config_is_valid_and_defaults_are_filled() -> None:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    validate(cfg, SCHEMA)
    assert cfg["ratios"] == [0.8, 0.6, 0.4]
    full = yaml.safe_load((REPO / "config" / "full.yaml").read_text())
    validate(full, SCHEMA)
    assert cfg["models"]["smollm2-135m"]["source"] == "gguf_package"
    tiny = tiny_config()
    validate(tiny, SCHEMA)
    assert tiny["whitening"]["damping"] == 1e-6  # filled from the schema default
    assert tiny["calibration"]["seed"] == 3


@pytest.mark.parametrize("path", [("ratioss",), ("calibration", "n_sample"), ("methods", "svd", "scorr")])
def test_misspelt_key_is_rejected_by_name(path: tuple[str, ...]) -> None:
    cfg = tiny_config()
    node = cfg
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = 1
    with pytest.raises(WorkflowError, match=path[-1]):
        validate(cfg, SCHEMA)


@pytest.mark.parametrize("bad", [0.0, -0.2, 1.5])
def test_ratio_outside_unit_interval_is_rejected(bad: float) -> None:
    cfg = tiny_config()
    cfg["ratios"] = [0.5, bad]
    with pytest.raises(WorkflowError, match="ratios"):
        validate(cfg, SCHEMA)


def test_ratio_one_is_accepted() -> None:
    cfg = tiny_config()
    cfg["ratios"] = [1.0]
    validate(cfg, SCHEMA)


def test_enums_equal_the_registries() -> None:
    from lowrank.allocation import ALLOCATORS
    from lowrank.calibration import STAT_LOADERS, STATS
    from lowrank.scoring import SCORERS
    from lowrank.spaces import SPACES

    method = schema()["$defs"]["method"]["properties"]
    assert set(method["scorer"]["enum"]) == set(SCORERS)
    assert set(method["allocator"]["enum"]) == set(ALLOCATORS)
    assert set(method["whitening"]["enum"]) == set(SPACES)
    assert {s.stat for s in SPACES.values() if s.stat} <= set(STATS) == set(STAT_LOADERS)


def _dry_run_error(tmp_path, mutate) -> str:
    cfg = tiny_config()
    mutate(cfg)
    wd = write_workdir(tmp_path / "run", cfg)
    proc = snakemake(wd, "-n", check=False)
    assert proc.returncode != 0
    assert not (wd / "results").exists(), "a rejected config must not leave artifacts"
    return proc.stdout + proc.stderr


def test_typo_fails_the_workflow_with_the_key_named(tmp_path) -> None:
    out = _dry_run_error(tmp_path, lambda c: c.update(ratioz=[0.5]))
    assert "ratioz" in out


def test_greedy_allocator_needs_comparable_scores(tmp_path) -> None:
    def mutate(c):
        c["methods"]["svd"]["allocator"] = "zero_sum"

    out = _dry_run_error(tmp_path, mutate)
    assert "method 'svd'" in out and "first_order" in out


def test_missing_model_folder_is_named(tmp_path) -> None:
    def mutate(c):
        c["models"] = {"gone": {"source": "hf", "path": str(tmp_path / "no-such-model")}}

    out = _dry_run_error(tmp_path, mutate)
    assert "no-such-model" in out and "models.gone" in out


def test_missing_corpus_file_is_named(tmp_path) -> None:
    def mutate(c):
        c["evaluation"]["corpus"] = {"kind": "text_files", "paths": [str(tmp_path / "absent*.txt")]}

    out = _dry_run_error(tmp_path, mutate)
    assert "absent*.txt" in out


def test_overlapping_calibration_and_evaluation_text_is_rejected(tmp_path) -> None:
    def mutate(c):
        c["evaluation"]["corpus"] = copy.deepcopy(c["calibration"]["corpus"])

    out = _dry_run_error(tmp_path, mutate)
    assert "overlap" in out


def test_reserved_method_name_is_rejected(tmp_path) -> None:
    out = _dry_run_error(tmp_path, lambda c: c["methods"].update(dense=dict(c["methods"]["svd"])))
    assert "reserved" in out


def test_dry_run_plans_one_statistics_job_for_all_methods_and_ratios(workdir) -> None:
    jobs = planned_jobs(snakemake(workdir, "-n"))
    # 3 methods x 2 ratios share one input-gram job and one token-window job per split; scores are per
    # (whitening, scorer): none/sigma, input_gram/sigma, input_gram/first_order; one stored decomposition per
    # space (none, input_gram) that all six truncations cut from; zs-svd adds one correction stage
    assert jobs == {"all": 1, "pretrained": 1, "token_windows": 2, "calibration_stats": 1, "score_components": 3,
                    "decompose": 2, "allocate": 6, "truncate": 6, "correct": 2, "evaluate_compressed": 6,
                    "evaluate_source": 1,
                    "summarize": 1,
                    # one offline zero-shot task shared by all; zero-shot and speed per model (dense + 6)
                    "next_line_task": 1, "evaluate_zeroshot_source": 1, "evaluate_zeroshot": 6,
                    "measure_speed_source": 1, "measure_speed": 6}


def test_sensitivity_allocator_plans_its_statistics(workdir) -> None:
    cfg = tiny_config()
    cfg["methods"] = {"asvd-sens": {"whitening": "act_scale", "scorer": "sigma", "allocator": "sensitivity"}}
    write_workdir(workdir, cfg)
    jobs = planned_jobs(snakemake(workdir, "-n"))
    # act_scale for the space, asvd_sensitivity for the allocator
    assert jobs["calibration_stats"] == 2 and jobs["allocate"] == 2 and jobs["truncate"] == 2
    assert jobs["decompose"] == 1  # both ratios cut from one decomposition
    cfg["decomposition"] = {"share": False}  # each truncation decomposes the weights itself
    write_workdir(workdir, cfg)
    jobs = planned_jobs(snakemake(workdir, "-n"))
    assert "decompose" not in jobs and jobs["truncate"] == 2


def test_recipes_with_one_allocation_plan_one_allocate_job(workdir) -> None:
    """A recipe that differs from an earlier one only after the allocation copies that recipe's allocation.json
    (no second allocate job); one field the allocation reads (here the progressive stages) gives it its own."""
    cfg = tiny_config()
    zs = {"whitening": "input_gram", "scorer": "tail_curvature", "allocator": "zero_sum"}
    cfg["methods"] = {"zs": zs, "zs-corr": {**zs, "correction": {"stages": 1}},
                      "zs-refine": {**zs, "refine": {"mode": "closed_form"}},
                      "zs-staged": {**zs, "allocation_stages": [0.7]}}
    write_workdir(workdir, cfg)
    proc = snakemake(workdir, "-n", "-p")
    jobs = planned_jobs(proc)
    assert jobs["allocate"] == 2 * 2 and jobs["share_allocation"] == 2 * 2  # zs and zs-staged allocate, 2 ratios
    assert jobs["truncate"] == 4 * 2  # the stages after it stay per recipe
    assert "cp results/tiny-llama/zs/0.50/allocation.json results/tiny-llama/zs-refine/0.50/allocation.json" in (
        proc.stdout + proc.stderr)


def test_full_config_merged_over_the_default_is_the_full_config() -> None:
    """`--configfile config/full.yaml` is merged over config.yaml (nested dicts key by key): full.yaml must hold
    every recipe and every key of config.yaml, so that the merge is exactly full.yaml."""
    from snakemake.utils import update_config

    default = yaml.safe_load((REPO / "config.yaml").read_text())
    full = yaml.safe_load((REPO / "config" / "full.yaml").read_text())
    merged = copy.deepcopy(default)
    update_config(merged, full)
    assert merged == full
    assert set(default["methods"]) < set(full["methods"])
    assert not default["evaluation"]["zeroshot"]["tasks"] and not default["evaluation"]["speed"]["enabled"]


# the headline of `snakemake --cores all`: dense + svd-llm, zs-svd, zs-svd-remap at kept 0.8 / 0.6 / 0.4
DEFAULT_JOBS = {"all": 1, "pretrained": 1, "token_windows": 2, "calibration_stats": 1, "evaluate_source": 1,
                "score_components": 2, "decompose": 1, "allocate": 9, "truncate": 6, "quantize": 3,
                "evaluate_compressed": 9,
                "export_hf_folder": 9, "summarize": 1}


def test_default_and_full_commands_plan_the_short_and_the_full_table(tmp_path) -> None:
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "config.yaml").write_text((REPO / "config.yaml").read_text())
    assert planned_jobs(snakemake(wd, "-n")) == DEFAULT_JOBS
    full = yaml.safe_load((REPO / "config" / "full.yaml").read_text())
    jobs = planned_jobs(snakemake(wd, "-n", "--configfile", str(REPO / "config" / "full.yaml")))
    n = len(full["methods"]) * len(full["ratios"])
    assert jobs["evaluate_compressed"] == jobs["evaluate_zeroshot"] == jobs["measure_speed"] == n
    # svd-llm-refine / -rehab copy svd-llm's allocation, zs-svd-refine / -corr zs-svd's, io-svd-refine io-svd's
    assert jobs["share_allocation"] == 5 * len(full["ratios"]) and jobs["allocate"] + jobs["share_allocation"] == n
    assert jobs["export_hf_folder"] == n and jobs["refine"] == 3 * len(full["ratios"])
    assert jobs["prehab"] == 2  # the prehab model and its lambda = 0 control
    assert jobs["evaluate_zeroshot_source"] == jobs["measure_speed_source"] == 1

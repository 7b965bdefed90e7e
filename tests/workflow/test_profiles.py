"""Cluster and workstation profiles: Snakemake accepts them in a dry run, and GPU requests follow the model size."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import yaml

from wf import REPO, snakemake, tiny_config, write_workdir

SLURM = str(REPO / "profiles" / "slurm")
GPU_RULES = {"calibration_stats", "score_components", "truncate", "correct", "evaluate_source",
             "evaluate_compressed", "evaluate_zeroshot_source", "evaluate_zeroshot", "measure_speed_source",
             "measure_speed", "quantize", "prehab", "rehab"}


def _resources(stdout: str) -> dict[str, list[dict[str, str]]]:
    """rule -> the resources line of each planned job, parsed into key=value pairs."""
    out: dict[str, list[dict[str, str]]] = {}
    rule = None
    for line in stdout.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line)
        if m:
            rule = m.group(1)
        elif rule and line.strip().startswith("resources:"):
            pairs = dict(p.split("=", 1) for p in line.split(":", 1)[1].strip().split(", ") if "=" in p)
            out.setdefault(rule, []).append(pairs)
    return out


def test_profile_files_use_only_resource_keys_for_what_the_plugin_manages() -> None:
    cfg = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    assert cfg["executor"] == "slurm"
    assert set(cfg["set-resources"]) == GPU_RULES
    for res in [cfg["default-resources"], *cfg["set-resources"].values()]:
        assert not re.search(r"--(gres|gpus|partition|mem|time)", str(res.get("slurm_extra", "")))
    parts = yaml.safe_load((REPO / "profiles/slurm/partitions.yaml").read_text())["partitions"]
    assert parts["cpu"].get("max_gpu", 0) == 0 and parts["gpu"]["max_gpu"] >= 1


@pytest.mark.skipif(importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
                    reason="pip install snakemake-executor-plugin-slurm (the `test` extra installs it)")
def test_slurm_profile_dry_run_requests_gpus_only_for_big_models(tmp_path) -> None:
    cfg = tiny_config()
    cfg["runtime"]["device"] = "auto"
    big = dict(cfg["models"]["tiny-llama"], size_b=7.0)  # sized like a 7B model; a dry run instantiates nothing
    cfg["models"]["big-llama"] = big
    wd = write_workdir(tmp_path / "run", cfg)
    proc = snakemake(wd, "--profile", SLURM, "-n")
    res = _resources(proc.stdout)
    assert "This was a dry-run" in proc.stdout
    # big-llama's model jobs ask for one GPU (with the profile's model) and more memory; tiny-llama's for none
    by_model = {"big": [], "tiny": []}
    for line_rule, block in re.findall(r"rule (\w+):\n((?:    .*\n)+)", proc.stdout):
        if line_rule not in GPU_RULES:
            continue
        gpu = int(re.search(r"[ ,]gpu=(\d+)", block).group(1))
        mem = int(re.search(r"mem_mb=(\d+)", block).group(1))
        by_model["big" if "big-llama" in block else "tiny"].append((gpu, mem))
    assert by_model["big"] and all(g == 1 and m >= 7 * 4000 for g, m in by_model["big"])
    # tiny-llama's jobs ask for no GPU and only the floors (4 GB, or 8 GB for the streamed stages)
    assert by_model["tiny"] and all(g == 0 and 4000 <= m < 8100 for g, m in by_model["tiny"])
    assert max(m for _, m in by_model["tiny"]) < min(m for _, m in by_model["big"])
    # the profile's GPU-only resources reach exactly the jobs that ask for a GPU (a CPU job with gpu_model would
    # ask SLURM for --gpus=a100:0 and die with "Invalid generic resource (gres) specification")
    for rule, jobs in res.items():
        for job in jobs:
            has_gpu = int(job.get("gpu", 0)) > 0
            assert ("gpu_model" in job) == has_gpu and ("cpus_per_gpu" in job) == has_gpu, (rule, job)
    assert any(job.get("gpu_model") == "a100" for jobs in res.values() for job in jobs)
    assert set(res) >= {"pretrained", "allocate", "summarize"}


def test_gpu_workstation_profile_dry_run(workdir) -> None:
    proc = snakemake(workdir, "--profile", str(REPO / "profiles" / "gpu-workstation"), "-n")
    assert "This was a dry-run" in proc.stdout


def test_gpu_workstation_profile_runs_gpu_jobs_on_a_cpu_only_machine(tmp_path) -> None:
    """A model sized for the GPU (size_b 1) under profiles/gpu-workstation on a machine without CUDA: the jobs that
    ask for the GPU (gpu=1 against the profile's gpu=1) run, one at a time, and fall back to the CPU."""
    cfg = tiny_config()
    cfg["models"]["tiny-llama"]["size_b"] = 1.0
    cfg["runtime"]["device"] = "auto"
    wd = write_workdir(tmp_path / "run", cfg)
    targets = ["results/tiny-llama/pretrained/eval/ppl.json", "results/tiny-llama/pretrained/eval/speed.json"]
    proc = snakemake(wd, "--profile", str(REPO / "profiles" / "gpu-workstation"), *targets)
    out = proc.stdout + proc.stderr
    res = _resources(out)
    gpu_rules = ("evaluate_source", "measure_speed_source")
    assert [job["gpu"] for r in gpu_rules for job in res[r]] == ["1", "1"]
    assert "gpu" not in res["pretrained"][0] and "gpu_model" not in str(res)
    # the two GPU jobs never overlap: each one's start is followed by its own finish
    names = "|".join(gpu_rules)
    events = re.findall(rf"^(?:(?:local)?rule ({names}):|Finished jobid: \d+ \(Rule: ({names})\))", out, flags=re.M)
    order = [("start", a) if a else ("end", b) for a, b in events]
    assert len(order) == 4 and order[0][0] == "start" and order[1] == ("end", order[0][1]) and order[2][0] == "start"
    assert all((wd / t).is_file() for t in targets)
    log = (wd / "logs/evaluate_source/tiny-llama/pretrained.log").read_text()
    assert "device=cpu" in log  # runtime.device auto: no CUDA here, so the CPU
    ppl = json.loads((wd / targets[0]).read_text())["ppl"]
    assert 1 < ppl < 1e6


def test_a_profile_naming_a_missing_executor_plugin_fails_naming_it(tmp_path, workdir) -> None:
    prof = tmp_path / "profile"
    prof.mkdir()
    (prof / "config.yaml").write_text("executor: slurmm\n")  # as if the plugin were not installed
    proc = snakemake(workdir, "--profile", str(prof), "-n", check=False)
    assert proc.returncode != 0
    assert "slurmm" in proc.stderr and "invalid choice" in proc.stderr
    assert not (workdir / "results").exists()

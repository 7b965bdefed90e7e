"""Cluster and workstation profiles: Snakemake accepts them in a dry run, and GPU requests follow the model size."""

from __future__ import annotations

import importlib.util
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
    assert "gpu_model=a100" in proc.stdout
    assert set(res) >= {"pretrained", "allocate", "summarize"}


def test_gpu_workstation_profile_dry_run(workdir) -> None:
    proc = snakemake(workdir, "--profile", str(REPO / "profiles" / "gpu-workstation"), "-n")
    assert "This was a dry-run" in proc.stdout


def test_a_profile_naming_a_missing_executor_plugin_fails_naming_it(tmp_path, workdir) -> None:
    prof = tmp_path / "profile"
    prof.mkdir()
    (prof / "config.yaml").write_text("executor: slurmm\n")  # as if the plugin were not installed
    proc = snakemake(workdir, "--profile", str(prof), "-n", check=False)
    assert proc.returncode != 0
    assert "slurmm" in proc.stderr and "invalid choice" in proc.stderr
    assert not (workdir / "results").exists()

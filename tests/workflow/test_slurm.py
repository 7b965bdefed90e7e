"""The tiny DAG on a real one-node SLURM cluster (tools/local-slurm.sh), through profiles/slurm, against a local run.

Marker `slurm`, deselected by default; `.ci/run` runs `python3 -m pytest -m slurm`. It needs root and apt (or an
installed slurm-wlm + munge): the module starts the cluster and stops it again, even when a test fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wf import REPO, planned_jobs, snakemake, tiny_config, write_workdir

pytestmark = pytest.mark.slurm

LOCAL_SLURM = REPO / "tools" / "local-slurm.sh"
LOCAL_RULES = {"summarize", "next_line_task"}
# one thread per job in both runs: the same arithmetic (identical floats) and two SLURM jobs side by side on 2 cores
SAME_THREADS = ("--max-threads", "1")
SLURM_ARGS = ("--profile", str(REPO / "profiles" / "slurm"), "--slurm-no-account", "--slurm-keep-successful-logs",
              "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1",
              "--latency-wait", "5", "--jobs", "4", *SAME_THREADS)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: tools/local-slurm.sh installs slurm-wlm and munge and starts slurmctld / slurmd"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "slurm-wlm is not installed and apt-get is not available to install it"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "pip install snakemake-executor-plugin-slurm (the `test` extra installs it)"
    return None


def _config() -> dict:
    """The tiny DAG with zero-shot and speed, cut to one one-shot and one corrected recipe at one ratio."""
    cfg = tiny_config()
    cfg["methods"] = {k: cfg["methods"][k] for k in ("svd", "zs-svd")}
    cfg["ratios"] = [0.5]
    return cfg


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Path:
    """A running one-node cluster; yields the plugin's partition file for it."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    started = subprocess.run(["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True)
    try:
        assert started.returncode == 0, f"tools/local-slurm.sh start failed:\n{started.stdout}\n{started.stderr}"
        parts = tmp_path_factory.mktemp("slurm") / "partitions.yaml"
        parts.write_text(subprocess.run(["bash", str(LOCAL_SLURM), "partitions"], check=True,
                                        capture_output=True, text=True).stdout)
        yield parts
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop"], capture_output=True, text=True)


@pytest.fixture(scope="module")
def local_run(cluster, tmp_path_factory) -> Path:
    wd = write_workdir(tmp_path_factory.mktemp("local") / "run", _config())
    snakemake(wd, *SAME_THREADS)
    return wd


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory) -> tuple[Path, str]:
    wd = write_workdir(tmp_path_factory.mktemp("slurm") / "run", _config())
    start = time.monotonic()
    proc = snakemake(wd, *SLURM_ARGS, "--slurm-partition-config", str(cluster))
    print(f"tiny DAG on the local SLURM cluster: {time.monotonic() - start:.0f} s")
    return wd, proc.stdout + proc.stderr


def _slurm_logs(wd: Path) -> dict[str, list[Path]]:
    """rule -> the SLURM logs its jobs wrote (.snakemake/slurm_logs/rule_<rule>/<wildcards>/<slurm job id>.log)."""
    out: dict[str, list[Path]] = {}
    for log in sorted((wd / ".snakemake" / "slurm_logs").glob("rule_*/**/*.log")):
        rule = log.relative_to(wd / ".snakemake" / "slurm_logs").parts[0].removeprefix("rule_")
        out.setdefault(rule, []).append(log)
    return out


def test_every_non_local_job_ran_as_a_slurm_job(slurm_run) -> None:
    wd, out = slurm_run
    planned = planned_jobs(subprocess.CompletedProcess([], 0, out, ""))
    assert planned and LOCAL_RULES <= set(planned)
    remote = {rule: n for rule, n in planned.items() if rule not in LOCAL_RULES | {"all"}}
    logs = _slurm_logs(wd)
    assert {rule: len(files) for rule, files in logs.items()} == remote  # one SLURM job per job, none for local rules
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", out)
    assert len(submitted) == sum(remote.values()) and len(set(submitted)) == len(submitted)
    for rule, files in logs.items():
        for log in files:
            text = log.read_text()
            assert log.stem in submitted  # the log SLURM wrote for that job id
            assert f"rule {rule}:" in text and "Error" not in text, f"{log}:\n{text[-2000:]}"
    # CPU-only jobs carry no GPU request (the profile's gpu_model stays off jobs with gpu=0) and land on `cpu`
    assert "gpu_model=" not in out and "--gpus" not in out
    assert set(re.findall(r"Auto-selected partition '(\w+)'", out)) == {"cpu"}


def test_results_equal_a_local_run(slurm_run, local_run) -> None:
    wd, _ = slurm_run
    ppl = sorted(p.relative_to(local_run) for p in (local_run / "results").rglob("eval/ppl.json"))
    assert len(ppl) == 3  # dense, svd, zs-svd
    for rel in ppl:
        assert json.loads((wd / rel).read_text()) == json.loads((local_run / rel).read_text()), rel
    for rel in sorted(p.relative_to(local_run) for p in (local_run / "results").rglob("eval/zeroshot.json")):
        a, b = json.loads((wd / rel).read_text()), json.loads((local_run / rel).read_text())
        assert a["results"] == b["results"] if "results" in a else a == b, rel
    factors = sorted(p.relative_to(local_run) for p in (local_run / "results").rglob("factors.safetensors"))
    assert len(factors) == 3  # svd stage0, zs-svd stage0 and stage1
    for rel in factors:
        mine, theirs = load_file(str(wd / rel)), load_file(str(local_run / rel))
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), rel
    for rel in sorted(p.relative_to(local_run) for p in (local_run / "results").rglob("allocation.json")):
        assert json.loads((wd / rel).read_text()) == json.loads((local_run / rel).read_text()), rel
    # timings differ run to run: only check that every speed record exists
    speed = sorted(p.relative_to(local_run) for p in (local_run / "results").rglob("eval/speed.json"))
    assert speed and all((wd / rel).is_file() for rel in speed)
    assert (wd / "results/summary/table.md").read_text().count("\n") > 3


def test_a_gpu_job_goes_to_the_gpu_partition_with_its_gpu_model(cluster, tmp_path) -> None:
    """A model of 1 B parameters asks for a GPU (gpus_for); on the local cluster's fake-GPU partition it gets
    `--gpus=fake:1` (gpu_model from set-resources), its CPU-only neighbours stay on `cpu`, and the perplexity
    (computed on CPU: the fake GPU has no device) equals a local run's."""
    cfg = _config()
    cfg["models"]["tiny-llama"]["size_b"] = 1.0
    cfg["runtime"]["device"] = "auto"
    wd, local = write_workdir(tmp_path / "run", cfg), write_workdir(tmp_path / "local", cfg)
    target = "results/tiny-llama/pretrained/eval/ppl.json"
    snakemake(local, *SAME_THREADS, target)
    proc = snakemake(wd, target, *SLURM_ARGS, "--slurm-partition-config", str(cluster),  # target first: --set-
                     "--set-resources", "evaluate_source:gpu_model=fake")  # resources would take it as a value
    out = proc.stdout + proc.stderr
    chosen = dict((job, part) for part, job in re.findall(r"Auto-selected partition '(\w+)' for job (\w+)", out))
    assert chosen == {"pretrained": "cpu", "token_windows": "cpu", "evaluate_source": "gpu"}
    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)
    jobs = subprocess.run(["squeue", "--states=all", "--noheader", "--name", run_id,
                           "--Format=Partition:|,tres-per-job:|,State"], capture_output=True, text=True, check=True)
    assert sorted(line.strip() for line in jobs.stdout.splitlines()) == [
        "cpu|N/A|COMPLETED", "cpu|N/A|COMPLETED", "gpu|gres:gpu:fake:1|COMPLETED"]
    assert json.loads((wd / target).read_text()) == json.loads((local / target).read_text())


def test_a_job_failing_on_a_node_leaves_the_slurm_log_in_its_rule_log(cluster, tmp_path) -> None:
    wd = write_workdir(tmp_path / "run", _config())
    # ids beyond the tiny vocabulary (256): the file passes the parse-time checks (an integer tensor), and the
    # token_windows job refuses it on the node
    save_file({"tokens": torch.full((4000,), 300, dtype=torch.long)}, str(wd / "evaluation_tokens.safetensors"))
    proc = snakemake(wd, "results/tiny-llama/data/evaluation.safetensors", *SLURM_ARGS,
                     "--slurm-partition-config", str(cluster), "--retries", "0", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "SLURM status is: 'FAILED'" in out
    log = (wd / "logs/token_windows/tiny-llama/evaluation.log").read_text()
    slurm_log = re.search(r"---- SLURM log of the failed job \((\S+)\) ----", log)
    assert slurm_log and "rule_token_windows" in slurm_log.group(1)
    # the node's side of the failure: the job step's own report, after the script's traceback
    assert "Error in rule token_windows" in log.split(slurm_log.group(0), 1)[1]

"""Reproduction: DVC round trip through a local remote, byte-identical reruns, and what a config or code edit reruns.

The shared tiny run (conftest.tiny_dag: its config, results and Snakemake metadata) is copied with the whole
workflow into a temporary git repository and recorded by `dvc repro` (whose `snakemake --cores all` finds nothing
to do); a fresh clone pulls it back (no recomputation). Cost: a few seconds of DVC and dry runs. The slow test
(-m slow) recomputes a clone with --forceall (the whole shared DAG again, ~3 minutes on 2 idle cores) to compare
file hashes.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wf import REPO, copy_run, offline_env, planned_jobs

WORKFLOW = ["Snakefile", "rules", "scripts", "schemas", "profiles", "report", "lowrank", "dvc.yaml",
            "pyproject.toml", ".gitignore", ".dvcignore"]
# timings and the files that hold them are not expected to repeat; everything else is
NOT_BYTE_IDENTICAL = ("speed.json", "speed.md", "table.csv", "table.md", "metrics.json")


def _env(project: Path) -> dict[str, str]:
    return offline_env(PYTHONPATH=str(project), HF_DATASETS_OFFLINE="1", DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t",
                       GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


def run(project: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=project, capture_output=True, text=True, env=_env(project))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def smk(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(project, sys.executable, "-m", "snakemake", "--cores", "2", *args, check=check)


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(project, sys.executable, "-m", "dvc", *args, check=check)


def hashes(results: Path) -> dict[str, str]:
    return {str(p.relative_to(results)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(results.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_dag: Path) -> Path:
    """A git + DVC project holding the shared tiny run, recorded by `dvc repro` and pushed to a local remote."""
    root = tmp_path_factory.mktemp("repro")
    proj = copy_run(tiny_dag, root / "project")
    for name in WORKFLOW:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, proj / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, proj / name)
    # the README's main command, on the test's 2 cores
    dvc_yaml = yaml.safe_load((proj / "dvc.yaml").read_text())
    assert dvc_yaml["stages"]["pipeline"]["cmd"] == "snakemake --cores all"
    run(proj, "git", "init", "-q")
    dvc(proj, "init", "-q")
    dvc(proj, "remote", "add", "-d", "local", str(root / "store"))
    run(proj, "git", "add", "-A")
    run(proj, "git", "commit", "-qm", "tiny project")
    dvc(proj, "repro")
    dvc(proj, "push")
    run(proj, "git", "add", "dvc.lock", ".dvc/config")
    run(proj, "git", "commit", "-qm", "results")
    return proj


def test_dvc_repro_after_no_change_does_nothing_and_metrics_show(project: Path) -> None:
    assert (project / "results/summary/table.csv").is_file()
    out = dvc(project, "repro").stdout
    assert "didn't change" in out or "is cached" in out or "up to date" in out, out
    shown = dvc(project, "metrics", "show", "--json").stdout
    assert "tiny-llama" in shown and "ppl" in shown and "acc:lowrank_next_line" in shown
    assert planned_jobs(smk(project, "-n")) == {}


def test_fresh_clone_pulls_results_and_plans_no_job(project: Path) -> None:
    clone = project.parent / "clone"
    run(project.parent, "git", "clone", "-q", str(project), str(clone))
    for name in ("calibration_tokens.safetensors", "evaluation_tokens.safetensors"):  # inputs outside git here
        assert (clone / name).is_file()
    assert not (clone / "results").exists()
    dvc(clone, "pull")
    assert hashes(clone / "results") == hashes(project / "results")
    smk(clone, "--touch")  # DVC's checkout order leaves arbitrary mtimes; nothing is recomputed by --touch
    assert planned_jobs(smk(clone, "-n")) == {}


@pytest.mark.slow
def test_two_runs_with_the_same_seed_give_byte_identical_artifacts(project: Path) -> None:
    again = project.parent / "again"
    run(project.parent, "git", "clone", "-q", str(project), str(again))
    # the same settings as the first run (the shared tiny DAG runs one thread per job): float reductions over
    # another thread count differ in the last bits (1.5e-15 relative in the scores), which is not a seed issue
    smk(again, "--forceall", "--max-threads", "1")
    first, second = hashes(project / "results"), hashes(again / "results")
    assert set(first) == set(second)
    compared = [k for k in first if not k.endswith(NOT_BYTE_IDENTICAL)]
    assert len(compared) > 25  # factors, manifests, statistics, scores, windows, ppl and zero-shot records
    assert [k for k in compared if first[k] != second[k]] == []


def _edited_copy(project: Path, name: str) -> Path:
    dest = project.parent / name
    shutil.copytree(project, dest, symlinks=True, ignore=shutil.ignore_patterns(".dvc"))
    return dest


def test_editing_one_method_reruns_only_that_method(project: Path) -> None:
    wd = _edited_copy(project, "edit-method")
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    cfg["methods"]["svd-llm"]["min_rank_fraction"] = 0.1
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    jobs = planned_jobs(smk(wd, "-n"))
    # svd-llm's chain, the summary, and the prehab report (it compares prehab-svd-llm with svd-llm); its truncation
    # cuts from the stored decomposition of the input_gram space, which is not redone
    assert jobs == {"all": 1, "allocate": 1, "truncate": 1, "evaluate_compressed": 1,
                    "evaluate_zeroshot": 1, "measure_speed": 1, "summarize": 1, "prehab_report": 1}
    outputs = [ln for ln in smk(wd, "-n").stdout.splitlines() if ln.strip().startswith("output:")]
    assert len(outputs) == 7 and not [ln for ln in outputs if "/svd/" in ln or "/pretrained/" in ln]


@pytest.mark.parametrize("module, expected", [
    ("zeroshot", {"next_line_task": 1, "evaluate_zeroshot_source": 1, "evaluate_zeroshot": 7}),
    ("speed", {"measure_speed_source": 1, "measure_speed": 7}),
    # the fingerprints follow each script's imports (lowrank.codegraph): resume.py is reached by truncate.py alone,
    # so the 5 truncated recipes rerun from their truncation on (not the 2 int8 ones)
    ("resume", {"truncate": 5, "correct": 1, "rehab": 1, "evaluate_compressed": 5, "evaluate_zeroshot": 5,
                "measure_speed": 5, "prehab_report": 1}),
    ("quantization", {"quantize": 2, "evaluate_compressed": 2, "evaluate_zeroshot": 2, "measure_speed": 2}),
])
def test_editing_a_core_module_reruns_the_stages_that_use_it(project: Path, module: str, expected: dict) -> None:
    wd = _edited_copy(project, f"edit-{module}")
    with open(wd / "lowrank" / f"{module}.py", "a") as f:
        f.write("\n# an edit\n")
    assert planned_jobs(smk(wd, "-n")) == {**expected, "summarize": 1, "all": 1}


def test_unreachable_remote_fails_clearly_and_writes_nothing(project: Path) -> None:
    clone = project.parent / "clone-bad-remote"
    run(project.parent, "git", "clone", "-q", str(project), str(clone))
    missing = project.parent / "no-such-store"
    dvc(clone, "remote", "modify", "local", "url", str(missing))
    proc = dvc(clone, "pull", check=False)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "results" in err and ("missing" in err.lower() or "failed" in err.lower()), err
    assert not (clone / "results" / "summary" / "table.csv").exists()

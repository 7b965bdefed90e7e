"""Fixtures of the workflow tests (helpers live in wf.py).

The shared tiny DAG
-------------------
``tiny_dag`` is ONE real Snakemake run per test session of the whole DAG on the tiny random LLaMA of
``tests/data/tiny.yaml`` (a 256-token byte tokenizer, random token files, a held-out text file), with the recipes of
``wf.shared_config()``: svd, svd-llm, zs-svd (+1 projected correction), io-svd (output_kl statistic, two-sided
whitening), zs-svd-remap and io-svd-plus (both int8 quantize modes) and prehab-svd-llm (prehab + rehab), at kept
fraction 0.5, with the offline zero-shot task, speed, the summary, the prehab report. Every stage of the
pipeline runs in it, so a test of a stage reads its artifacts instead of running a DAG of its own:

    def test_my_stage(tiny_dag: Path) -> None:
        record = read_json(tiny_dag / "results/tiny-llama/zs-svd/0.50/eval/ppl.json")
        ...

Rules of use:

* Treat ``tiny_dag`` as read-only. To rerun, edit the config or break something, work on a copy:
  ``wd = copy_run(tiny_dag, tmp_path / "run", config)`` (wf.py; mtimes and Snakemake's metadata are kept, so a dry
  run of the copy plans only what the edit changes).
* A new stage or recipe kind: add it to ``wf.SHARED_METHODS`` (or the config of ``shared_config``) so that it runs
  once, here; then update the job counts that tests/workflow/test_pipeline_tiny.py expects.
* Dry runs (``snakemake(wd, "-n")``) on a fresh ``workdir`` are cheap (a few seconds); a real run of another DAG
  costs a minute or more of the 10-minute budget of ``python3 -m pytest``: put such tests behind
  ``@pytest.mark.slow`` (run by ``python3 -m pytest -m slow``, which .ci/run calls after the main command).

Cost: 61 tiny jobs, each mostly its Python start-up, two side by side (``--max-threads 1``): a few minutes on
2 idle cores. While iterating on assertions, ``LOWRANK_TINY_DAG=/some/folder python3 -m pytest tests/workflow``
runs the DAG into that folder once and reuses it in later sessions (Snakemake brings it up to date first, so an
edit of the code or of ``shared_config`` reruns what it changes; under xdist one worker does that while the others
wait on a lock). .ci/run sets it so that ``-m slow`` reads the run of the README's command instead of repeating it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
import yaml

from wf import shared_config, snakemake, write_config, write_workdir


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh run folder with tiny.yaml as config.yaml and the token / text files it reads (nothing run)."""
    return write_workdir(tmp_path / "run")


def _up_to_date(wd: Path) -> None:
    """Write the shared config into ``wd`` (a new folder, or one whose config differs) and run Snakemake there."""
    if not (wd / "config.yaml").is_file():
        write_workdir(wd, shared_config())
    elif yaml.safe_load((wd / "config.yaml").read_text()) != shared_config():
        write_config(wd, shared_config())
    snakemake(wd)


@pytest.fixture(scope="session")
def tiny_dag(tmp_path_factory, request: pytest.FixtureRequest) -> Path:
    """The folder of the session's one complete run of the shared tiny DAG (see the module docstring).

    The folder is ``LOWRANK_TINY_DAG`` when set, else under pytest-xdist (the README's command runs ``-n auto``) the
    session's common temporary folder, else a temporary folder of its own. Every worker asks for it: the first one
    brings it up to date while holding a lock, the others wait on the lock and then read the same folder (a mark
    holding the xdist test-run id tells them it finished in this session; a failed run leaves no mark, so each
    worker retries it and reports its error)."""
    worker = getattr(request.config, "workerinput", None)
    reuse = os.environ.get("LOWRANK_TINY_DAG")
    if reuse:
        wd = Path(reuse).resolve()
    elif worker is not None:
        wd = tmp_path_factory.getbasetemp().parent / "tiny-dag" / "run"  # shared by the workers of this session
    else:
        wd = tmp_path_factory.mktemp("tiny-dag") / "run"
    wd.parent.mkdir(parents=True, exist_ok=True)
    session, mark = (worker or {}).get("testrunuid"), wd.parent / f".{wd.name}.session"
    with open(wd.parent / f".{wd.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if session is None or not mark.is_file() or mark.read_text() != session:
            mark.unlink(missing_ok=True)
            _up_to_date(wd)
            if session is not None:
                mark.write_text(session)
    return wd

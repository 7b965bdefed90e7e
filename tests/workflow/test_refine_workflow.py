"""The refine stage through Snakemake on the tiny LLaMA: one run (module fixture), what evaluation reads and what
a settings edit reruns (the refused recipe combinations are unit-tested: tests/unit/test_refine.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wf import planned_jobs, snakemake, tiny_config, write_workdir

from lowrank.io import read_json

# its own tiny-DAG run (minutes): `python3 -m pytest -m slow` (.ci/run) runs it; the stage's
# numerics are unit-tested in tests/unit/test_refine.py
pytestmark = pytest.mark.slow

# plain least squares (no anchor, dense-output target): the largest in-sample gain, so the 3 % check below holds
# on the tiny model; the defaults' shrinkage is unit-tested (tests/unit/test_refine.py)
REFINE = {"mode": "closed_form", "refit_b": True, "windows": 8, "anchor": 0.0, "target_mix": 1.0}


def refine_config() -> dict:
    cfg = tiny_config()
    cfg["methods"] = {"svd-llm": cfg["methods"]["svd-llm"],
                      "svd-llm-refine": {**cfg["methods"]["svd-llm"], "refine": dict(REFINE)}}
    cfg["ratios"] = [0.5]
    cfg["evaluation"]["zeroshot"]["tasks"] = []
    cfg["evaluation"]["speed"]["enabled"] = False
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    wd = write_workdir(tmp_path_factory.mktemp("refine") / "run", refine_config())
    snakemake(wd)
    return wd


def test_refine_folder_is_evaluated_and_keeps_ranks(run: Path) -> None:
    res = run / "results" / "tiny-llama"
    refined = read_json(res / "svd-llm-refine" / "0.50" / "refine" / "manifest.json")
    stage0 = read_json(res / "svd-llm-refine" / "0.50" / "stage0" / "manifest.json")
    assert refined["stage"] == "refine" and refined["ranks"] == stage0["ranks"]
    assert refined["factor_bytes"] == stage0["factor_bytes"]
    blocks = refined["blocks"]
    assert len(blocks) == 2 and all(b["error_after"] <= b["error_before"] for b in blocks)
    assert sum(b["error_after"] for b in blocks) < 0.97 * sum(b["error_before"] for b in blocks)
    # one allocate job: the refine recipe's ranks are a copy of its base's (same allocation key)
    shared = [(res / m / "0.50" / "allocation.json").read_bytes() for m in ("svd-llm", "svd-llm-refine")]
    assert shared[0] == shared[1]
    assert "copied from" in (run / "logs/allocate/tiny-llama/svd-llm-refine/0.50.log").read_text()
    # the base recipe plans no refine; both are evaluated, with the same parameter count
    assert not (res / "svd-llm" / "0.50" / "refine").exists()
    ev_r = read_json(res / "svd-llm-refine" / "0.50" / "eval" / "ppl.json")
    ev_b = read_json(res / "svd-llm" / "0.50" / "eval" / "ppl.json")
    assert ev_r["target_params"] == ev_b["target_params"] and ev_r["n_factored"] == ev_b["n_factored"]
    assert ev_r["ppl"] != ev_b["ppl"]
    assert "svd-llm-refine" in (run / "results" / "summary" / "table.md").read_text()


def test_settings_edit_reruns_refine_and_later_only(run: Path) -> None:
    cfg = refine_config()
    cfg["methods"]["svd-llm-refine"]["refine"]["anchor"] = 1.0
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        jobs = planned_jobs(snakemake(run, "-n"))
    finally:
        (run / "config.yaml").write_text(yaml.safe_dump(refine_config(), sort_keys=False))
    assert jobs.get("refine") == 1 and jobs.get("evaluate_compressed") == 1
    assert "truncate" not in jobs and "calibration_stats" not in jobs
    assert "allocate" not in jobs and "share_allocation" not in jobs

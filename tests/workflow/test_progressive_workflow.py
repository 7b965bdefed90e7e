"""``allocation_stages`` (progressive allocation, lowrank.scoring.progressive_allocation) through the DAG: the
allocate job of a staged ratio re-scores on the partially truncated model; a stage below the ratio leaves the
allocation one-shot (the same ranks as the recipe without stages).

On a copy of the shared tiny DAG (conftest.tiny_dag) with three more recipes, so only their 8 jobs run (the
tail_curvature scores, three allocations, two truncations and perplexities); `python3 -m pytest -m slow`. The core
is unit-tested in tests/unit/test_progressive_allocation.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wf import copy_run, planned_jobs, shared_config, snakemake

pytestmark = pytest.mark.slow

ONE_SHOT = {"whitening": "input_gram", "scorer": "tail_curvature", "allocator": "zero_sum"}
RECIPES = {"zs": dict(ONE_SHOT), "zs-staged": {**ONE_SHOT, "allocation_stages": [0.7]},
           "zs-late": {**ONE_SHOT, "allocation_stages": [0.3]}}
RES = "results/tiny-llama"


@pytest.fixture(scope="module")
def run(tiny_dag: Path, tmp_path_factory) -> Path:
    cfg = shared_config()
    cfg["methods"].update(RECIPES)
    wd = copy_run(tiny_dag, tmp_path_factory.mktemp("prog") / "run", cfg)
    targets = [f"{RES}/{m}/0.50/eval/ppl.json" for m in ("zs", "zs-staged")] + [f"{RES}/zs-late/0.50/allocation.json"]
    assert planned_jobs(snakemake(wd, "-n", *targets)) == {"score_components": 1, "allocate": 3, "truncate": 2,
                                                          "evaluate_compressed": 2}
    snakemake(wd, *targets)
    return wd


def test_staged_ratio_is_rescored_and_a_stage_below_it_changes_nothing(run: Path) -> None:
    res = run / RES
    alloc = {m: json.loads((res / m / "0.50" / "allocation.json").read_text()) for m in RECIPES}
    staged = alloc["zs-staged"]
    assert [s["kept_fraction"] for s in staged["stages"]] == [0.7, 0.5] and staged["stages"][1]["rescored"]
    assert staged["kept_fraction"] <= 0.5 + 1e-9
    assert "stages" not in alloc["zs-late"]  # 0.3 is not above 0.5: one-shot
    ranks = {m: {n: t["rank"] for n, t in a["targets"].items()} for m, a in alloc.items()}
    assert ranks["zs-late"] == ranks["zs"] and ranks["zs-staged"] != ranks["zs"]
    assert "re-scored" in (run / "logs" / "allocate" / "tiny-llama" / "zs-staged" / "0.50.log").read_text()
    for m in ("zs", "zs-staged"):
        assert 1 < json.loads((res / m / "0.50" / "eval" / "ppl.json").read_text())["ppl"] < 1e4

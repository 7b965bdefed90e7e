"""``allocation_stages`` (progressive allocation, lowrank.scoring.progressive_allocation) through the DAG: the
allocate job of a staged ratio re-scores on the partially truncated model; a ratio that no stage lies above
stays one-shot (the same allocation as the recipe without stages)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wf import snakemake, tiny_config, write_workdir

# its own tiny-DAG run (a minute or two): `python3 -m pytest -m slow`; the core is unit-tested in
# tests/unit/test_progressive_allocation.py
pytestmark = pytest.mark.slow

ONE_SHOT = {"whitening": "input_gram", "scorer": "tail_curvature", "allocator": "zero_sum"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    cfg = tiny_config()
    cfg["methods"] = {"zs": dict(ONE_SHOT), "zs-staged": {**ONE_SHOT, "allocation_stages": [0.7]}}
    cfg["ratios"] = [0.8, 0.5]
    cfg["evaluation"]["zeroshot"] = {"tasks": []}
    cfg["evaluation"]["speed"] = {"enabled": False}
    wd = write_workdir(tmp_path_factory.mktemp("prog") / "run", cfg)
    res = "results/tiny-llama"
    snakemake(wd, *[f"{res}/{m}/{r}/eval/ppl.json" for m in cfg["methods"] for r in ("0.80", "0.50")])
    return wd


def test_staged_ratio_rescored_and_one_shot_ratio_unchanged(run: Path) -> None:
    res = run / "results" / "tiny-llama"
    alloc = {(m, r): json.loads((res / m / r / "allocation.json").read_text())
             for m in ("zs", "zs-staged") for r in ("0.80", "0.50")}
    staged = alloc[("zs-staged", "0.50")]
    assert [s["kept_fraction"] for s in staged["stages"]] == [0.7, 0.5] and staged["stages"][1]["rescored"]
    assert staged["kept_fraction"] <= 0.5 + 1e-9
    assert "stages" not in alloc[("zs-staged", "0.80")]  # 0.7 is not above 0.8: one-shot
    ranks = {k: {n: t["rank"] for n, t in v["targets"].items()} for k, v in alloc.items()}
    assert ranks[("zs-staged", "0.80")] == ranks[("zs", "0.80")]
    assert "re-scored" in (run / "logs" / "allocate" / "tiny-llama" / "zs-staged" / "0.50.log").read_text()
    for m in ("zs", "zs-staged"):
        assert 1 < json.loads((res / m / "0.50" / "eval" / "ppl.json").read_text())["ppl"] < 1e4

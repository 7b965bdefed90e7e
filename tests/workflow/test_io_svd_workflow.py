"""The IO-SVD and hybrid int8 recipes run end to end on the tiny model (in the shared run, conftest.tiny_dag);
bad quantize / K input fails cleanly."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest

from wf import SHARED_METHODS, snakemake, tiny_config, write_workdir

METHODS = {k: SHARED_METHODS[k] for k in ("io-svd", "zs-svd-remap", "io-svd-plus")}  # read-only: _config copies


def _config() -> dict:
    cfg = tiny_config()
    cfg["methods"] = copy.deepcopy(METHODS)
    cfg["ratios"] = [0.5]
    cfg["statistics"] = {"output_kl": {"top_k": 5, "max_windows": 4}}
    return cfg


@pytest.fixture
def io_run(tiny_dag: Path) -> Path:
    return tiny_dag


def test_every_recipe_is_evaluated_and_bytes_on_disk_are_accounted(io_run: Path) -> None:
    res = io_run / "results" / "tiny-llama"
    assert (res / "pretrained" / "stats" / "output_kl.safetensors").exists()
    for method in METHODS:
        ev = json.loads((res / method / "0.50" / "eval" / "ppl.json").read_text())
        assert 1 < ev["ppl"] < 1e4
        assert 0 < ev["kept_bytes_fraction"] <= 0.5 + 1e-9
    for method in ("zs-svd-remap", "io-svd-plus"):
        final = res / method / "0.50" / "final"
        manifest = json.loads((final / "manifest.json").read_text())
        raw = (final / "model.safetensors").read_bytes()
        header = 8 + struct.unpack("<Q", raw[:8])[0]
        assert len(raw) - header == manifest["accounted_bytes"] <= manifest["budget_bytes"]
        assert not (res / method / "0.50" / "stage0").exists()  # the quantize stage truncates itself
        # the allocation the summary reports is the byte-budget one the quantize stage stored (issue 18, item 6)
        alloc = json.loads((res / method / "0.50" / "allocation.json").read_text())
        assert {n: t["rank"] for n, t in alloc["targets"].items()} == manifest["diagnostics"]["ranks"]
        assert alloc["quantize"]["mode"] == manifest["mode"]
        assert alloc["quantize"]["budget_bytes"] == manifest["budget_bytes"]
        assert alloc["quantize"]["dense_fp16_bytes"] == manifest["dense_fp16_bytes"]
        assert alloc["kept_fraction"] > 0.5  # int8 rows: more parameters than the ratio, fewer bytes
    ranks = (io_run / "results" / "summary" / "ranks.csv").read_text()
    assert "zs-svd-remap" in ranks and "io-svd-plus" in ranks
    table = (io_run / "results" / "summary" / "table.md").read_text()
    assert "Kept bytes" in table and "io-svd-plus" in table


def test_unknown_quantize_mode_is_rejected_before_any_artifact(tmp_path) -> None:
    cfg = _config()
    cfg["methods"]["zs-svd-remap"]["quantize"]["mode"] = "int4"
    wd = write_workdir(tmp_path / "run", cfg)
    proc = snakemake(wd, "-n", check=False)
    assert proc.returncode != 0 and "int4" in proc.stdout + proc.stderr
    assert not (wd / "results").exists()


def test_top_k_above_the_vocabulary_fails_without_a_partial_statistic(tmp_path) -> None:
    cfg = _config()
    cfg["methods"] = {"io-svd": METHODS["io-svd"]}
    cfg["statistics"]["output_kl"]["top_k"] = 300  # vocabulary 256
    wd = write_workdir(tmp_path / "run", cfg)
    proc = snakemake(wd, "results/tiny-llama/pretrained/stats/output_kl.safetensors", check=False)
    assert proc.returncode != 0
    log = (wd / "logs" / "calibration_stats" / "tiny-llama" / "pretrained" / "output_kl.log").read_text()
    assert "top_k must be in [1, 256]" in log and "300" in log
    assert not list((wd / "results" / "tiny-llama" / "pretrained").glob("stats/output_kl*"))

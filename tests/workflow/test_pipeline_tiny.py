"""The whole DAG through Snakemake on a tiny random LLaMA in a temporary folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file

from wf import planned_jobs, snakemake, tiny_config, write_workdir

from lowrank.calibration import InputGrams
from lowrank.checkpoint import load_compressed
from lowrank.evaluation import perplexity
from lowrank.io import load_tensors, read_json
from lowrank.model import find_targets, linear_weight, load_model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    wd = write_workdir(tmp_path_factory.mktemp("pipeline") / "run")
    snakemake(wd)
    return wd


def test_every_artifact_exists_and_the_table_is_complete(tiny_run: Path) -> None:
    r = tiny_run / "results"
    for f in ("summary/table.csv", "summary/table.md", "summary/metrics.json", "summary/plots/ppl_vs_ratio.png",
              "summary/plots/ppl_vs_ratio.csv", "tiny-llama/pretrained/manifest.json",
              "tiny-llama/pretrained/stats/input_gram.safetensors"):
        assert (r / f).is_file(), f
    table = pd.read_csv(r / "summary/table.csv")
    assert list(table.columns) == ["model", "method", "ratio", "metric", "value"]
    ppl = table[table.metric == "ppl"]
    assert len(ppl) == 1 + 3 * 2  # dense + 3 methods x 2 ratios
    assert sorted(ppl.method.unique()) == ["dense", "svd", "svd-llm", "zs-svd"]
    kept = table[(table.metric == "kept_fraction") & (table.method != "dense")]
    for row in kept.itertuples():
        assert row.value <= row.ratio + 1e-12  # the budget is never exceeded
        assert row.value > row.ratio - 0.05
    # nothing is left half-written
    assert not list(r.rglob("*.tmp"))


def test_compressed_model_loads_back_to_the_same_perplexity(tiny_run: Path) -> None:
    folder = tiny_run / "results/tiny-llama/svd-llm/0.50/stage0"
    model = load_compressed(folder)
    windows = load_tensors(tiny_run / "results/tiny-llama/data/evaluation.safetensors")[0]["tokens"]
    recorded = read_json(tiny_run / "results/tiny-llama/svd-llm/0.50/eval/ppl.json")
    assert perplexity(model, windows, 4)["ppl"] == pytest.approx(recorded["ppl"], rel=1e-6)
    manifest = read_json(folder / "manifest.json")
    alloc = read_json(tiny_run / "results/tiny-llama/svd-llm/0.50/allocation.json")
    assert manifest["ranks"] == {n: t["rank"] for n, t in alloc["targets"].items() if t["rank"] is not None}
    # accounted factor bytes equal the tensors stored (the file adds only its header)
    size = (folder / "factors.safetensors").stat().st_size
    assert manifest["factor_bytes"] < size < manifest["factor_bytes"] + 64 * 1024


def test_whitened_truncation_has_lower_calibration_output_error(tiny_run: Path) -> None:
    """SVD-LLM minimises tr((W − W') C (W − W')ᵀ) per matrix, so it beats plain SVD on that error everywhere."""
    r = tiny_run / "results/tiny-llama"
    dense = load_model(r / "pretrained/manifest.json")
    grams = InputGrams.from_tensors(*load_tensors(r / "pretrained/stats/input_gram.safetensors"))
    errs = {}
    for method in ("svd", "svd-llm"):
        model = load_compressed(r / f"{method}/0.50/stage0")
        errs[method] = {}
        for t in find_targets(dense):
            D = (linear_weight(dense.get_submodule(t.name)) - linear_weight(model.get_submodule(t.name))).double()
            errs[method][t.name] = float(torch.trace(D @ grams.for_target(t.name) @ D.T))
    for name in errs["svd"]:
        assert errs["svd-llm"][name] <= errs["svd"][name] * (1 + 1e-4), name
    assert sum(errs["svd-llm"].values()) < 0.9 * sum(errs["svd"].values())


def test_second_run_does_nothing(tiny_run: Path) -> None:
    assert planned_jobs(snakemake(tiny_run, "-n")) == {}


def test_changing_only_the_ratios_reruns_allocation_and_later_stages(tiny_run: Path) -> None:
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    cfg["ratios"] = [0.8, 0.3]
    wd = tiny_run.parent / "ratios"
    shutil.copytree(tiny_run, wd)
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    jobs = planned_jobs(snakemake(wd, "-n"))
    # only the new ratio's jobs (three methods, one correction), and the summary; statistics and scores are shared
    assert jobs == {"all": 1, "allocate": 3, "truncate": 3, "correct": 1, "evaluate_compressed": 3,
                    "evaluate_zeroshot": 3, "measure_speed": 3, "summarize": 1}


def test_bad_evaluation_input_fails_cleanly_and_upstream_is_not_recomputed(tiny_run: Path) -> None:
    wd = tiny_run.parent / "bad-eval"
    shutil.copytree(tiny_run, wd)
    save_file({"tokens": torch.full((4000,), 10_000)}, str(wd / "bad_tokens.safetensors"))  # ids >= vocab 256
    cfg = tiny_config()
    cfg["evaluation"]["corpus"] = {"kind": "tokens", "path": "bad_tokens.safetensors"}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = snakemake(wd, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "10000" in out and "vocabulary 256" in out
    assert not (wd / "results/tiny-llama/data/evaluation.safetensors").exists()  # no partial artifact
    assert not list((wd / "results").rglob("*.tmp"))
    # the fix reruns only what depends on the evaluation windows
    (wd / "config.yaml").write_text(yaml.safe_dump(tiny_config(), sort_keys=False))
    jobs = planned_jobs(snakemake(wd, "-n"))
    assert jobs == {"all": 1, "token_windows": 1, "evaluate_source": 1, "evaluate_compressed": 6, "summarize": 1}
    assert json.loads((wd / "results/summary/metrics.json").read_text())  # the old summary is untouched


def test_zero_sum_allocation_and_correction_stage(tiny_run: Path) -> None:
    r = tiny_run / "results/tiny-llama/zs-svd/0.50"
    alloc = read_json(r / "allocation.json")
    assert alloc["allocator"] == "zero_sum" and alloc["kept_fraction"] <= 0.5
    ranks = [t["rank"] for t in alloc["targets"].values()]
    assert len(set(ranks)) > 1  # heterogeneous ranks across matrices
    stage1 = read_json(r / "stage1/manifest.json")
    assert stage1["stage"] == 1
    assert stage1["ranks"] == read_json(r / "stage0/manifest.json")["ranks"]  # re-truncated to the same ranks
    evaluated = read_json(r / "eval/ppl.json")
    windows = load_tensors(tiny_run / "results/tiny-llama/data/evaluation.safetensors")[0]["tokens"]
    assert perplexity(load_compressed(r / "stage1"), windows, 4)["ppl"] == pytest.approx(evaluated["ppl"], rel=1e-6)


def test_zero_shot_and_speed_join_the_table_and_the_html_report_builds(tiny_run: Path) -> None:
    r = tiny_run / "results"
    table = pd.read_csv(r / "summary/table.csv")
    acc = table[table.metric == "acc:lowrank_next_line"]
    assert len(acc) == 1 + 3 * 2 and acc.value.between(0, 1).all()
    record = read_json(r / "tiny-llama/svd/0.50/eval/zeroshot.json")
    assert record["tasks"]["lowrank_next_line"]["n"] == 12  # tiny.yaml's n_items
    for metric in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb", "disk_bytes"):
        assert (table[table.metric == metric].value > 0).sum() == 7, metric
    disk = table[table.metric == "disk_bytes"].set_index(["method", "ratio"]).value
    assert disk[("svd-llm", 0.5)] < disk[("svd-llm", 0.8)] < disk[("dense", 1.0)]  # factors shrink with the budget
    assert "Zero-shot accuracy" in (r / "summary/table.md").read_text()
    assert (r / "summary/plots/accuracy_vs_ratio.png").stat().st_size > 10_000
    snakemake(tiny_run, "--report", "report.html")
    html = (tiny_run / "report.html").read_text(errors="replace")
    assert "accuracy_vs_ratio.png" in html and "ppl_vs_ratio.png" in html and "lowrank_next_line" in html

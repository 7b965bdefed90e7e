"""The whole DAG through Snakemake on a tiny random LLaMA: assertions on the shared run (conftest.tiny_dag)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from wf import SHARED_METHODS, copy_run, planned_jobs, shared_config, snakemake, write_config, write_workdir

from lowrank.calibration import InputGrams
from lowrank.checkpoint import load_compressed
from lowrank.evaluation import perplexity
from lowrank.io import load_tensors, read_json
from lowrank.model import find_targets, linear_weight, load_model


METHODS = sorted(["svd", "svd-llm", "zs-svd", *SHARED_METHODS])
N = len(METHODS)  # compressed models: every recipe at the shared run's one kept fraction, 0.5
INT8 = {m for m, spec in SHARED_METHODS.items() if spec.get("quantize", {}).get("mode", "none") != "none"}


@pytest.fixture
def tiny_run(tiny_dag: Path) -> Path:
    return tiny_dag


def test_every_artifact_exists_and_the_table_is_complete(tiny_run: Path) -> None:
    r = tiny_run / "results"
    for f in ("summary/table.csv", "summary/table.md", "summary/metrics.json", "summary/plots/ppl_vs_ratio.png",
              "summary/plots/ppl_vs_ratio.csv", "tiny-llama/pretrained/manifest.json",
              "tiny-llama/pretrained/stats/input_gram.safetensors"):
        assert (r / f).is_file(), f
    table = pd.read_csv(r / "summary/table.csv")
    assert list(table.columns) == ["model", "method", "ratio", "metric", "value"]
    ppl = table[table.metric == "ppl"]
    assert len(ppl) == 1 + N  # dense + 7 methods
    assert sorted(ppl.method.unique()) == sorted(["dense", *METHODS])
    kept = table[(table.metric == "kept_fraction") & (table.method != "dense")]
    for row in kept.itertuples():
        if row.method in INT8:  # a byte budget: int8 rows keep more parameters (test_io_svd_workflow)
            assert row.value > row.ratio
            continue
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


def test_changing_only_the_ratios_reruns_allocation_and_later_stages(tiny_run: Path, tmp_path: Path) -> None:
    cfg = shared_config()
    cfg["ratios"] = [0.5, 0.3]
    wd = copy_run(tiny_run, tmp_path / "ratios", cfg)
    jobs = planned_jobs(snakemake(wd, "-n"))
    # only the new ratio's jobs (7 recipes: 5 truncations, 1 correction, 2 quantizations, 1 rehab), the summary and
    # the prehab report; statistics, scores, the stored decompositions and the prehab model are shared
    assert jobs == {"all": 1, "allocate": 7, "truncate": 5, "correct": 1, "quantize": 2, "rehab": 1,
                    "evaluate_compressed": 7, "evaluate_zeroshot": 7, "measure_speed": 7, "summarize": 1,
                    "prehab_report": 1}


def test_bad_evaluation_input_fails_cleanly_and_upstream_is_not_recomputed(tiny_run: Path, tmp_path: Path) -> None:
    cfg = shared_config()
    cfg["evaluation"]["corpus"] = {"kind": "tokens", "path": "bad_tokens.safetensors"}
    wd = copy_run(tiny_run, tmp_path / "bad-eval", cfg)
    save_file({"tokens": torch.full((4000,), 10_000)}, str(wd / "bad_tokens.safetensors"))  # ids >= vocab 256
    proc = snakemake(wd, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "10000" in out and "vocabulary 256" in out
    assert not (wd / "results/tiny-llama/data/evaluation.safetensors").exists()  # no partial artifact
    assert not list((wd / "results").rglob("*.tmp"))
    # the fix reruns only what depends on the evaluation windows
    jobs = planned_jobs(snakemake(write_config(wd, shared_config()), "-n"))
    assert jobs == {"all": 1, "token_windows": 1, "evaluate_source": 2, "evaluate_compressed": N, "summarize": 1,
                    "prehab_report": 1}
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


def test_zero_shot_and_speed_join_the_table(tiny_run: Path) -> None:
    r = tiny_run / "results"
    table = pd.read_csv(r / "summary/table.csv")
    acc = table[table.metric == "acc:lowrank_next_line"]
    assert len(acc) == 1 + N and acc.value.between(0, 1).all()
    record = read_json(r / "tiny-llama/svd/0.50/eval/zeroshot.json")
    assert record["tasks"]["lowrank_next_line"]["n"] == 12  # tiny.yaml's n_items
    for metric in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb", "disk_bytes"):
        assert (table[table.metric == metric].value > 0).sum() == 1 + N, metric
    disk = table[table.metric == "disk_bytes"].set_index(["method", "ratio"]).value
    # half the target parameters (the embeddings stay): well under the dense file
    assert disk[("svd-llm", 0.5)] < 0.8 * disk[("dense", 1.0)]
    assert "Zero-shot accuracy" in (r / "summary/table.md").read_text()
    assert (r / "summary/plots/accuracy_vs_ratio.png").stat().st_size > 10_000


def test_the_html_report_builds(tiny_run: Path, tmp_path: Path) -> None:
    wd = copy_run(tiny_run, tmp_path / "report")
    snakemake(wd, "--report", "report.html")
    html = (wd / "report.html").read_text(errors="replace")
    assert "accuracy_vs_ratio.png" in html and "ppl_vs_ratio.png" in html and "lowrank_next_line" in html


def test_a_job_left_incomplete_by_a_crash_is_redone_by_the_default_profile(tiny_run: Path, tmp_path: Path) -> None:
    """A killed job leaves Snakemake's incomplete marker on its output; profiles/default sets rerun-incomplete."""
    import base64

    wd = copy_run(tiny_run, tmp_path / "crashed")
    target = "results/tiny-llama/svd/0.50/eval/ppl.json"
    marker = wd / ".snakemake" / "incomplete" / base64.urlsafe_b64encode(target.encode()).decode()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"external_jobid": None}))
    jobs = planned_jobs(snakemake(wd, "-n"))
    assert jobs == {"all": 1, "evaluate_compressed": 1, "summarize": 1}
    # without the profile Snakemake refuses and names the file and the flag (the README's recovery paragraph)
    proc = snakemake(wd, "-n", "--workflow-profile", "none", check=False)
    assert proc.returncode != 0
    assert target in proc.stdout + proc.stderr and "--rerun-incomplete" in proc.stdout + proc.stderr


def _threads_per_rule(proc) -> dict[str, set[int]]:
    """Threads of every planned job, per rule, from a dry run (Snakemake prints ``threads:`` only above 1)."""
    out: dict[str, set[int]] = {}
    rule = None
    for line in (proc.stdout + proc.stderr).splitlines():
        s = line.strip()
        if s.startswith(("rule ", "localrule ")) and s.endswith(":"):
            rule = s.split()[1].rstrip(":")
            out.setdefault(rule, set()).add(1)
        elif s.startswith("threads:") and rule is not None:
            out[rule].discard(1)
            out[rule].add(int(s.split()[1]))
    return out


@pytest.mark.parametrize("size_b, light", [(0.0001, 1), (7.0, 2)])
def test_jobs_that_come_per_recipe_take_one_thread_on_a_small_model(tmp_path: Path, size_b: float, light: int
                                                                    ) -> None:
    """Perplexity, truncation, quantize, decompose and σ scores of a model under 1 B parameters run on one thread
    each, so two run side by side on a 2-core machine; the gradient scores and the Grams keep every core."""
    cfg = shared_config()
    cfg["models"]["tiny-llama"]["size_b"] = size_b
    cfg["runtime"] = {**cfg.get("runtime", {}), "device": "cpu"}
    cfg["decomposition"] = {**cfg.get("decomposition", {}), "share": True}  # auto shares below 1 B only
    threads = _threads_per_rule(snakemake(write_workdir(tmp_path / "run", cfg), "-n", "--max-threads", "2"))
    for rule in ("evaluate_source", "evaluate_compressed", "truncate", "quantize", "decompose"):
        assert threads[rule] == {light}, (rule, threads[rule])
    assert threads["calibration_stats"] == {2}
    assert threads["score_components"] == {2, light} if light == 1 else {2}  # sigma light, first_order 2

"""Zero-shot and speed config: the offline task's text must exist and be held out; [] / enabled switch them off."""

from __future__ import annotations

from wf import planned_jobs, snakemake, tiny_config, write_workdir


def _fails(tmp_path, mutate) -> str:
    cfg = tiny_config()
    mutate(cfg)
    wd = write_workdir(tmp_path / "run", cfg)
    proc = snakemake(wd, "-n", check=False)
    assert proc.returncode != 0
    assert not (wd / "results").exists()
    return proc.stdout + proc.stderr


def test_next_line_task_on_a_token_corpus_is_refused_with_the_fix(tmp_path) -> None:
    def mutate(cfg):
        del cfg["evaluation"]["zeroshot"]["next_line"]["corpus"]  # falls back to the evaluation corpus: tokens

    out = _fails(tmp_path, mutate)
    assert "lowrank_next_line" in out and "kind 'tokens'" in out and "next_line.corpus" in out


def test_next_line_text_shared_with_calibration_is_refused(tmp_path) -> None:
    def mutate(cfg):
        cfg["calibration"]["corpus"] = {"kind": "text_files", "paths": ["heldout_text.txt"]}

    out = _fails(tmp_path, mutate)
    assert "overlap" in out and "heldout_text.txt" in out


def test_empty_task_list_and_disabled_speed_plan_no_such_jobs(tmp_path) -> None:
    cfg = tiny_config()
    cfg["evaluation"]["zeroshot"]["tasks"] = []
    cfg["evaluation"]["speed"]["enabled"] = False
    jobs = planned_jobs(snakemake(write_workdir(tmp_path / "run", cfg), "-n"))
    assert not {"next_line_task", "evaluate_zeroshot", "evaluate_zeroshot_source", "measure_speed",
                "measure_speed_source"} & set(jobs)
    assert jobs["evaluate_compressed"] == 6 and jobs["summarize"] == 1


def test_a_model_without_tokenizer_is_skipped_by_zero_shot_only(tmp_path) -> None:
    cfg = tiny_config()
    del cfg["models"]["tiny-llama"]["tokenizer"]
    jobs = planned_jobs(snakemake(write_workdir(tmp_path / "run", cfg), "-n"))
    assert "evaluate_zeroshot" not in jobs and jobs["measure_speed"] == 6

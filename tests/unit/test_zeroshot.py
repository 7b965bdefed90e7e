"""lowrank.zeroshot: the offline next-line task (items, task YAML); no lm-eval run here (see tests/slow)."""

from __future__ import annotations

import random

import pytest
import yaml

from lowrank.zeroshot import NEXT_LINE_TASK, next_line_items, task_yaml

WORDS = "the king queen castle sword night rose river stone light dark crown ghost storm sea fire".split()


def _text(n: int = 400, seed: int = 1) -> str:
    r = random.Random(seed)
    return "\n".join(" ".join(r.choice(WORDS) for _ in range(r.randint(4, 10))) for _ in range(n))


def test_items_are_deterministic_and_the_label_points_at_the_true_next_line() -> None:
    text = _text()
    items = next_line_items(text, 20, context_lines=2, n_choices=4, seed=5)
    assert items == next_line_items(text, 20, context_lines=2, n_choices=4, seed=5)
    assert items != next_line_items(text, 20, context_lines=2, n_choices=4, seed=6)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    labels = set()
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        ctx = it["context"].split("\n")
        assert len(ctx) == 2
        # the context is two consecutive lines and the labelled choice is the line right after them
        starts = [i for i in range(len(lines) - 2) if lines[i : i + 2] == ctx]
        assert any(lines[i + 2] == it["choices"][it["label"]] for i in starts)
        labels.add(it["label"])
    assert len(labels) > 1  # the answer's position varies


def test_too_little_text_is_refused_with_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"only \d+ lines .* at least"):
        next_line_items(_text(30), 20)


def test_task_yaml_is_a_multiple_choice_task_on_the_data_file(tmp_path) -> None:
    cfg = yaml.safe_load(task_yaml(NEXT_LINE_TASK, tmp_path / "items.jsonl"))
    assert cfg["output_type"] == "multiple_choice" and cfg["task"] == NEXT_LINE_TASK
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "items.jsonl").resolve())
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc", "acc_norm"]

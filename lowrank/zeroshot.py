"""Zero-shot multiple-choice evaluation through lm-eval's Python API, and the project's own offline task.

Accuracy on a multiple-choice item with context ``c`` and choices ``y_1 … y_K`` is lm-eval's: the model picks
``argmax_j log p(y_j | c)`` (``acc``) or ``argmax_j log p(y_j | c) / bytes(y_j)`` (``acc_norm``), and the score
is the fraction of items where the pick is the labelled choice (chance = 1/K).

``lowrank_next_line`` is built here from held-out text (never the calibration text): the context is ``L``
consecutive non-empty lines, the choices are the true next line and ``K − 1`` lines drawn (seeded) from far away
in the same text, with lengths close to the true line's so that length alone does not give the answer away.
Its data is a JSON-lines file; the lm-eval task YAML pointing at it is written at evaluation time, so the
artifact carries no absolute path and survives a move (or a ``dvc pull`` into another clone).

lm-eval is imported lazily: the rest of ``lowrank`` does not need it.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .io import atomic_path

__all__ = ["NEXT_LINE_TASK", "PAPER_TASKS", "next_line_items", "write_items", "task_yaml", "task_manager",
           "check_tasks", "evaluate_zeroshot"]

log = logging.getLogger(__name__)

NEXT_LINE_TASK = "lowrank_next_line"
# the zero-shot task set of SVD-LLM / ZS-SVD tables (their data comes from the hub or a local datasets cache)
PAPER_TASKS = ("openbookqa", "arc_easy", "winogrande", "hellaswag", "arc_challenge", "piqa", "mathqa")


def next_line_items(text: str, n_items: int, context_lines: int = 3, n_choices: int = 4, seed: int = 0,
                    min_chars: int = 20, max_chars: int = 120) -> list[dict[str, Any]]:
    """``n_items`` "which line comes next" questions from ``text`` (seeded, deterministic).

    A line is *eligible* as an answer or a distractor when its stripped length is in ``[min_chars, max_chars]``.
    Each item: ``context`` (the ``context_lines`` non-empty lines before the answer, joined by newlines),
    ``choices`` (``n_choices`` distinct lines, the answer at a seeded position) and ``label`` (its index).
    Distractors come from at least 50 lines away and have the closest lengths to the answer among 40 candidates.
    """
    if n_items < 1 or context_lines < 1 or n_choices < 2:
        raise ValueError(f"need n_items >= 1, context_lines >= 1 and n_choices >= 2; got {n_items}, "
                         f"{context_lines}, {n_choices}")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    eligible = [i for i, ln in enumerate(lines) if i >= context_lines and min_chars <= len(ln) <= max_chars]
    if len(eligible) < max(2 * n_items, 50 * n_choices):
        raise ValueError(f"the task text has only {len(eligible)} lines of {min_chars}-{max_chars} characters; "
                         f"{n_items} items need at least {max(2 * n_items, 50 * n_choices)}: give the task a "
                         "longer held-out corpus or ask for fewer items")
    rng = random.Random(seed)
    answers = sorted(rng.sample(eligible, n_items))
    items = []
    for i in answers:
        answer = lines[i]
        pool = [j for j in rng.sample(eligible, min(len(eligible), 40)) if abs(j - i) >= 50 and lines[j] != answer]
        pool.sort(key=lambda j: (abs(len(lines[j]) - len(answer)), j))
        distractors: list[str] = []
        for j in pool:
            if lines[j] not in distractors:
                distractors.append(lines[j])
            if len(distractors) == n_choices - 1:
                break
        if len(distractors) < n_choices - 1:
            continue
        label = rng.randrange(n_choices)
        choices = distractors[:label] + [answer] + distractors[label:]
        items.append({"context": "\n".join(lines[i - context_lines : i]), "choices": choices, "label": label})
    return items


def write_items(path: str | os.PathLike, items: Sequence[dict[str, Any]]) -> None:
    """JSON lines, one item per line (the format of lm-eval's ``dataset_path: json``), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n" for it in items))


def task_yaml(name: str, data_file: str | os.PathLike) -> str:
    """An lm-eval task definition (YAML text) for next-line items stored in ``data_file``."""
    data_file = Path(data_file).resolve()
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data_file))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{context}}\\n\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
        "metadata: {version: 1.0}\n"
    )


def task_manager(local_tasks: dict[str, str | os.PathLike], folder: str | os.PathLike,
                 builtin: bool = True) -> Any:
    """An lm-eval ``TaskManager`` that also knows the project's local tasks (YAMLs written into ``folder``).

    ``builtin=False`` skips indexing lm-eval's own ~14k task definitions (seconds) when only local tasks run.
    """
    from lm_eval.tasks import TaskManager

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in local_tasks.items():
        (folder / f"{name}.yaml").write_text(task_yaml(name, data))
    if not local_tasks:
        return TaskManager()
    return TaskManager(include_path=str(folder), include_defaults=builtin)


def _missing_data_message(task: str, cfg: dict[str, Any], err: Exception) -> str:
    ds = cfg.get("dataset_path", "?")
    name = cfg.get("dataset_name")
    ds_full = f"{ds}" + (f" (config {name!r})" if name else "")
    offline = any(os.environ.get(v) == "1" for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    how = ("the hub is offline here (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE = 1), so it must already be in the "
           "local datasets cache" if offline else "it could not be downloaded")
    return (f"lm-eval task {task!r} needs the dataset {ds_full}; {how} ({type(err).__name__}: {str(err)[:200]}). "
            f"To provide it: on a machine with internet run `python -c \"import datasets; "
            f"datasets.load_dataset({ds!r}{', ' + repr(name) if name else ''})\"` and copy its cache folder "
            "(~/.cache/huggingface/datasets, or $HF_DATASETS_CACHE) here, or run this job where the hub is "
            f"reachable; else remove {task!r} from evaluation.zeroshot.tasks")


def check_tasks(tasks: Sequence[str], manager: Any) -> None:
    """Fail early, naming the task, if a task is unknown to lm-eval or its data cannot be loaded here."""
    from lm_eval.tasks import get_task_dict

    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"unknown lm-eval task {task!r} in evaluation.zeroshot.tasks{hint} "
                             f"(`lm-eval ls tasks` lists them; the project's own task is {NEXT_LINE_TASK!r})")
    for task in tasks:
        try:
            get_task_dict([task], manager)
        except Exception as e:  # lm-eval/datasets raise many types (OfflineModeIsEnabled, ConnectionError, ...)
            entry = manager.task_index.get(task) if hasattr(manager, "task_index") else None
            cfg = dict(getattr(entry, "cfg", None) or {})
            raise RuntimeError(_missing_data_message(task, cfg, e)) from e


def evaluate_zeroshot(model: nn.Module, tokenizer: Any, tasks: Sequence[str], local_tasks: dict[str, str],
                      num_fewshot: int = 0, batch_size: int = 4, limit: int | None = None,
                      max_length: int = 1024, device: str = "cpu", seed: int = 0) -> dict[str, dict[str, float]]:
    """Accuracy of an already-loaded (dense or compressed) model on lm-eval ``tasks``.

    Returns ``{task: {"acc": …, "acc_stderr": …, "acc_norm": …, "acc_norm_stderr": …, "n": items}}``. The
    model is wrapped in lm-eval's ``HFLM`` in-process (no reload, so ``LowRankLinear`` layers are evaluated as
    they are). ``local_tasks`` maps the project's task names to their JSON-lines data.
    """
    if not tasks:
        return {}
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory(prefix="lowrank-tasks-") as folder:
        local = {t: p for t, p in local_tasks.items() if t in tasks}
        manager = task_manager(local, folder, builtin=any(t not in local for t in tasks))
        check_tasks(tasks, manager)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                  device=str(device))
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False,
                                      bootstrap_iters=0)
    result: dict[str, dict[str, float]] = {}
    for task in tasks:
        raw = out["results"].get(task, {})
        metrics = {}
        for key, value in raw.items():
            if not isinstance(value, (int, float)) or "," not in key:
                continue
            metric, _filter = key.split(",", 1)
            metrics[metric] = float(value)
        n = int(out.get("n-samples", {}).get(task, {}).get("effective", 0))
        for metric in ("acc", "acc_norm"):  # binomial standard error, sqrt(p (1 - p) / (n - 1)), as lm-eval's
            if metric in metrics and n > 1:
                p = metrics[metric]
                metrics[f"{metric}_stderr"] = math.sqrt(p * (1 - p) / (n - 1))
        metrics["n"] = n
        result[task] = metrics
    return result

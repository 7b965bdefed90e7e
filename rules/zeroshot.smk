# Zero-shot accuracy through lm-eval: the project's offline task is built from held-out text, then every dense
# and compressed model is wrapped in lm-eval's HFLM in-process.

import lowrank.data as _zs_data
from lowrank.zeroshot import NEXT_LINE_TASK

RESERVED_TOP = {"summary", "tasks"}


def zeroshot_spec():
    return config["evaluation"]["zeroshot"]


def next_line_corpus():
    """The text of lowrank_next_line: its own corpus, else the evaluation corpus (held out from calibration)."""
    return zeroshot_spec()["next_line"].get("corpus") or config["evaluation"]["corpus"]


def has_tokenizer(model):
    """lm-eval needs a tokenizer: a random-init model without `tokenizer` (or a weights-only folder) has none."""
    spec = config["models"][model]
    if spec["source"] == "random_init":
        return bool(spec.get("tokenizer"))
    if spec["source"] == "hf" and Path(spec["path"]).is_dir():
        return any((Path(spec["path"]) / f).exists() for f in lowrank.model._TOKENIZER_FILES)
    return True


def zeroshot_models():
    return [m for m in MODELS if has_tokenizer(m)] if zeroshot_spec()["tasks"] else []


def _check_zeroshot_config():
    for name in MODELS:
        if name in RESERVED_TOP:
            raise ValueError(f"model name {name!r} is reserved for a results folder (results/{name}); rename it")
    if NEXT_LINE_TASK in zeroshot_spec()["tasks"]:
        corpus = next_line_corpus()
        if corpus.get("kind") in ("tokens", "windows"):
            raise ValueError(f"task {NEXT_LINE_TASK!r} needs text, but its corpus (evaluation.zeroshot.next_line."
                             f"corpus, else evaluation.corpus) is of kind {corpus['kind']!r}; set evaluation.zeroshot."
                             "next_line.corpus to held-out text, or remove the task from evaluation.zeroshot.tasks")
        try:
            _zs_data.check_disjoint(config["calibration"]["corpus"], corpus)
        except ValueError as e:
            raise ValueError(f"evaluation.zeroshot.next_line.corpus: {e}") from None


_check_zeroshot_config()


def zeroshot_params(wc=None):
    z = zeroshot_spec()
    return {k: z[k] for k in ("tasks", "num_fewshot", "batch_size", "max_length", "limit")}


def zeroshot_task_files(wc=None):
    """The local data of the project's tasks among the configured ones (built-in tasks need no input)."""
    return {NEXT_LINE_TASK: f"results/tasks/{NEXT_LINE_TASK}.jsonl"} if NEXT_LINE_TASK in zeroshot_spec()["tasks"] else {}


localrules:
    next_line_task,


rule next_line_task:
    """The project's offline multiple-choice task: which of K lines follows a passage of held-out text."""
    output:
        report(f"results/tasks/{NEXT_LINE_TASK}.jsonl", category="Zero-shot", labels={"file": "task items"}),
    params:
        task=lambda wc: {**zeroshot_spec()["next_line"], "corpus": next_line_corpus()},
        core=core_fingerprint("zeroshot", "data"),
    log:
        f"logs/next_line_task/{NEXT_LINE_TASK}.log",
    threads: 1
    script:
        "../scripts/next_line_task.py"


rule evaluate_zeroshot_source:
    """Zero-shot accuracy of the dense source model (the reference row)."""
    input:
        unpack(zeroshot_task_files),
        manifest="results/{model}/{source}/manifest.json",
    output:
        "results/{model}/{source}/eval/zeroshot.json",
    params:
        zeroshot=zeroshot_params,
        runtime=runtime_spec,
        core=core_fingerprint("zeroshot", "checkpoint", "model", "factorized", "accounting"),
    log:
        "logs/evaluate_zeroshot_source/{model}/{source}.log",
    benchmark:
        "benchmarks/evaluate_zeroshot_source/{model}/{source}.tsv"
    threads: 8
    resources:
        mem_mb=mem_mb_for,
        runtime=runtime_min_for,
        gpu=gpus_for,
    script:
        "../scripts/evaluate_zeroshot.py"


rule evaluate_zeroshot:
    """Zero-shot accuracy of one compressed model, loaded back from its stored factors."""
    input:
        unpack(zeroshot_task_files),
        compressed=final_compressed,
    output:
        "results/{model}/{method}/{ratio}/eval/zeroshot.json",
    params:
        zeroshot=zeroshot_params,
        runtime=runtime_spec,
        core=core_fingerprint("zeroshot", "checkpoint", "model", "factorized", "accounting"),
    log:
        "logs/evaluate_zeroshot/{model}/{method}/{ratio}.log",
    benchmark:
        "benchmarks/evaluate_zeroshot/{model}/{method}/{ratio}.tsv"
    threads: 8
    resources:
        mem_mb=mem_mb_for,
        runtime=runtime_min_for,
        gpu=gpus_for,
    script:
        "../scripts/evaluate_zeroshot.py"

# Zero-shot accuracy through lm-eval: the project's offline task is built from held-out text, then every dense
# and compressed model is wrapped in lm-eval's HFLM in-process.

from dag import (
    code_fingerprint, final_compressed, gpus_for, mem_mb_for, next_line_corpus, runtime_min_for, runtime_spec,
    zeroshot_params, zeroshot_spec, zeroshot_task_files,
)
from lowrank.zeroshot import NEXT_LINE_TASK


localrules:
    next_line_task,


rule next_line_task:
    """The project's offline multiple-choice task: which of K lines follows a passage of held-out text."""
    output:
        report(f"results/tasks/{NEXT_LINE_TASK}.jsonl", category="Zero-shot", labels={"file": "task items"}),
    params:
        task=lambda wc: {**zeroshot_spec()["next_line"], "corpus": next_line_corpus()},
        core=code_fingerprint("next_line_task"),
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
        core=code_fingerprint("evaluate_zeroshot"),
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
        core=code_fingerprint("evaluate_zeroshot"),
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

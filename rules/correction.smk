from dag import (
    code_fingerprint, gpu_mem_mb_for, gpus_for, mem_mb_streamed_for, method_spec, previous_stage, runtime_min_for,
    runtime_spec, source_manifest, stats_for_method,
)


rule correct:
    """Projected correction of stage {stage}-1 toward the teacher, then re-truncation to the same ranks."""
    input:
        unpack(stats_for_method),
        previous=previous_stage,
        manifest=source_manifest,
        windows="results/{model}/data/calibration.safetensors",
    output:
        factors="results/{model}/{method}/{ratio}/stage{stage}/factors.safetensors",
        manifest="results/{model}/{method}/{ratio}/stage{stage}/manifest.json",
    params:
        method=lambda wc: {k: method_spec(wc)[k] for k in ("whitening", "correction")},
        damping=config["whitening"]["damping"],
        lazy_load=config["runtime"]["lazy_load"],  # how the model is held (the results are identical)
        runtime=runtime_spec,
        core=code_fingerprint("correct"),
    wildcard_constraints:
        stage=r"[1-9]\d*",
    log:
        "logs/correct/{model}/{method}/{ratio}/stage{stage}.log",
    benchmark:
        "benchmarks/correct/{model}/{method}/{ratio}/stage{stage}.tsv"
    threads: 8
    resources:
        mem_mb=mem_mb_streamed_for,
        runtime=runtime_min_for,
        gpu=gpus_for,
        gpu_mem_mb=gpu_mem_mb_for,
    script:
        "../scripts/correct.py"

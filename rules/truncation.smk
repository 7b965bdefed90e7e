rule truncate:
    """Low-rank factors of every allocated target in the method's whitening space (stage 0)."""
    input:
        unpack(stats_for_method),
        manifest=source_manifest,
        allocation="results/{model}/{method}/{ratio}/allocation.json",
    output:
        factors="results/{model}/{method}/{ratio}/stage0/factors.safetensors",
        manifest="results/{model}/{method}/{ratio}/stage0/manifest.json",
    params:
        method=lambda wc: {k: method_spec(wc)[k] for k in ("whitening", "scorer", "allocator")},
        damping=config["whitening"]["damping"],
        decomposition=config["decomposition"]["method"],
        runtime=runtime_spec,
        core=core_fingerprint("truncation", "spaces", "whitening", "checkpoint", "calibration", "model",
                              "factorized", "accounting", "allocation", "decompose", "resume",
                              "sharded"),
    log:
        "logs/truncate/{model}/{method}/{ratio}.log",
    benchmark:
        "benchmarks/truncate/{model}/{method}/{ratio}.tsv"
    threads: 8
    resources:
        mem_mb=mem_mb_streamed_for,
        runtime=runtime_min_for,
        gpu=gpus_for,
        gpu_mem_mb=gpu_mem_mb_for,
    script:
        "../scripts/truncate.py"

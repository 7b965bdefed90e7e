from dag import (
    code_fingerprint, gpus_for, light_threads, mem_mb_for, method_spec, ratio_value, runtime_min_for, runtime_spec,
    shared_decomposition, source_manifest, stats_for_method,
)


rule quantize:
    """Hybrid low-rank + int8 model under the byte budget of {ratio}: the allocated ranks' factors and int8 rows."""
    input:
        unpack(stats_for_method),
        manifest=source_manifest,
        allocation="results/{model}/{method}/{ratio}/allocation.json",
        windows="results/{model}/data/calibration.safetensors",
        svd=shared_decomposition,
    output:
        factors="results/{model}/{method}/{ratio}/final/model.safetensors",
        manifest="results/{model}/{method}/{ratio}/final/manifest.json",
    params:
        method=lambda wc: {k: method_spec(wc)[k] for k in ("whitening", "scorer", "allocator", "min_rank_fraction",
                                                           "quantize")},
        damping=config["whitening"]["damping"],
        decomposition=config["decomposition"]["method"],
        ratio=ratio_value,
        lazy_load=config["runtime"]["lazy_load"],  # how the model is held (the results are identical)
        runtime=runtime_spec,
        core=code_fingerprint("quantize"),
    log:
        "logs/quantize/{model}/{method}/{ratio}.log",
    benchmark:
        "benchmarks/quantize/{model}/{method}/{ratio}.tsv"
    threads: light_threads
    resources:
        mem_mb=mem_mb_for,
        runtime=runtime_min_for,
        gpu=gpus_for,
    script:
        "../scripts/quantize.py"

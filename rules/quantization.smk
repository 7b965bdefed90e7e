def _check_quantize_config():
    """Recipes with a quantize stage: a greedy allocator orders the components; no correction stages."""
    for name, m in config["methods"].items():
        mode = m.get("quantize", {}).get("mode", "none")
        if mode == "none":
            continue
        if m["allocator"] not in ("zero_sum", "min_abs"):
            raise ValueError(f"method {name!r}: quantize.mode {mode!r} re-allocates ranks under the byte budget "
                             f"with a greedy allocator; set allocator to zero_sum or min_abs (not "
                             f"{m['allocator']!r})")
        if m.get("rehab", {}).get("steps", 0) > 0:
            raise ValueError(f"method {name!r}: rehab fine-tunes float factors, which the quantize stage replaces; "
                             "set rehab.steps to 0 or remove quantize")
        if m["correction"]["stages"] > 0:
            raise ValueError(f"method {name!r}: quantize after correction stages is not supported; set "
                             "correction.stages to 0 or remove quantize")


_check_quantize_config()


rule quantize:
    """Hybrid low-rank + int8 model under the byte budget of {ratio}: ranks, factors and int8 rows (final/)."""
    input:
        unpack(stats_for_method),
        manifest=source_manifest,
        scores=scores_for,
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
        runtime=runtime_spec,
        core=core_fingerprint("quantization", "allocation", "quantized_linear", "truncation", "gradients", "spaces",
                              "whitening", "output_metric", "checkpoint", "calibration", "model", "factorized",
                              "accounting", "decompose"),
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

from dag import (
    code_fingerprint, final_compressed, gpus_for, light_threads, mem_mb_for, runtime_min_for, runtime_spec,
)


rule evaluate_source:
    """Perplexity and size of the dense source model: the reference row of every table."""
    input:
        manifest="results/{model}/{source}/manifest.json",
        windows="results/{model}/data/evaluation.safetensors",
    output:
        "results/{model}/{source}/eval/ppl.json",
    params:
        batch_size=config["evaluation"]["batch_size"],
        lazy_load=config["runtime"]["lazy_load"],  # how the model is held (the results are identical)
        runtime=runtime_spec,
        core=code_fingerprint("evaluate_ppl"),
    log:
        "logs/evaluate_source/{model}/{source}.log",
    benchmark:
        "benchmarks/evaluate_source/{model}/{source}.tsv"
    threads: light_threads
    resources:
        mem_mb=mem_mb_for,
        runtime=runtime_min_for,
        gpu=gpus_for,
    script:
        "../scripts/evaluate_ppl.py"


rule evaluate_compressed:
    """Perplexity and size of one compressed model, loaded back from its stored factors."""
    input:
        compressed=final_compressed,
        windows="results/{model}/data/evaluation.safetensors",
    output:
        "results/{model}/{method}/{ratio}/eval/ppl.json",
    params:
        batch_size=config["evaluation"]["batch_size"],
        lazy_load=config["runtime"]["lazy_load"],  # how the model is held (the results are identical)
        runtime=runtime_spec,
        core=code_fingerprint("evaluate_ppl"),
    log:
        "logs/evaluate_compressed/{model}/{method}/{ratio}.log",
    benchmark:
        "benchmarks/evaluate_compressed/{model}/{method}/{ratio}.tsv"
    threads: light_threads
    resources:
        mem_mb=mem_mb_for,
        runtime=runtime_min_for,
        gpu=gpus_for,
    script:
        "../scripts/evaluate_ppl.py"

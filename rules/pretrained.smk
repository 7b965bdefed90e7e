from dag import code_fingerprint, mem_mb_for, model_spec, runtime_min_for, source_fingerprint_of


rule pretrained:
    """The source model: a GGUF or random-init model is written once as a Hugging Face folder; a local folder is
    only referenced (a 70B checkpoint is never copied)."""
    output:
        manifest="results/{model}/pretrained/manifest.json",
        hf=directory("results/{model}/pretrained/hf"),
    params:
        spec=model_spec,
        fingerprint=source_fingerprint_of,  # content of local model files: a rewrite reruns what depends on it
        core=code_fingerprint("pretrained"),
    log:
        "logs/pretrained/{model}.log",
    benchmark:
        "benchmarks/pretrained/{model}.tsv"
    threads: 2
    resources:
        mem_mb=mem_mb_for,
        runtime=runtime_min_for,
    script:
        "../scripts/pretrained.py"

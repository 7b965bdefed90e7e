from dag import code_fingerprint, split_spec


rule token_windows:
    """Seeded calibration windows, or held-out non-overlapping evaluation windows, as a token tensor."""
    input:
        manifest="results/{model}/pretrained/manifest.json",
    output:
        "results/{model}/data/{split}.safetensors",
    params:
        split=lambda wc: wc.split,
        spec=split_spec,
        core=code_fingerprint("token_windows"),
    log:
        "logs/token_windows/{model}/{split}.log",
    benchmark:
        "benchmarks/token_windows/{model}/{split}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    script:
        "../scripts/token_windows.py"

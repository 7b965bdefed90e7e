from dag import allocator_stats, code_fingerprint, method_spec, ratio_value, scores_for


rule allocate:
    """Ranks per target under the parameter budget of {ratio} (kept fraction of target parameters)."""
    input:
        unpack(allocator_stats),
        scores=scores_for,
    output:
        "results/{model}/{method}/{ratio}/allocation.json",
    params:
        allocator=lambda wc: method_spec(wc)["allocator"],
        min_rank_fraction=lambda wc: method_spec(wc)["min_rank_fraction"],
        ratio=ratio_value,
        core=code_fingerprint("allocate"),
    log:
        "logs/allocate/{model}/{method}/{ratio}.log",
    benchmark:
        "benchmarks/allocate/{model}/{method}/{ratio}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    script:
        "../scripts/allocate.py"

from dag import RECIPES, allocator_stats, code_fingerprint, method_spec, ratio_value, scores_for


rule allocate:
    """Ranks per target under the parameter budget of {ratio} (kept fraction of target parameters); an int8 recipe's
    under its byte budget (kept fraction of the dense targets at float16), which the quantize stage stores."""
    input:
        unpack(allocator_stats),
        scores=scores_for,
    output:
        "results/{model}/{method}/{ratio}/allocation.json",
    params:
        allocator=lambda wc: method_spec(wc)["allocator"],
        min_rank_fraction=lambda wc: method_spec(wc)["min_rank_fraction"],
        quantize=lambda wc: RECIPES[wc.method].quantize.mode,
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

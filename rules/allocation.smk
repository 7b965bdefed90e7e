from dag import (
    RECIPES, allocator_stats, code_fingerprint, mem_mb_for, method_spec, methods_pattern, owner_allocation,
    progressive_inputs, progressive_options, progressive_runtime, progressive_stages, ratio_value, scores_for,
)


localrules:
    share_allocation,


rule allocate:
    """Ranks per target under the parameter budget of {ratio} (kept fraction of target parameters); an int8 recipe's
    under its byte budget (kept fraction of the dense targets at float16), which the quantize stage stores."""
    input:
        unpack(allocator_stats),
        unpack(progressive_inputs),
        scores=scores_for,
    output:
        "results/{model}/{method}/{ratio}/allocation.json",
    wildcard_constraints:
        method=methods_pattern(allocating=True),
    params:
        allocator=lambda wc: method_spec(wc)["allocator"],
        min_rank_fraction=lambda wc: method_spec(wc)["min_rank_fraction"],
        quantize=lambda wc: RECIPES[wc.method].quantize.mode,
        ratio=ratio_value,
        progressive=progressive_options,
        runtime=progressive_runtime,  # the device and dtype of `stage`: only a progressive allocation runs the model
        core=code_fingerprint("allocate"),
    log:
        "logs/allocate/{model}/{method}/{ratio}.log",
    benchmark:
        "benchmarks/allocate/{model}/{method}/{ratio}.tsv"
    threads: lambda wc: 8 if progressive_stages(wc) else 1  # progressive: one streamed backward per stage
    resources:
        mem_mb=lambda wc, attempt: mem_mb_for(wc, attempt, "allocate", 2) if progressive_stages(wc) else 4000,
    script:
        "../scripts/allocate.py"


rule share_allocation:
    """A recipe whose allocation equals an earlier recipe's (same lowrank.recipes.Recipe.allocation_key: the stages
    after the allocation differ) gets a copy of that recipe's allocation.json instead of its own allocate job."""
    input:
        owner_allocation,
    output:
        "results/{model}/{method}/{ratio}/allocation.json",
    wildcard_constraints:
        method=methods_pattern(allocating=False),
    log:
        "logs/allocate/{model}/{method}/{ratio}.log",
    shell:
        "cp {input:q} {output:q} && echo 'copied from {input}' > {log:q}"

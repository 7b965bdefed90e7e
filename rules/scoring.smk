from dag import (
    code_fingerprint, gpu_mem_mb_for, gpus_for, light_threads, mem_mb_streamed_for, runtime_min_for, runtime_spec,
    scoring_inputs, scoring_options,
)
from lowrank.scoring import SCORERS
from lowrank.spaces import SPACES


rule score_components:
    """Per-component scores of every target in one whitening space (ratio-independent, shared by every ratio)."""
    input:
        unpack(scoring_inputs),
        manifest="results/{model}/{source}/manifest.json",
    output:
        "results/{model}/{source}/scores/{whitening}/{scorer}.safetensors",
    params:
        scorer=lambda wc: wc.scorer,
        whitening=lambda wc: wc.whitening,
        damping=config["whitening"]["damping"],
        scoring=scoring_options,
        decomposition=config["decomposition"]["method"],
        runtime=runtime_spec,
        lazy_load=config["runtime"]["lazy_load"],  # how the model is held (the results are identical)
        core=code_fingerprint("score_components"),
    wildcard_constraints:
        scorer="|".join(SCORERS),
        whitening="|".join(SPACES),
    log:
        "logs/score_components/{model}/{source}/{whitening}/{scorer}.log",
    benchmark:
        "benchmarks/score_components/{model}/{source}/{whitening}/{scorer}.tsv"
    priority: 10  # the gradient scores are the default run's longest job: before the per-recipe jobs
    threads: lambda wc: 8 if SCORERS[wc.scorer].needs_gradients else light_threads(wc)
    resources:
        mem_mb=mem_mb_streamed_for,
        runtime=runtime_min_for,
        gpu=gpus_for,
        gpu_mem_mb=gpu_mem_mb_for,
    script:
        "../scripts/score_components.py"

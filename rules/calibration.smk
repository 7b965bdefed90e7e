from dag import (
    code_fingerprint, gpu_mem_mb_for, gpus_for, mem_mb_streamed_for, runtime_min_for, runtime_spec, stat_options,
)
from lowrank.calibration import STATS


rule calibration_stats:
    """Calibration statistics of the source model (input_gram, act_scale: streamed block by block; fisher: one
    backward per statistics.fisher.windows_per_backward windows; asvd_sensitivity: #targets x #ratios partial
    forwards); shared by every method and ratio."""
    input:
        manifest="results/{model}/{source}/manifest.json",
        windows="results/{model}/data/calibration.safetensors",
    output:
        "results/{model}/{source}/stats/{stat}.safetensors",
    params:
        stat=lambda wc: wc.stat,
        options=stat_options,
        batch_size=config["calibration"]["batch_size"],
        runtime=runtime_spec,
        lazy_load=config["runtime"]["lazy_load"],  # how the model is held (the results are identical)
        core=code_fingerprint("calibration_stats"),
    wildcard_constraints:
        stat="|".join(STATS),
    log:
        "logs/calibration_stats/{model}/{source}/{stat}.log",
    benchmark:
        "benchmarks/calibration_stats/{model}/{source}/{stat}.tsv"
    priority: 20  # upstream of every method: started first when cores free up (issue 15)
    threads: 8
    resources:
        mem_mb=mem_mb_streamed_for,
        runtime=runtime_min_for,
        gpu=gpus_for,
        gpu_mem_mb=gpu_mem_mb_for,
    script:
        "../scripts/calibration_stats.py"

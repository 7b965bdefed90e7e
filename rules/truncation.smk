from dag import (
    code_fingerprint, gpu_mem_mb_for, gpus_for, light_threads, mem_mb_streamed_for, method_spec, runtime_min_for,
    runtime_spec, shared_decomposition, source_manifest, stats_for_method, whitening_stats,
)
from lowrank.spaces import SPACES


rule decompose:
    """Every target's components in one space: the thin SVD T^T W S = U Sigma V^T as W = P_out Sigma P_in^T
    (P_out = T^-T U, P_in^T = V^T S^-1 in float32, sigma in float64), read by every truncation and quantize job of
    that model, source and space (decomposition.share)."""
    input:
        unpack(lambda wc: whitening_stats(wc.whitening, wc.model, wc.source)),
        manifest="results/{model}/{source}/manifest.json",
    output:
        "results/{model}/{source}/decomposition/{whitening}.safetensors",
    params:
        damping=config["whitening"]["damping"],
        decomposition=config["decomposition"]["method"],
        runtime=runtime_spec,
        lazy_load=config["runtime"]["lazy_load"],  # how the model is held (the results are identical)
        core=code_fingerprint("decompose"),
    wildcard_constraints:
        whitening="|".join(SPACES),
    log:
        "logs/decompose/{model}/{source}/{whitening}.log",
    benchmark:
        "benchmarks/decompose/{model}/{source}/{whitening}.tsv"
    threads: light_threads
    resources:
        mem_mb=mem_mb_streamed_for,
        runtime=runtime_min_for,
        gpu=gpus_for,
        gpu_mem_mb=gpu_mem_mb_for,
    script:
        "../scripts/decompose.py"


rule truncate:
    """Low-rank factors of every allocated target in the method's whitening space (stage 0)."""
    input:
        unpack(stats_for_method),
        manifest=source_manifest,
        allocation="results/{model}/{method}/{ratio}/allocation.json",
        svd=shared_decomposition,
    output:
        factors="results/{model}/{method}/{ratio}/stage0/factors.safetensors",
        manifest="results/{model}/{method}/{ratio}/stage0/manifest.json",
    params:
        method=lambda wc: {k: method_spec(wc)[k] for k in ("whitening", "scorer", "allocator")},
        damping=config["whitening"]["damping"],
        decomposition=config["decomposition"]["method"],
        runtime=runtime_spec,
        lazy_load=config["runtime"]["lazy_load"],  # how the model is held (the results are identical)
        core=code_fingerprint("truncate"),
    log:
        "logs/truncate/{model}/{method}/{ratio}.log",
    benchmark:
        "benchmarks/truncate/{model}/{method}/{ratio}.tsv"
    threads: light_threads
    resources:
        mem_mb=mem_mb_streamed_for,
        runtime=runtime_min_for,
        gpu=gpus_for,
        gpu_mem_mb=gpu_mem_mb_for,
    script:
        "../scripts/truncate.py"

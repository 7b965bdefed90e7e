from dag import (
    code_fingerprint, gpu_mem_mb_for, gpus_for, mem_mb_streamed_for, refine_spec, runtime_min_for, runtime_spec,
    source_manifest, stages_of,
)


rule refine:
    """Block-local refinement of the method's last stage against the dense model (lowrank/refine.py)."""
    input:
        previous=lambda wc: f"results/{wc.model}/{wc.method}/{wc.ratio}/stage{stages_of(wc.method)}/manifest.json",
        manifest=source_manifest,
        windows="results/{model}/data/calibration.safetensors",
    output:
        factors="results/{model}/{method}/{ratio}/refine/factors.safetensors",
        manifest="results/{model}/{method}/{ratio}/refine/manifest.json",
    params:
        refine=refine_spec,
        runtime=runtime_spec,
        lazy_load=config["runtime"]["lazy_load"],  # how the model is held (the results are identical)
        core=code_fingerprint("refine"),
    log:
        "logs/refine/{model}/{method}/{ratio}.log",
    benchmark:
        "benchmarks/refine/{model}/{method}/{ratio}.tsv"
    threads: 8
    resources:
        mem_mb=mem_mb_streamed_for,
        runtime=runtime_min_for,
        gpu=gpus_for,
        gpu_mem_mb=gpu_mem_mb_for,
    script:
        "../scripts/refine.py"

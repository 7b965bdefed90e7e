# Generation speed, peak memory and bytes on disk of the dense and every compressed model.

from dag import code_fingerprint, final_compressed, gpus_for, mem_mb_for, runtime_min_for, runtime_spec, speed_spec


rule measure_speed_source:
    """Prefill / decode throughput and peak memory of the dense source model (the reference row)."""
    input:
        manifest="results/{model}/{source}/manifest.json",
    output:
        "results/{model}/{source}/eval/speed.json",
    params:
        speed=speed_spec,
        runtime=runtime_spec,
        core=code_fingerprint("measure_speed"),
    log:
        "logs/measure_speed_source/{model}/{source}.log",
    benchmark:
        "benchmarks/measure_speed_source/{model}/{source}.tsv"
    threads: 2
    resources:
        mem_mb=mem_mb_for,
        runtime=runtime_min_for,
        gpu=gpus_for,
        speed_slot=1,  # `--resources speed_slot=1` keeps timed jobs from sharing cores with each other
    script:
        "../scripts/measure_speed.py"


rule measure_speed:
    """Prefill / decode throughput, peak memory and stored bytes of one compressed model."""
    input:
        compressed=final_compressed,
    output:
        "results/{model}/{method}/{ratio}/eval/speed.json",
    params:
        speed=speed_spec,
        runtime=runtime_spec,
        core=code_fingerprint("measure_speed"),
    log:
        "logs/measure_speed/{model}/{method}/{ratio}.log",
    benchmark:
        "benchmarks/measure_speed/{model}/{method}/{ratio}.tsv"
    threads: 2
    resources:
        mem_mb=mem_mb_for,
        runtime=runtime_min_for,
        gpu=gpus_for,
        speed_slot=1,
    script:
        "../scripts/measure_speed.py"

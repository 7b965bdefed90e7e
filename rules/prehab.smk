# Low-Rank Prehab (a source model, results/{model}/prehab, and its lambda = 0 control, results/{model}/prehab-control)
# and rehab (a fine-tune of compressed factors).

from dag import (
    code_fingerprint, gpus_for, last_stage, mem_mb_for, prehab_pairs, prehab_plan_input, prehab_report_inputs,
    prehab_settings, rehab_spec, runtime_min_for, runtime_spec, source_manifest,
)


rule prehab:
    """Fine-tune the pretrained target weights with CE + lambda(t) x rank surrogate of W S (resumable); source
    prehab-control is the same run with lambda = 0 (its surrogate and planned tail are still recorded)."""
    input:
        unpack(prehab_plan_input),
        manifest="results/{model}/pretrained/manifest.json",
        windows="results/{model}/data/calibration.safetensors",
        input_gram="results/{model}/pretrained/stats/input_gram.safetensors",
    output:
        manifest="results/{model}/{source}/manifest.json",
        hf=directory("results/{model}/{source}/hf"),
        spectra="results/{model}/{source}/spectra.safetensors",
    wildcard_constraints:
        source="prehab|prehab-control",
    params:
        settings=prehab_settings,
        damping=config["whitening"]["damping"],
        runtime=runtime_spec,
        core=code_fingerprint("prehab"),
    log:
        "logs/prehab/{model}/{source}.log",
    benchmark:
        "benchmarks/prehab/{model}/{source}.tsv"
    threads: 8
    resources:
        mem_mb=lambda wc, attempt, rulename: mem_mb_for(wc, attempt, rulename, factor=2),
        runtime=lambda wc, attempt, rulename: runtime_min_for(wc, attempt, rulename, factor=4),
        gpu=gpus_for,
    script:
        "../scripts/prehab.py"


rule rehab:
    """Fine-tune the low-rank factors of the method's last stage on the calibration windows."""
    input:
        previous=last_stage,
        manifest=source_manifest,
        windows="results/{model}/data/calibration.safetensors",
    output:
        factors="results/{model}/{method}/{ratio}/rehab/factors.safetensors",
        manifest="results/{model}/{method}/{ratio}/rehab/manifest.json",
    params:
        rehab=rehab_spec,
        runtime=runtime_spec,
        core=code_fingerprint("rehab"),
    log:
        "logs/rehab/{model}/{method}/{ratio}.log",
    benchmark:
        "benchmarks/rehab/{model}/{method}/{ratio}.tsv"
    threads: 8
    resources:
        mem_mb=mem_mb_for,
        runtime=runtime_min_for,
        gpu=gpus_for,
    script:
        "../scripts/rehab.py"


localrules:
    prehab_report,


rule prehab_report:
    """Dense and compressed perplexity with / without prehab, whitened ranks before / after, spectra plot, and
    the per-step CE / surrogate / planned tail of every prehab run and its control (history plot)."""
    input:
        unpack(prehab_report_inputs),
    output:
        markdown="results/summary/prehab.md",
        json="results/summary/prehab.json",
        plot="results/summary/plots/prehab_spectra.png",
        history_plot="results/summary/plots/prehab_history.png",
    params:
        pairs=prehab_pairs,
        core=code_fingerprint("prehab_report"),
    log:
        "logs/prehab_report.log",
    threads: 1
    script:
        "../scripts/prehab_report.py"

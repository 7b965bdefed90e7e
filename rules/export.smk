# Self-contained Hugging Face folders of the final compressed models (lowrank.hf_format).

from dag import (
    calibration_slice, code_fingerprint, final_compressed, mem_mb_for, method_spec, model_spec, runtime_min_for,
    runtime_spec, source_manifest,
)


rule export_hf_folder:
    """The last stage of a method as a folder that `import lowrank` + `AutoModelForCausalLM.from_pretrained` loads
    (factors, tokenizer, generation config, model card with the held-out perplexity)."""
    input:
        compressed=final_compressed,
        ppl="results/{model}/{method}/{ratio}/eval/ppl.json",
        dense_ppl="results/{model}/pretrained/eval/ppl.json",
        base=source_manifest,
    output:
        directory("results/{model}/{method}/{ratio}/hf"),
    params:
        model=model_spec,
        method=method_spec,
        calibration=calibration_slice,
        runtime=runtime_spec,
        core=code_fingerprint("export_hf_folder"),
    log:
        "logs/export_hf_folder/{model}/{method}/{ratio}.log",
    benchmark:
        "benchmarks/export_hf_folder/{model}/{method}/{ratio}.tsv"
    threads: 1
    resources:
        mem_mb=mem_mb_for,
        runtime=runtime_min_for,
    script:
        "../scripts/export_hf_folder.py"

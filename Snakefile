# lowrank: low-rank (SVD) compression of pretrained causal LMs. This file is the table of contents.
#
# results/
#   {model}/pretrained/manifest.json, hf/              pretrained   (the source model, converted once if needed)
#   {model}/data/{split}.safetensors                   token_windows (split: calibration | evaluation, disjoint)
#   {model}/{source}/stats/{stat}.safetensors          calibration_stats (shared by every method and ratio)
#   {model}/{source}/scores/{whitening}/{scorer}.safetensors   score_components (ratio-independent)
#   {model}/{source}/eval/ppl.json                     evaluate_source (the dense reference)
#   {model}/{source}/decomposition/{whitening}.safetensors   decompose (temporary: thin SVDs every truncation cuts)
#   {model}/{method}/{ratio}/allocation.json           allocate     (first rule with {ratio}; ratio = kept fraction)
#   {model}/{method}/{ratio}/stage0/                   truncate     (factors.safetensors + manifest.json)
#   {model}/{method}/{ratio}/stage{s}/                 correct      (projected correction s of S; S from the recipe)
#   {model}/{method}/{ratio}/final/                    quantize     (int8 + float16 rows under a byte budget)
#   {model}/{method}/{ratio}/eval/ppl.json             evaluate_compressed
#   {model}/{source|method/ratio}/eval/zeroshot.json   evaluate_zeroshot(_source)  (lm-eval accuracy)
#   {model}/{source|method/ratio}/eval/speed.json      measure_speed(_source)  (tokens/s, peak memory, bytes)
#   tasks/lowrank_next_line.jsonl                      next_line_task (the offline zero-shot task's items)
#   summary/table.csv, table.md, metrics.json, plots/  summarize
#   {model}/prehab/manifest.json, hf/, spectra.safetensors   prehab (source of recipes with `prehab: true`)
#   {model}/prehab-control/...   (the same, lambda = 0)      prehab (source of recipes with `prehab: control`)
#   {model}/{method}/{ratio}/rehab/                    rehab        (recipes with rehab.steps > 0; evaluation reads it)
#   summary/prehab.md, prehab.json, plots/prehab_{spectra,history}.png   prehab_report
#   {model}/{method}/{ratio}/refine/                   refine       (recipes with refine.mode; evaluation reads it)
#   {model}/{method}/{ratio}/hf/                       export_hf_folder (self-contained lowrank HF folder + card)
# logs/<rule>/... and benchmarks/<rule>/... mirror these paths.

from snakemake.utils import min_version

min_version("8.0")


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/pretrained.smk"
include: "rules/data.smk"
include: "rules/calibration.smk"
include: "rules/scoring.smk"
include: "rules/allocation.smk"
include: "rules/truncation.smk"
include: "rules/correction.smk"
include: "rules/quantization.smk"
include: "rules/evaluation.smk"
include: "rules/zeroshot.smk"
include: "rules/speed.smk"
include: "rules/report.smk"
include: "rules/prehab.smk"
include: "rules/refine.smk"
include: "rules/export.smk"


dag.gpu_only_resources()  # the profile's gpu_model / cpus_per_gpu reach only the jobs that ask for a GPU


rule all:
    input:
        dag.final_targets(),
        dag.hf_folder_targets(),
    default_target: True

localrules:
    summarize,


rule summarize:
    """Long-format table, markdown table, DVC metrics and the perplexity plot, over the current config only."""
    input:
        dense=expand("results/{model}/pretrained/eval/ppl.json", model=MODELS),
        compressed=expand("results/{model}/{method}/{ratio}/eval/ppl.json", model=MODELS, method=METHODS,
                          ratio=RATIOS),
        allocations=expand("results/{model}/{method}/{ratio}/allocation.json", model=MODELS, method=METHODS,
                           ratio=RATIOS),
    output:
        table="results/summary/table.csv",
        markdown="results/summary/table.md",
        metrics="results/summary/metrics.json",
        plot_data="results/summary/plots/ppl_vs_ratio.csv",
        plot="results/summary/plots/ppl_vs_ratio.png",
        ranks="results/summary/ranks.csv",
        ranks_plot="results/summary/plots/ranks.png",
    params:
        core=core_fingerprint("report"),
    log:
        "logs/summarize.log",
    threads: 1
    script:
        "../scripts/summarize.py"

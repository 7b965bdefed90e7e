from dag import METHODS, MODELS, RATIOS, code_fingerprint, speed_models, zeroshot_models


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
        zeroshot=expand("results/{model}/pretrained/eval/zeroshot.json", model=zeroshot_models())
        + expand("results/{model}/{method}/{ratio}/eval/zeroshot.json", model=zeroshot_models(), method=METHODS,
                 ratio=RATIOS),
        speed=expand("results/{model}/pretrained/eval/speed.json", model=speed_models())
        + expand("results/{model}/{method}/{ratio}/eval/speed.json", model=speed_models(), method=METHODS,
                 ratio=RATIOS),
    output:
        table=report("results/summary/table.csv", category="Tables", labels={"table": "long format (csv)"}),
        markdown=report("results/summary/table.md", category="Tables", labels={"table": "perplexity and accuracy"}),
        metrics="results/summary/metrics.json",
        plot_data="results/summary/plots/ppl_vs_ratio.csv",
        plot=report("results/summary/plots/ppl_vs_ratio.png", category="Plots", labels={"plot": "perplexity"}),
        ranks="results/summary/ranks.csv",
        ranks_plot=report("results/summary/plots/ranks.png", category="Plots", labels={"plot": "kept ranks"}),
        accuracy_plot=report("results/summary/plots/accuracy_vs_ratio.png", category="Plots",
                             labels={"plot": "zero-shot accuracy"}),
        speed=report("results/summary/speed.md", category="Tables", labels={"table": "speed and memory"}),
    params:
        core=code_fingerprint("summarize"),
    log:
        "logs/summarize.log",
    threads: 1
    script:
        "../scripts/summarize.py"

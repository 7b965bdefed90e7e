"""Rule summarize: long-format results table, markdown table, DVC metrics and the perplexity plot."""

import pandas as pd
from _adapter import stage

from lowrank.io import atomic_path, read_json, write_json
from lowrank.report import (accuracy_pivot, bytes_pivot, markdown, metrics_tree, plot_accuracy, plot_ppl, plot_ranks,
                            ppl_pivot, ranks_table, results_table, speed_table, speed_wide, wide_ppl, zeroshot_table)


def run(smk) -> None:
    with stage(smk) as st:
        dense = [read_json(p) for p in smk.input.dense]
        compressed = [read_json(p) for p in smk.input.compressed]
        allocations = [read_json(p) for p in smk.input.allocations]
        # both lists were expanded over the same (model, method, ratio) product, so they pair up in order
        table = results_table(dense, list(zip(compressed, allocations)))
        zeroshot = zeroshot_table([read_json(p) for p in smk.input.zeroshot])
        speed = speed_table([read_json(p) for p in smk.input.speed])
        table = pd.concat([t for t in (table, zeroshot, speed) if len(t)], ignore_index=True)
        with atomic_path(smk.output.table) as tmp:
            table.to_csv(tmp, index=False)
        wide = wide_ppl(table)
        with atomic_path(smk.output.markdown) as tmp:
            pivot = ppl_pivot(table)
            pivot = pivot.astype(object).where(pivot.notna(), None)  # blank cells, not "nan"
            text = pivot.to_markdown(index=False, floatfmt=".2f", missingval="") + "\n"
            kept_bytes = bytes_pivot(table)
            if not kept_bytes.empty:  # the same runs on the byte axis (float16 = 1; int8 rows count 1 byte)
                text += "\nKept bytes (fraction of the dense float16 targets):\n\n"
                text += kept_bytes.to_markdown(index=False, floatfmt=".3f", missingval="") + "\n"
            if len(zeroshot):
                text += ("\nZero-shot accuracy (lm-eval `acc`; `acc_norm` and standard errors are in table.csv):"
                         "\n\n" + markdown(accuracy_pivot(table, "acc"), ".3f"))
            tmp.write_text(text)
        with atomic_path(smk.output.speed) as tmp:
            tmp.write_text(markdown(speed_wide(table), ".1f") if len(speed) else "speed was not measured\n")
        with atomic_path(smk.output.plot_data) as tmp:
            wide.to_csv(tmp, index=False)
        write_json(smk.output.metrics, metrics_tree(table))
        ranks = ranks_table([(r["model"], r["method"], float(r["ratio"]), a) for r, a in zip(compressed, allocations)])
        with atomic_path(smk.output.ranks) as tmp:
            ranks.to_csv(tmp, index=False)
        plot_ranks(ranks, smk.output.ranks_plot)
        plot_ppl(table, smk.output.plot)
        plot_accuracy(table, smk.output.accuracy_plot)
        st.log.info("perplexity by method and kept fraction:\n%s", ppl_pivot(table).to_string(index=False))


if "snakemake" in globals():
    run(snakemake)

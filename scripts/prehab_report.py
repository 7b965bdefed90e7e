"""Rule prehab_report: dense / compressed perplexity with and without prehab, whitened ranks, spectra plot."""

import pandas as pd
from _adapter import stage

from lowrank.io import atomic_path, load_tensors, read_json, write_json
from lowrank.report import plot_prehab_history, plot_prehab_spectra, prehab_rows


def run(smk) -> None:
    with stage(smk) as st:
        by_model = lambda paths: {read_json(p)["model"]: read_json(p) for p in paths}  # noqa: E731
        evals = {}
        for p in list(smk.input.with_prehab) + list(smk.input.without_prehab):
            rec = read_json(p)
            evals[(rec["model"], rec["method"], rec["ratio"])] = rec
        ratios = sorted({r for _, _, r in evals}, reverse=True)
        prehab = {}
        spectra = {}
        for man_path, spec_path in zip(smk.input.prehab, smk.input.spectra):
            man = read_json(man_path)
            prehab[man["model"]] = man
            t, _ = load_tensors(spec_path)
            spectra[man["model"]] = ({k[7:]: v for k, v in t.items() if k.startswith("before.")},
                                     {k[6:]: v for k, v in t.items() if k.startswith("after.")})
        control = {read_json(p)["model"]: read_json(p) for p in smk.input.control}
        rows = prehab_rows(by_model(smk.input.dense_before), by_model(smk.input.dense_after), prehab, evals,
                           {m: dict(p) for m, p in dict(smk.params.pairs).items()}, ratios,
                           by_model(smk.input.dense_control), control)
        write_json(smk.output.json, {"rows": rows, "history": {m: p["history"] for m, p in prehab.items()},
                                     "control_history": {m: p["history"] for m, p in control.items()}})
        table = pd.DataFrame(rows)
        with atomic_path(smk.output.markdown) as tmp:
            tmp.write_text(table.astype(object).where(table.notna(), None)
                           .to_markdown(index=False, floatfmt=".3f", missingval="") + "\n")
        plot_prehab_spectra(spectra, smk.output.plot)
        plot_prehab_history({m: p["history"] for m, p in prehab.items()},
                            {m: p["history"] for m, p in control.items()}, smk.output.history_plot)
        st.log.info("prehab report:\n%s", table.to_string(index=False))


if "snakemake" in globals():
    run(snakemake)

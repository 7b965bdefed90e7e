"""Rule export_hf_folder: the final compressed model as a self-contained lowrank Hugging Face folder + card."""

from pathlib import Path

from _adapter import stage

from lowrank.export import model_card, write_lowrank_hf
from lowrank.io import read_json


def run(smk) -> None:
    with stage(smk) as st:
        wc = smk.wildcards
        folder = Path(smk.input.compressed).parent
        base = read_json(smk.input.base)
        ppl = read_json(smk.input.ppl)
        spec = smk.params.model
        base_name = spec.get("path") or spec.get("file") or spec.get("model_type") or wc.model
        out = Path(smk.output[0])
        card = model_card(
            base_model=str(base_name), method=wc.method, recipe=dict(smk.params.method),
            kept_fraction=float(wc.ratio), calibration=dict(smk.params.calibration),
            command=f"snakemake --cores all {out.as_posix()}   # config.yaml: models.{wc.model}, methods.{wc.method}",
            ppl=ppl, dense_ppl=read_json(smk.input.dense_ppl)["ppl"],
            architecture=base.get("architecture", {}).get("class"))
        write_lowrank_hf(folder, out, card=card, dtype=st.dtype,
                         provenance={"model": wc.model, "kept_fraction": float(wc.ratio), "ppl": ppl["ppl"]})
        st.log.info("wrote %s (ppl %.4f)", out, ppl["ppl"])


if "snakemake" in globals():
    run(snakemake)

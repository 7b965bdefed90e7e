"""Rule refine: block-local refinement of a method's last stage against the dense model (``refine/``)."""

from pathlib import Path

from _adapter import lazy_load, stage

from lowrank.checkpoint import load_compressed, save_compressed
from lowrank.io import load_tensors, read_json
from lowrank.refine import RefineConfig, refine_model
from lowrank.model import model_path
from lowrank.sharded import load_model_streaming, streams


def run(smk) -> None:
    with stage(smk) as st:
        spec = dict(smk.params.refine)
        cfg = RefineConfig.from_dict(spec)
        # lazy (runtime.lazy_load, or a base larger than host memory): one block of each model at a time; the
        # compressed model's factors are kept on CPU as they are refined (the result), its dense weights are not
        lazy = streams(model_path(smk.input.manifest), st.dtype, lazy_load(smk))
        dense = load_model_streaming(smk.input.manifest, dtype=st.dtype, lazy=lazy)
        model = load_compressed(Path(smk.input.previous).parent, dtype=st.dtype, lazy=lazy, keep=True)
        windows = load_tensors(smk.input.windows)[0]["tokens"]
        report = refine_model(model, dense, windows, cfg, st.device)
        errs = report.blocks
        st.log.info("refine (%s): mean relative block-output error %.4g -> %.4g over %d blocks", cfg.mode,
                    sum(b["error_before"] for b in errs) / len(errs), sum(b["error_after"] for b in errs) / len(errs),
                    len(errs))
        previous = read_json(smk.input.previous)
        save_compressed(Path(smk.output.manifest).parent, model, smk.input.manifest, {
            "method": smk.wildcards.method, "ratio": float(smk.wildcards.ratio), "stage": "refine",
            "after_stage": previous.get("stage"), "recipe": previous.get("recipe"), "refine": spec,
            "damping": previous.get("damping"), "seed": previous.get("seed"), "blocks": errs})


if "snakemake" in globals():
    run(snakemake)

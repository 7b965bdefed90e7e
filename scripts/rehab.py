"""Rule rehab: fine-tune the low-rank factors of a method's last stage on the calibration windows."""

from pathlib import Path

from _adapter import stage

from lowrank.checkpoint import load_compressed, save_compressed
from lowrank.io import load_tensors, read_json
from lowrank.rehab import RehabConfig, rehab


def run(smk) -> None:
    with stage(smk) as st:
        spec = dict(smk.params.rehab)  # recorded in the manifest as configured
        cfg = RehabConfig(**spec)
        model = load_compressed(Path(smk.input.previous).parent, dtype=st.dtype, device=st.device)
        windows = load_tensors(smk.input.windows)[0]["tokens"]
        out = Path(smk.output.manifest).parent
        ckpt = out / "checkpoint.safetensors"
        res = rehab(model, windows, cfg.steps, cfg.lr, cfg.batch_size, cfg.optimizer, cfg.seed, st.device, ckpt,
                    cfg.checkpoint_every)
        st.log.info("rehab: calibration CE %.4f -> %.4f over %d steps", res.history[0]["ce"], res.history[-1]["ce"],
                    res.steps)
        previous = read_json(smk.input.previous)
        save_compressed(out, model, smk.input.manifest, {
            "method": smk.wildcards.method, "ratio": float(smk.wildcards.ratio), "stage": "rehab",
            "after_stage": previous.get("stage"), "recipe": previous.get("recipe"), "rehab": spec,
            "damping": previous.get("damping"), "seed": previous.get("seed"), "history": res.history})
        ckpt.unlink(missing_ok=True)


if "snakemake" in globals():
    run(snakemake)

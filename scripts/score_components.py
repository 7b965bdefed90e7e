"""Rule score_components: per-component scores of every target in one whitening space (ratio-independent)."""

from _adapter import load_stats, stage

from lowrank.gradients import calibration_gradients
from lowrank.io import load_tensors, save_tensors
from lowrank.model import find_targets, load_model
from lowrank.scoring import SCORERS, score_targets


def run(smk) -> None:
    with stage(smk) as st:
        scorer, whitening, opts = smk.params.scorer, smk.params.whitening, dict(smk.params.scoring)
        streamed = bool(opts.get("streamed", True)) and SCORERS[scorer].needs_gradients
        # streamed gradients move one block at a time to the device: the model itself stays in CPU memory
        model = load_model(smk.input.manifest, dtype=st.dtype, device="cpu" if streamed else st.device)
        targets = find_targets(model)
        grads = None
        if SCORERS[scorer].needs_gradients:
            windows = load_tensors(smk.input.windows)[0]["tokens"][: opts["gradient_windows"]]
            grads = calibration_gradients(model, windows, opts["gradient_batch_size"], st.device, targets,
                                          streamed=streamed, offload=opts.get("offload", "auto"))
            st.log.info("calibration loss %.4f over %d tokens (%d windows)", grads.loss, grads.tokens, len(windows))
        scores = score_targets(model, targets, scorer, whitening, load_stats(smk), smk.params.damping, st.device,
                               grads, decomposition=getattr(smk.params, "decomposition", "svd"))
        tensors = {f"{key}.{n}": v for n, d in scores.items() for key, v in d.items()}
        if grads is not None:
            neg = sum(int((d["score"] < 0).sum()) for d in scores.values())
            st.log.info("%d of %d components have a negative predicted loss change", neg,
                        sum(d["score"].numel() for d in scores.values()))
        save_tensors(smk.output[0], tensors, {
            "scorer": scorer, "whitening": whitening,
            "targets": {t.name: [t.shape.m, t.shape.n, t.shape.bias] for t in targets},
            "calibration_loss": None if grads is None else grads.loss})


if "snakemake" in globals():
    run(snakemake)

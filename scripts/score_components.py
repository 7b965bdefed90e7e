"""Rule score_components: per-component scores of every target in one whitening space (ratio-independent)."""

from _adapter import lazy_load, load_stats, stage

from lowrank.blocks import for_each_block
from lowrank.gradients import calibration_gradients
from lowrank.io import load_tensors, save_tensors
from lowrank.model import find_targets, load_model
from lowrank.scoring import SCORERS, ComponentProbe, score_targets
from lowrank.sharded import is_lazy, load_model_streaming
from lowrank.streaming import fused_scores


def run(smk) -> None:
    with stage(smk) as st:
        scorer, whitening, opts = smk.params.scorer, smk.params.whitening, dict(smk.params.scoring)
        needs = SCORERS[scorer].needs_gradients
        streamed = bool(opts.get("streamed", True)) and needs
        stats, decomposition = load_stats(smk), getattr(smk.params, "decomposition", "svd")
        # streamed: one block at a time on the device, the model in CPU memory (or lazy, from its shards)
        model = (load_model_streaming(smk.input.manifest, dtype=st.dtype, lazy=lazy_load(smk)) if streamed
                 else load_model(smk.input.manifest, dtype=st.dtype, device=st.device))
        targets = find_targets(model)
        grads = None
        if streamed:  # gradients and scores fused block by block: one block of gradients alive at a time
            windows = load_tensors(smk.input.windows)[0]["tokens"][: opts["gradient_windows"]]
            scores, grads = fused_scores(model, windows, opts["gradient_batch_size"], st.device, targets, scorer,
                                         whitening, stats, smk.params.damping, decomposition,
                                         opts.get("offload", "auto"))
        else:
            if needs:  # the whole model on the device: one forward + one backward per batch
                windows = load_tensors(smk.input.windows)[0]["tokens"][: opts["gradient_windows"]]
                probe = ComponentProbe.for_scorer(scorer, model, whitening, stats, smk.params.damping, st.device,
                                                  decomposition)
                grads = calibration_gradients(model, windows, opts["gradient_batch_size"], st.device, targets,
                                              streamed=False, need_G=probe is None, probe=probe)
            if is_lazy(model):  # pragma: no cover - sigma scores of a lazy model: each block while resident
                scores = {}
                for part in for_each_block(model, targets, st.device, lambda i, tl: score_targets(
                        model, tl, scorer, whitening, stats, smk.params.damping, st.device, grads,
                        decomposition)).values():
                    scores.update(part)
            else:
                scores = score_targets(model, targets, scorer, whitening, stats, smk.params.damping, st.device,
                                       grads, decomposition=decomposition)
        if grads is not None:
            st.log.info("calibration loss %.4f over %d tokens", grads.loss, grads.tokens)
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

"""Rule allocate: ranks per target for one kept fraction, and the parameter accounting of that choice.

An int8 recipe's ranks are its byte-budget ones (the quantize stage stores exactly these), with their bytes."""

from _adapter import load_stats, stage

from lowrank.accounting import TargetShape
from lowrank.allocation import allocate, allocate_bytes, byte_accounting
from lowrank.io import load_tensors, write_json
from lowrank.model import find_targets, load_model
from lowrank.scoring import progressive_allocation


def run(smk) -> None:
    with stage(smk) as st:
        tensors, meta = load_tensors(smk.input.scores)
        scores = {k[len("score."):]: v for k, v in tensors.items() if k.startswith("score.")}
        sigmas = {k[len("sigma."):]: v for k, v in tensors.items() if k.startswith("sigma.")}
        shapes = {n: TargetShape(*v) for n, v in meta["targets"].items()}
        mode = smk.params.quantize
        prog = dict(smk.params.progressive or {})
        trace = None
        if prog:  # re-score after each partial truncation (lowrank.recipes: greedy, per-component scorer)
            # streamed: blocks go to the device one at a time; whole-model: the model runs there
            model = load_model(smk.input.manifest, dtype=st.dtype, device="cpu" if prog["streamed"] else st.device)
            windows = load_tensors(smk.input.windows)[0]["tokens"][: prog["gradient_windows"]]
            alloc, trace = progressive_allocation(
                model, find_targets(model), scores, smk.params.ratio, prog["stages"], smk.params.allocator,
                meta["scorer"], meta["whitening"], load_stats(smk), windows, prog["gradient_batch_size"],
                prog["damping"], st.device, prog["decomposition"], smk.params.min_rank_fraction, prog["streamed"])
            for s in trace:
                st.log.info("stage to kept %.3f%s", s["kept_fraction"], " (re-scored)" if s["rescored"] else "")
        elif mode == "none":
            alloc = allocate(smk.params.allocator, shapes, smk.params.ratio, scores, smk.params.min_rank_fraction,
                             load_stats(smk))
        else:  # the byte budget of the int8 layout (lowrank.recipes: the allocator is a greedy one)
            alloc = allocate_bytes(mode, shapes, smk.params.ratio, scores, smk.params.allocator,
                                   smk.params.min_rank_fraction)
        body = {"allocator": smk.params.allocator, "scorer": meta["scorer"], "whitening": meta["whitening"],
                "predicted_delta_loss": alloc.predicted_delta_loss(scores) if meta["scorer"] != "sigma" else None,
                **alloc.to_json(sigmas)}
        if trace is not None:  # predicted_delta_loss above is the dense scores'; each stage's own is here
            body["stages"] = trace
        if mode != "none":
            body["quantize"] = byte_accounting(mode, alloc)
            st.log.info("%s: %d of %d budget bytes in the position layout", mode, body["quantize"]["layout_bytes"],
                        body["quantize"]["budget_bytes"])
        st.log.info("kept %.4f of target params (removed %.4f; budget kept <= %.2f): %d factored, %d dense",
                    body["kept_fraction"], body["removed_fraction"], smk.params.ratio, body["n_factored"],
                    body["n_dense"])
        write_json(smk.output[0], body)


if "snakemake" in globals():
    run(snakemake)

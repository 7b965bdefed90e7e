"""Rule allocate: ranks per target for one kept fraction, and the parameter accounting of that choice.

An int8 recipe's ranks are its byte-budget ones (the quantize stage stores exactly these), with their bytes."""

from _adapter import load_stats, stage

from lowrank.accounting import TargetShape
from lowrank.allocation import allocate
from lowrank.io import load_tensors, write_json
from lowrank.allocation import allocate_bytes, byte_accounting


def run(smk) -> None:
    with stage(smk) as st:
        tensors, meta = load_tensors(smk.input.scores)
        scores = {k[len("score."):]: v for k, v in tensors.items() if k.startswith("score.")}
        sigmas = {k[len("sigma."):]: v for k, v in tensors.items() if k.startswith("sigma.")}
        shapes = {n: TargetShape(*v) for n, v in meta["targets"].items()}
        mode = smk.params.quantize
        if mode == "none":
            alloc = allocate(smk.params.allocator, shapes, smk.params.ratio, scores, smk.params.min_rank_fraction,
                             load_stats(smk))
        else:  # the byte budget of the int8 layout (lowrank.recipes: the allocator is a greedy one)
            alloc = allocate_bytes(mode, shapes, smk.params.ratio, scores, smk.params.allocator,
                                   smk.params.min_rank_fraction)
        body = {"allocator": smk.params.allocator, "scorer": meta["scorer"], "whitening": meta["whitening"],
                "predicted_delta_loss": sum(float(scores[n][r:].sum()) for n, r in alloc.ranks.items()
                                            if r is not None) if meta["scorer"] != "sigma" else None,
                **alloc.to_json(sigmas)}
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

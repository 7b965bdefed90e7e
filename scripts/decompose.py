"""Rule decompose: every target's components in one space (thin SVD of T^T W S, unwhitened), once per source."""

from _adapter import lazy_load, load_stats, stage

from lowrank.blocks import for_each_block
from lowrank.decompose import save_decompositions
from lowrank.model import find_targets
from lowrank.sharded import load_model_streaming
from lowrank.truncation import decompose_targets


def run(smk) -> None:
    with stage(smk) as st:
        whitening, damping, method = smk.wildcards.whitening, smk.params.damping, smk.params.decomposition
        model = load_model_streaming(smk.input.manifest, dtype=st.dtype, lazy=lazy_load(smk))
        stats = load_stats(smk)
        directions = {}
        for part in for_each_block(model, find_targets(model), st.device, lambda i, tl: decompose_targets(
                model, tl, whitening, stats, damping, st.device, method)).values():
            directions.update(part)
        st.log.info("%d targets decomposed in the %s space (%s)", len(directions), whitening, method)
        save_decompositions(smk.output[0], directions, {"whitening": whitening, "damping": damping,
                                                        "method": method})


if "snakemake" in globals():
    run(snakemake)

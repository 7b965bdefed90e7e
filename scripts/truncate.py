"""Rule truncate: replace every allocated target by its low-rank factors and store them (stage 0)."""

import os
import shutil
from pathlib import Path

from _adapter import lazy_load, load_stats, stage

from lowrank.allocation import Allocation
from lowrank.checkpoint import save_compressed
from lowrank.decompose import StoredDecompositions
from lowrank.io import config_hash, read_json
from lowrank.model import find_targets
from lowrank.resume import truncate_blocks
from lowrank.sharded import load_model_streaming


def run(smk) -> None:
    with stage(smk) as st:
        method = dict(smk.params.method)
        model = load_model_streaming(smk.input.manifest, dtype=st.dtype, lazy=lazy_load(smk))
        alloc = Allocation.from_json(read_json(smk.input.allocation))
        stats = load_stats(smk)
        # one factor file per block under parts/: a rerun after a crash loads the finished blocks
        parts = Path(smk.output.manifest).parent / "parts"
        inputs = {k: [os.path.getsize(v), os.stat(v).st_mtime_ns] for k, v in smk.input.items()}
        # the component directions the decompose job stored (decomposition.share), else each block decomposes
        directions = StoredDecompositions(smk.input.svd) if "svd" in smk.input.keys() else None
        report = truncate_blocks(model, find_targets(model), alloc.ranks, method["whitening"], stats,
                                 smk.params.damping, st.device, parts, key={"inputs": inputs, "dtype": str(st.dtype)},
                                 decomposition=getattr(smk.params, "decomposition", "svd"), directions=directions)
        methods = getattr(stats.get("input_gram"), "factor_methods", {})
        fallbacks = {g: m for g, m in methods.items() if m != "cholesky"}
        st.log.info("%d targets factored; whitening fallbacks: %s", sum(r["rank"] is not None for r in
                                                                        report.values()), fallbacks or "none")
        save_compressed(Path(smk.output.manifest).parent, model, smk.input.manifest, {
            "method": smk.wildcards.method, "ratio": float(smk.wildcards.ratio), "stage": 0, "recipe": method,
            "damping": smk.params.damping, "config_hash": config_hash(method),
            "seed": dict(smk.params.runtime).get("seed", 0), "whitening_fallbacks": fallbacks, "targets": report})
        shutil.rmtree(parts, ignore_errors=True)


if "snakemake" in globals():
    run(snakemake)

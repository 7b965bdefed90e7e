"""Rule quantize: the byte-budget ranks of allocation.json, factors, int8 rows; writes final/model.safetensors."""

import tempfile
from pathlib import Path

from _adapter import lazy_load, load_stats, stage

from lowrank.allocation import check_allocation
from lowrank.checkpoint import save_quantized
from lowrank.decompose import StoredDecompositions
from lowrank.gradients import streamed_gradients
from lowrank.io import load_tensors, read_json
from lowrank.model import find_targets
from lowrank.quantization import FLOAT_STORAGE, QuantizeConfig, quantize_model
from lowrank.sharded import load_model_streaming
from lowrank.spaces import bind


def run(smk) -> None:
    with stage(smk) as st:
        method, ratio, damping = dict(smk.params.method), float(smk.params.ratio), smk.params.damping
        q, space = QuantizeConfig(**method["quantize"]), method["whitening"]
        # lazy (runtime.lazy_load, or larger than host or device memory): one block at a time from the shards
        model = load_model_streaming(smk.input.manifest, dtype=st.dtype, lazy=lazy_load(smk), device=st.device)
        targets = find_targets(model)
        ranks = check_allocation(read_json(smk.input.allocation), q.mode, ratio)
        stats = load_stats(smk)
        windows = load_tensors(smk.input.windows)[0]["tokens"][: q.gradient_windows]

        def gradients_of(m, on_block=None):  # streamed; on_block: each block's gradients as they complete
            return streamed_gradients(m, windows, q.gradient_batch_size, st.device, targets, on_block=on_block,
                                      keep=on_block is None)

        with tempfile.TemporaryDirectory(dir=Path(smk.output.manifest).parent, prefix=".quantize-") as work:
            res = quantize_model(
                model, targets, q.mode, ratio, ranks, bind(space, stats, damping, smk.params.decomposition,
                                                           st.device), gradients_of, st.device,
                StoredDecompositions(smk.input.svd) if "svd" in smk.input.keys() else None, workdir=work)
        frac = res.accounted_bytes / res.dense_bytes
        st.log.info("%s: %d of %d budget bytes (%.4f of the dense float16 targets); %d factored, %d dense",
                    q.mode, res.accounted_bytes, res.budget_bytes, frac,
                    sum(v.rank is not None for v in res.layouts.values()),
                    sum(v.rank is None for v in res.layouts.values()))
        save_quantized(Path(smk.output.manifest).parent, model, smk.input.manifest, res.accounted_bytes, {
            "method": smk.wildcards.method, "ratio": ratio, "recipe": method, "damping": damping,
            "mode": q.mode, "float_storage": str(FLOAT_STORAGE).replace("torch.", ""), "scale_dtype": "float32",
            "accounted_bytes": res.accounted_bytes, "budget_bytes": res.budget_bytes,
            "dense_fp16_bytes": res.dense_bytes, "kept_bytes_fraction": frac, "diagnostics": res.diagnostics})


if "snakemake" in globals():
    run(snakemake)

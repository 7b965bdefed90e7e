"""Rule calibration_stats: one statistic kind of the source model over the calibration windows."""

from _adapter import lazy_load, stage

from lowrank.calibration import STATS
from lowrank.io import load_tensors, save_tensors
from lowrank.model import load_model
from lowrank.sharded import load_model_streaming


def run(smk) -> None:
    with stage(smk) as st:
        kind, options = smk.params.stat, dict(smk.params.options)
        # a statistic computed block by block works on a lazy, larger-than-memory model
        streamed = STATS[kind].streamed
        model = (load_model_streaming(smk.input.manifest, dtype=st.dtype, lazy=lazy_load(smk)) if streamed
                 else load_model(smk.input.manifest, dtype=st.dtype))
        windows = load_tensors(smk.input.windows)[0]["tokens"]
        stats = STATS[kind].collect(model, windows, smk.params.batch_size, st.device, **options)
        tensors, meta = stats.to_tensors()
        st.log.info("%s %s: %d tensors from %d calibration windows", kind, options or "", len(tensors),
                    windows.shape[0])
        save_tensors(smk.output[0], tensors, meta)


if "snakemake" in globals():
    run(snakemake)

"""Rules evaluate_source / evaluate_compressed: held-out perplexity and size of a dense or compressed model."""

from pathlib import Path

from _adapter import lazy_load, stage

from lowrank.checkpoint import load_compressed
from lowrank.evaluation import model_size, perplexity, storage_bytes
from lowrank.io import load_tensors, read_json, write_json
from lowrank.sharded import load_model_streaming


def run(smk) -> None:
    with stage(smk) as st:
        lazy = lazy_load(smk)  # a lazy model is evaluated block by block (lowrank.evaluation.perplexity)
        if "compressed" in smk.input.keys():
            folder = Path(smk.input.compressed).parent
            model = load_compressed(folder, dtype=st.dtype, device=st.device, lazy=lazy)
            manifest = read_json(smk.input.compressed)
            factors = folder / manifest["factors"]
            extra = {"factor_file_bytes": factors.stat().st_size, **storage_bytes(model, manifest),
                     "compressed_dir": folder.as_posix()}  # the evaluated (last) stage, relative to the run
        else:
            model = load_model_streaming(smk.input.manifest, dtype=st.dtype, lazy=lazy, device=st.device)
            extra = {}
        windows = load_tensors(smk.input.windows)[0]["tokens"]
        result = {**perplexity(model, windows, smk.params.batch_size, st.device), **model_size(model), **extra}
        st.log.info("perplexity %.3f over %d tokens", result["ppl"], result["tokens"])
        write_json(smk.output[0], {**dict(smk.wildcards.items()), **result})


if "snakemake" in globals():
    run(snakemake)

"""Rules measure_speed_source / measure_speed: prefill and decode tokens/s, peak memory and bytes on disk."""

from pathlib import Path

from _adapter import stage

from lowrank.checkpoint import load_compressed
from lowrank.evaluation import model_size
from lowrank.io import read_json, write_json
from lowrank.model import load_model, model_path
from lowrank.speed import files_bytes, measure_generation, rss_mb


def run(smk) -> None:
    with stage(smk) as st:
        s = dict(smk.params.speed)
        baseline = rss_mb()
        if "compressed" in smk.input.keys():
            folder = Path(smk.input.compressed).parent
            model = load_compressed(folder, dtype=st.dtype, device=st.device)
            disk = files_bytes([folder / read_json(smk.input.compressed)["factors"]])
        else:
            model = load_model(smk.input.manifest, dtype=st.dtype, device=st.device)
            disk = files_bytes(sorted(Path(model_path(smk.input.manifest)).glob("*.safetensors")))
        result = measure_generation(model, s["prefill_tokens"], s["decode_tokens"], s["batch_size"], s["warmup"],
                                    s["repeats"], st.device, seed=int(smk.params.runtime.get("seed", 0)))
        sizes = model_size(model)
        result |= {"disk_bytes": disk, "model_bytes": sizes["total_bytes"], "rss_baseline_mb": baseline}
        st.log.info("prefill %.1f tok/s, decode %.1f tok/s, peak RSS %.0f MiB, %d bytes on disk",
                    result["prefill_tok_s"], result["decode_tok_s"] or 0.0, result["peak_rss_mb"], disk)
        write_json(smk.output[0], {**dict(smk.wildcards.items()), **result})


if "snakemake" in globals():
    run(snakemake)

"""Rules evaluate_zeroshot_source / evaluate_zeroshot: lm-eval accuracy of a dense or compressed model."""

from pathlib import Path

from _adapter import stage

from lowrank.checkpoint import load_compressed
from lowrank.io import read_json, write_json
from lowrank.model import load_model, load_tokenizer
from lowrank.zeroshot import NEXT_LINE_TASK, evaluate_zeroshot


def run(smk) -> None:
    with stage(smk) as st:
        z = dict(smk.params.zeroshot)
        local = {NEXT_LINE_TASK: smk.input[NEXT_LINE_TASK]} if NEXT_LINE_TASK in smk.input.keys() else {}
        if "compressed" in smk.input.keys():
            folder = Path(smk.input.compressed).parent
            base_manifest = folder / read_json(smk.input.compressed)["base_manifest"]
            model = load_compressed(folder, dtype=st.dtype, device=st.device)
        else:
            base_manifest = Path(smk.input.manifest)
            model = load_model(base_manifest, dtype=st.dtype, device=st.device)
        tokenizer = load_tokenizer(base_manifest)
        positions = getattr(model.config, "max_position_embeddings", None) or z["max_length"]
        result = evaluate_zeroshot(model, tokenizer, z["tasks"], local, num_fewshot=z["num_fewshot"],
                                   batch_size=z["batch_size"], limit=z["limit"],
                                   max_length=min(z["max_length"], positions), device=str(st.device),
                                   seed=int(smk.params.runtime.get("seed", 0)))
        for task, m in result.items():
            st.log.info("%s: acc %.4f acc_norm %.4f (n=%d)", task, m.get("acc", float("nan")),
                        m.get("acc_norm", float("nan")), m["n"])
        write_json(smk.output[0], {**dict(smk.wildcards.items()), "num_fewshot": z["num_fewshot"], "tasks": result})


if "snakemake" in globals():
    run(snakemake)

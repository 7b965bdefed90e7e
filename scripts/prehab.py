"""Rule prehab: fine-tune the pretrained targets toward low whitened rank; write the model like a pretrained one."""

import shutil
from pathlib import Path

from _adapter import stage

from lowrank import __version__
from lowrank.io import load_tensors, read_json, save_tensors, write_json
from lowrank.model import check_finite_weights, load_model, load_tokenizer
from lowrank.prehab import PrehabConfig, prehab
from lowrank.statistics import load_stat


def run(smk) -> None:
    with stage(smk) as st:
        cfg = PrehabConfig.from_dict(dict(smk.params.settings))
        base = read_json(smk.input.manifest)
        model = load_model(smk.input.manifest, dtype=st.dtype, device=st.device)
        windows = load_tensors(smk.input.windows)[0]["tokens"]
        out = Path(smk.output.manifest).parent
        ckpt = out / "checkpoint.safetensors"  # not an output: survives a killed job, resumed by the next run
        ranks = None
        if "plan" in smk.input.keys():  # the planned allocation's rank per target (None: kept dense)
            ranks = {n: t["rank"] for n, t in read_json(smk.input.plan)["targets"].items()}
        res = prehab(model, windows, load_stat(smk.input.input_gram), cfg, smk.params.damping, st.device, str(ckpt),
                     ranks=ranks)
        summary = res.summary()
        st.log.info("whitened mean stable rank %.3f -> %.3f, effective rank %.2f -> %.2f; CE %.4f -> %.4f",
                    summary["before"]["mean_stable_rank"], summary["after"]["mean_stable_rank"],
                    summary["before"]["mean_effective_rank"], summary["after"]["mean_effective_rank"],
                    res.train.history[0]["ce"], res.train.history[-1]["ce"])
        check_finite_weights(model, "prehab model (fine-tuned weights)")  # a diverged fine-tune is not written
        tmp = out / ".hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        if base.get("has_tokenizer", True):
            load_tokenizer(smk.input.manifest).save_pretrained(str(tmp))
        shutil.rmtree(smk.output.hf, ignore_errors=True)
        tmp.rename(smk.output.hf)
        save_tensors(smk.output.spectra, {**{f"before.{n}": s for n, s in res.sigmas_before.items()},
                                          **{f"after.{n}": s for n, s in res.sigmas_after.items()}},
                     {"space": "input_gram of the pretrained model", "damping": smk.params.damping})
        write_json(smk.output.manifest, {
            "model": smk.wildcards.model,
            "source": {"kind": smk.wildcards.source, "base_manifest": "../pretrained/manifest.json"},
            "path": "hf", "path_relative": True, "has_tokenizer": base.get("has_tokenizer", True),
            "architecture": base["architecture"], "config": base.get("config"), "prehab": dict(smk.params.settings),
            "damping": smk.params.damping, "resumed_from_step": res.train.resumed_from, "ranks": summary,
            "history": res.train.history, "lowrank_version": __version__})
        ckpt.unlink(missing_ok=True)


if "snakemake" in globals():
    run(snakemake)

"""Rule pretrained: resolve the configured source; write it once as an HF folder unless it is a local folder."""

import shutil
from pathlib import Path

from _adapter import stage

from lowrank import __version__
from lowrank.io import write_json
from lowrank.model import materialize_source


def run(smk) -> None:
    with stage(smk) as st:
        out_hf = Path(smk.output.hf)
        tmp = out_hf.with_name(f".{out_hf.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            body = materialize_source(dict(smk.params.spec), tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # no half-written model folder survives a failure
            raise
        shutil.rmtree(out_hf, ignore_errors=True)
        if body["path_relative"]:
            tmp.rename(out_hf)  # complete folder appears at once
            body["path"] = out_hf.name
        else:
            out_hf.mkdir(parents=True)
        arch = body["architecture"]
        st.log.info("%s: %d blocks, %d targets, %.1f M target params of %.1f M", arch["class"], arch["n_blocks"],
                    arch["n_targets"], arch["target_params"] / 1e6, arch["total_params"] / 1e6)
        write_json(smk.output.manifest, {"model": smk.wildcards.model, **body, "config": dict(smk.params.spec),
                                         "source_fingerprint": smk.params.fingerprint,
                                         "lowrank_version": __version__})


if "snakemake" in globals():
    run(snakemake)

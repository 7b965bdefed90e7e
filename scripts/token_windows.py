"""Rule token_windows: calibration windows (seeded offsets) or evaluation windows (held out, non-overlapping)."""

from _adapter import stage

from lowrank.accounting import TargetShape
from lowrank.allocation import check_recipes_reachable
from lowrank.data import (calibration_windows, check_window_length, evaluation_windows, given_windows,
                          load_window_file, token_stream)
from lowrank.io import read_json, save_tensors
from lowrank.model import load_tokenizer


def run(smk) -> None:
    with stage(smk) as st:
        spec, split = dict(smk.params.spec), smk.params.split
        corpus = dict(spec["corpus"])
        arch = read_json(smk.input.manifest)["architecture"]
        check_window_length(split, spec["seq_len"], arch.get("max_positions"))
        if split == "calibration":  # the first job before any statistic: refuse a ratio no allocator can meet
            # (a check only, so the ratios are read from the config, not params: editing them reruns nothing here)
            check_recipes_reachable([TargetShape(*s) for s in arch["target_shapes"]], smk.config["ratios"],
                                    smk.config["methods"], smk.wildcards.model)
        tok = None if corpus["kind"] in ("tokens", "windows") else load_tokenizer(smk.input.manifest)
        stream = token_stream(corpus, tok)
        vocab = arch["vocab_size"]
        if int(stream.max()) >= vocab:
            raise ValueError(f"{split} corpus has token id {int(stream.max())} >= the model's vocabulary {vocab}")
        if corpus["kind"] == "windows":  # pre-cut windows, taken as they are
            n = spec["n_samples"] if split == "calibration" else spec["max_windows"]
            windows = given_windows(load_window_file(corpus), n, spec["seq_len"])
        elif split == "calibration":
            bos = tok.bos_token_id if (spec["bos"] and tok is not None) else None
            windows = calibration_windows(stream, spec["n_samples"], spec["seq_len"], spec["seed"], bos)
        else:
            windows = evaluation_windows(stream, spec["seq_len"], spec["max_windows"])
        st.log.info("%s: %d windows x %d tokens from a %d-token stream", split, *windows.shape, stream.numel())
        save_tensors(smk.output[0], {"tokens": windows},
                     {"split": split, "corpus": corpus, "stream_tokens": stream.numel()})


if "snakemake" in globals():
    run(snakemake)

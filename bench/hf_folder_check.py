"""Check a DAG-written lowrank HF folder the way a user gets it: copied alone to a fresh temporary directory, loaded
by `AutoModelForCausalLM.from_pretrained`, its held-out perplexity and parameter count compared with the pipeline's
(`eval/ppl.json` beside it). Prints one markdown row; used for the SmolLM2 check in README ("Use a compressed model
elsewhere"):

    python bench/hf_folder_check.py results/smollm2-135m/svd-llm/0.60/hf results/smollm2-135m/data/evaluation.safetensors
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
from pathlib import Path

import torch

import lowrank  # noqa: F401  (registers quant_method "lowrank")
from lowrank.evaluation import model_size, perplexity
from lowrank.io import load_tensors, read_json


def main() -> None:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("windows")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    expected = read_json(folder.parent / "eval" / "ppl.json")
    windows = load_tensors(args.windows)[0]["tokens"]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / folder.parent.name
        shutil.copytree(folder, copy)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        model = AutoModelForCausalLM.from_pretrained(str(copy)).eval()
        load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        got = perplexity(model, windows, batch_size=4)
    size = model_size(model)
    rel = abs(got["ppl"] - expected["ppl"]) / expected["ppl"]
    print("| folder | pipeline ppl | loaded ppl | rel. diff | params (pipeline) | params (loaded) | peak RSS before / "
          "after from_pretrained (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {folder} | {expected['ppl']:.4f} | {got['ppl']:.4f} | {rel:.1e} | {expected['total_params']:,} "
          f"| {size['total_params']:,} | {before:.0f} / {load_peak:.0f} |")
    if rel > 1e-4 or size["total_params"] != expected["total_params"]:
        raise SystemExit("MISMATCH")


if __name__ == "__main__":
    main()

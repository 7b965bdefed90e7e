"""Choose the refine settings on VALIDATION windows of the training plays (never the held-out plays).

Validation windows: non-overlapping ``seq_len`` windows of the calibration corpus (the training plays), evenly
spaced, with every window that overlaps a calibration window (same seed, count and length as the config's
calibration) dropped. For each compressed folder given (a method's stage0), prints the validation perplexity
without refinement and with each setting, plus the time of each refinement and of one forward pass over the
refine windows (same run, contended CPU). The committed numbers (bench/results/refine_study_cpu_contended.md)
were produced by

    python bench/refine_study.py --stage results/smollm2-135m/svd-llm/0.60/stage0 --windows 16 --val 8 \
        > bench/results/refine_study_cpu_contended.md
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import yaml

from lowrank.checkpoint import load_compressed
from lowrank.data import token_stream
from lowrank.evaluation import perplexity
from lowrank.io import load_tensors, read_json
from lowrank.model import load_model, load_tokenizer
from lowrank.refine import RefineConfig, refine_model

SETTINGS = {
    "A (damping 1e-4)": dict(mode="closed_form", damping=1e-4),
    "A then B (damping 1e-4)": dict(mode="closed_form", damping=1e-4, refit_b=True),
    "A (damping 1e-2)": dict(mode="closed_form", damping=1e-2),
    "adam 20 steps lr 1e-4": dict(mode="adam", steps=20, lr=1e-4),
}


def validation_windows(stream: torch.Tensor, seq_len: int, n: int, calib: dict) -> torch.Tensor:
    """Evenly spaced non-overlapping windows of ``stream`` that overlap no calibration window."""
    g = torch.Generator().manual_seed(int(calib["seed"]))
    body = calib["seq_len"]
    starts = torch.randint(0, stream.numel() - body + 1, (calib["n_samples"],), generator=g).tolist()
    total = stream.numel() // seq_len
    free = [k for k in range(total) if all(k * seq_len + seq_len <= s or s + body <= k * seq_len for s in starts)]
    idx = torch.linspace(0, len(free) - 1, n).round().long().tolist()
    return torch.stack([stream[free[i] * seq_len : free[i] * seq_len + seq_len] for i in idx])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", action="append", required=True, help="a compressed folder (repeatable)")
    ap.add_argument("--results", default="results/smollm2-135m")
    ap.add_argument("--windows", type=int, default=16, help="calibration windows the refinement uses")
    ap.add_argument("--val", type=int, default=8, help="validation windows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(open("config.yaml"))
    manifest = os.path.join(args.results, "pretrained", "manifest.json")
    calib = {"seed": 3, "n_samples": 64, "seq_len": 512, **cfg["calibration"]}
    stream = token_stream(calib["corpus"], load_tokenizer(manifest))
    val = validation_windows(stream, 512, args.val, calib)
    windows = load_tensors(os.path.join(args.results, "data", "calibration.safetensors"))[0]["tokens"]
    dense = load_model(manifest)
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, args.windows, 4):
            dense(input_ids=windows[s : s + 4], use_cache=False)
    t_fwd = time.perf_counter() - t0
    print(f"SmolLM2-135M, CPU ({args.threads} threads, contended), refine on {args.windows} x 512 calibration "
          f"tokens, validation {val.shape[0]} x 512 tokens of the training plays outside every calibration window")
    print(f"\ndense validation ppl {perplexity(dense, val)['ppl']:.2f}; forward over the refine windows "
          f"{t_fwd:.1f} s\n")
    print("| stage | setting | val ppl | mean block error before -> after | refine s | refine / forward |")
    print("|---|---|---:|---|---:|---:|")
    for stage in args.stage:
        base = load_compressed(stage)
        name = "/".join(stage.rstrip("/").split("/")[-3:-1])
        print(f"| {name} | none | {perplexity(base, val)['ppl']:.2f} | | | |", flush=True)
        for key in args.settings.split(","):
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            rep = refine_model(model, dense, windows, RefineConfig(windows=args.windows, **SETTINGS[key]))
            dt = time.perf_counter() - t0
            b = rep.blocks
            eb, ea = sum(x["error_before"] for x in b) / len(b), sum(x["error_after"] for x in b) / len(b)
            print(f"| {name} | {key} | {perplexity(model, val)['ppl']:.2f} | {eb:.4f} -> {ea:.4f} | {dt:.0f} | "
                  f"{dt / t_fwd:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""Rehab on a real compressed model: perplexity against the number of factor fine-tuning steps.

One rehab run (:func:`lowrank.rehab.rehab`: Adam on every ``LowRankLinear``'s two factors, CE on the calibration
windows) of ``--steps`` steps, stopped every ``--every`` steps to evaluate: it resumes from its own checkpoint
(``stop_after``), so every point lies on one and the same run of ``--steps`` steps (batch ``t`` is a pure
function of the seed and ``t``). Prints one row per point: steps, last batch CE, validation perplexity
(training plays outside every calibration window, :func:`refine_study.validation_windows`) and, with
``--heldout``, the held-out perplexity. Committed numbers: bench/results/prehab_study_cpu.md (rehab section).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from refine_study import validation_windows  # noqa: E402

from lowrank.checkpoint import load_compressed  # noqa: E402
from lowrank.data import token_stream  # noqa: E402
from lowrank.evaluation import perplexity  # noqa: E402
from lowrank.io import load_tensors  # noqa: E402
from lowrank.model import load_tokenizer  # noqa: E402
from lowrank.rehab import rehab  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", required=True, help="a compressed folder, e.g. results/<model>/svd-llm/0.40/stage0")
    ap.add_argument("--results", default="results/smollm2-135m")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--val", type=int, default=8)
    ap.add_argument("--heldout", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(open("config.yaml"))
    manifest = os.path.join(args.results, "pretrained", "manifest.json")
    calib = {"seed": 3, "n_samples": 64, "seq_len": 512, **cfg["calibration"]}
    val = validation_windows(token_stream(calib["corpus"], load_tokenizer(manifest)), 512, args.val, calib)
    heldout = load_tensors(os.path.join(args.results, "data", "evaluation.safetensors"))[0]["tokens"]
    windows = load_tensors(os.path.join(args.results, "data", "calibration.safetensors"))[0]["tokens"]
    model = load_compressed(args.stage)
    print(f"rehab of {args.stage}: Adam lr {args.lr}, {args.batch_size} x 512 tokens per step, {args.steps} steps")
    print("| steps | batch CE | val ppl |" + (" held-out ppl |" if args.heldout else "") + " train s |")
    print("|---:|---:|---:|" + ("---:|" if args.heldout else "") + "---:|")

    def row(step: int, ce: float, dt: float) -> None:
        ho = f" {perplexity(model, heldout)['ppl']:.2f} |" if args.heldout else ""
        print(f"| {step} | {ce:.4f} | {perplexity(model, val)['ppl']:.2f} |{ho} {dt:.0f} |", flush=True)

    row(0, float("nan"), 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "rehab.safetensors")
        done, t_train = 0, 0.0
        while done < args.steps:
            t0 = time.perf_counter()
            res = rehab(model, windows, args.steps, args.lr, args.batch_size, checkpoint=ckpt,
                        checkpoint_every=args.every, stop_after=args.every)
            t_train += time.perf_counter() - t0
            done = res.steps
            row(done, res.history[-1]["ce"], t_train)


if __name__ == "__main__":
    main()

"""IO-SVD sensitivity on the embedded SmolLM2: output-metric damping λ and allocator, at one kept fraction.

Reuses the pipeline's artifacts (input_gram and output_kl statistics, calibration / evaluation windows) and
computes the calibration gradients once; for each λ it scores in the io_kl space, allocates, truncates and
evaluates the held-out perplexity. Prints a markdown table; the numbers in bench/results/ came from

    python bench/io_svd_sweep.py --ratio 0.6 --damping 1e-2 1e-1 1 > bench/results/io_svd_damping.md
"""

from __future__ import annotations

import argparse
import copy

import torch

from lowrank.allocation import allocate
from lowrank.calibration import load_stat
from lowrank.evaluation import perplexity
from lowrank.gradients import calibration_gradients
from lowrank.io import load_tensors
from lowrank.model import find_targets, load_model
from lowrank.scoring import score_targets
from lowrank.truncation import truncate_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="results/smollm2-135m")
    ap.add_argument("--ratio", type=float, nargs="+", default=[0.6])
    ap.add_argument("--damping", type=float, nargs="+", default=[1e-2])
    ap.add_argument("--allocators", nargs="+", default=["zero_sum"])
    ap.add_argument("--spaces", nargs="+", default=["io_kl"])
    ap.add_argument("--grad-windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_model(f"{args.root}/pretrained/manifest.json")
    targets = find_targets(base)
    stats = {k: load_stat(f"{args.root}/pretrained/stats/{k}.safetensors") for k in ("input_gram", "output_kl")}
    calib = load_tensors(f"{args.root}/data/calibration.safetensors")[0]["tokens"]
    evalw = load_tensors(f"{args.root}/data/evaluation.safetensors")[0]["tokens"]
    grads = calibration_gradients(base, calib[: args.grad_windows], 2, "cpu", targets)
    print("| space | λ (output damping) | allocator | kept | ppl |\n|---|---|---|---|---|", flush=True)
    for space in args.spaces:
        for lam in (args.damping if space == "io_kl" else [None]):
            if lam is not None:
                stats["output_kl"].damping = lam
                stats["output_kl"]._factors.clear()
            scores = score_targets(base, targets, "first_order", space, stats, 1e-6, "cpu", grads)
            shapes = {t.name: t.shape for t in targets}
            for alloc_name in args.allocators:
                for ratio in args.ratio:
                    alloc = allocate(alloc_name, shapes, ratio, {n: d["score"] for n, d in scores.items()})
                    model = copy.deepcopy(base)
                    truncate_model(model, targets, alloc.ranks, space, stats, 1e-6)
                    ppl = perplexity(model, evalw, 4)["ppl"]
                    print(f"| {space} | {lam} | {alloc_name} | {ratio} | {ppl:.2f} |", flush=True)


if __name__ == "__main__":
    main()

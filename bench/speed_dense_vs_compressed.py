"""Prefill / decode throughput and memory of the dense model vs compressed ones, interleaved in one process.

The pipeline's measure_speed jobs time each model in its own process, next to whatever else runs; on shared
cores their absolute numbers drift. Here every model is loaded once and the rounds alternate between them
(dense, A, B, ..., dense, A, B, ...), so the *ratios* to the dense model stay meaningful even on a busy machine.
Prints a markdown table; the committed table in bench/results/ was produced by

    python bench/speed_dense_vs_compressed.py results/smollm2-135m/pretrained/manifest.json \\
        results/smollm2-135m/asvd/0.{80,40}/stage0 --threads 1 --rounds 3 > bench/results/speed_cpu_contended.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from lowrank.checkpoint import load_compressed
from lowrank.evaluation import model_size
from lowrank.model import load_model
from lowrank.speed import measure_generation


def interleaved_medians(models: dict[str, torch.nn.Module], prefill: int, decode: int,
                        rounds: int) -> dict[str, dict[str, float]]:
    """Median prefill / decode tokens/s of each model over ``rounds`` rounds that alternate between the models
    (one warm-up round each first)."""
    for m in models.values():
        measure_generation(m, prefill, decode, warmup=1, repeats=1)
    rows: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            r = measure_generation(m, prefill, decode, warmup=0, repeats=1)
            rows[name]["prefill"].append(r["prefill_tok_s"])
            rows[name]["decode"].append(r["decode_tok_s"])
    return {k: {s: statistics.median(v[s]) for s in v} for k, v in rows.items()}


def add_speed_options(ap: argparse.ArgumentParser) -> None:
    """--prefill, --decode, --rounds and --threads of the interleaved speed benches."""
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dense_manifest")
    ap.add_argument("compressed", nargs="+", help="stage folders (factors.safetensors + manifest.json)")
    add_speed_options(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {"dense": load_model(args.dense_manifest)}
    for folder in args.compressed:
        p = Path(folder)
        models[f"{p.parent.parent.name} {p.parent.name}"] = load_compressed(p)
    med = interleaved_medians(models, args.prefill, args.decode, args.rounds)
    print(f"CPU, {args.threads} thread(s), prefill {args.prefill} tokens, decode {args.decode} tokens, median of "
          f"{args.rounds} interleaved rounds\n")
    print("| model | params (M) | prefill tok/s | × dense | decode tok/s | × dense |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in models.items():
        p, d = med[name]["prefill"], med[name]["decode"]
        print(f"| {name} | {model_size(m)['total_params'] / 1e6:.1f} | {p:.1f} | {p / med['dense']['prefill']:.2f} "
              f"| {d:.1f} | {d / med['dense']['decode']:.2f} |")


if __name__ == "__main__":
    main()

"""Tokens/s of compressed models (float factors or int8 + float16 rows, dequantised on the fly) vs the dense model.

Each argument is a compressed folder (a stage*/ or final/ with manifest.json); the dense base model is the one
their manifests point to. Prefill throughput (full forwards over batch x seq_len random tokens, median of
--repeats after a warm-up) on --device (cpu, or cuda where available). Prints a markdown table; the numbers in
bench/results/ were produced by

    python bench/quantized_speed.py results/smollm2-135m/{zs-svd,io-svd,zs-svd-remap,io-svd-plus}/0.60/... \
        --threads 2 > bench/results/quantized_speed_cpu.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lowrank.checkpoint import load_compressed
from lowrank.evaluation import storage_bytes, tokens_per_second
from lowrank.io import read_json
from lowrank.model import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    first = read_json(args.folders[0] / "manifest.json")
    dense = load_model(args.folders[0] / first["base_manifest"], device=args.device)
    kw = dict(seq_len=args.seq_len, batch_size=args.batch_size, repeats=args.repeats, device=args.device)
    ref = tokens_per_second(dense, **kw)
    print(f"device {args.device}, {args.threads} threads, batch {args.batch_size} x {args.seq_len} tokens, "
          f"median of {args.repeats}\n")
    print("| model | kept bytes (fp16 = 1) | tokens/s | vs dense |")
    print("|---|---|---|---|")
    print(f"| dense | 1.000 | {ref['tokens_per_s']:.0f} | 1.00x |")
    del dense
    for folder in args.folders:
        manifest = read_json(folder / "manifest.json")
        model = load_compressed(folder, device=args.device)
        r = tokens_per_second(model, **kw)
        frac = storage_bytes(model, manifest)["kept_bytes_fraction"]
        print(f"| {folder} | {frac:.3f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x |")
        del model


if __name__ == "__main__":
    main()

"""Prefill / decode tokens/s and peak memory of lowrank HF folders loaded by ``AutoModelForCausalLM.from_pretrained``
against the dense model, on CPU.

Speed: every model is loaded once in this process and the timed rounds alternate between them (dense, A, B, ...,
dense, A, B, ...), so the ratios to dense stay meaningful on a busy machine. Memory: each model is loaded again in
its own fresh interpreter, which reports its peak RSS after loading + one generation round (the import of torch and
transformers included, the same for every row) and the bytes of its parameters and buffers. Prints a markdown table;
the committed table in bench/results/hf_folder_speed_cpu.md was produced by

    python bench/hf_folder_speed.py results/smollm2-135m/pretrained/hf \\
        results/smollm2-135m/svd-llm/0.{80,60,40}/hf --threads 1 --rounds 3 > bench/results/hf_folder_speed_cpu.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

import lowrank  # noqa: F401  (registers quant_method "lowrank")
from lowrank.evaluation import model_size
from speed_dense_vs_compressed import add_speed_options, interleaved_medians  # noqa: E402  (bench/ is on sys.path)

_CHILD = """
import json, resource, sys, torch
import lowrank
from transformers import AutoModelForCausalLM
from lowrank.speed import measure_generation
torch.set_num_threads({threads})
m = AutoModelForCausalLM.from_pretrained({folder!r}).eval()
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
measure_generation(m, {prefill}, {decode}, warmup=0, repeats=1)
tensors = sum(t.numel() * t.element_size() for t in {{id(t): t for t in [*m.parameters(), *m.buffers()]}}.values())
print(json.dumps({{"peak_load_mb": after_load, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "tensor_mb": tensors / 2**20}}))
"""


def _label(folder: Path) -> str:
    return "dense" if folder.parent.name == "pretrained" else f"{folder.parent.parent.name} {folder.parent.name}"


def memory(folder: Path, threads: int, prefill: int, decode: int) -> dict[str, float]:
    code = _CHILD.format(folder=str(folder), threads=threads, prefill=prefill, decode=decode)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dense", help="the dense model's HF folder (results/<model>/pretrained/hf)")
    ap.add_argument("folders", nargs="+", help="lowrank HF folders (results/<model>/<method>/<ratio>/hf)")
    add_speed_options(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = [Path(args.dense), *map(Path, args.folders)]
    mem = {_label(p): memory(p, args.threads, args.prefill, args.decode) for p in paths}
    models = {_label(p): AutoModelForCausalLM.from_pretrained(str(p)).eval() for p in paths}
    med = interleaved_medians(models, args.prefill, args.decode, args.rounds)
    print(f"CPU, {args.threads} thread(s), batch 1, prefill {args.prefill} tokens, decode {args.decode} tokens, "
          f"median of {args.rounds} interleaved rounds; memory: a fresh interpreter per model "
          "(`from_pretrained` + one round)\n")
    print("| model | params (M) | tensors (MB) | peak RSS after load (MB) | peak RSS (MB) | prefill tok/s | × dense "
          "| decode tok/s | × dense |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in models.items():
        p, d = med[name]["prefill"], med[name]["decode"]
        mm = mem[name]
        print(f"| {name} | {model_size(m)['total_params'] / 1e6:.1f} | {mm['tensor_mb']:.0f} | {mm['peak_load_mb']:.0f} "
              f"| {mm['peak_mb']:.0f} | {p:.1f} | {p / med['dense']['prefill']:.2f} | {d:.2f} "
              f"| {d / med['dense']['decode']:.2f} |")


if __name__ == "__main__":
    main()

"""Truncation with and without the shared decomposition (rule decompose) on the embedded SmolLM2-135M, CPU.

The default run truncates each recipe at three kept fractions (and quantizes the int8 recipe at three): before
``decomposition.share``, every one of those jobs decomposed all 210 whitened weights again. This measures, in one
process and one run (so the ratio is not at the mercy of the machine's load), the CPU seconds of

* ``decompose``: :func:`lowrank.truncation.decompose_targets` once, plus writing and reading back its file;
* ``truncate (own)``: :func:`lowrank.truncation.truncate_model` decomposing every weight itself (share false);
* ``truncate (shared)``: the same truncation cut from the stored file (share true),

at each kept fraction, and the largest difference between the two truncations' weights relative to the
weight's largest entry (0 with ``--dtype float64``; float32 rounding of U and V with the default). Commands of the
committed table:

    python bench/shared_decomposition.py --manifest results/smollm2-135m/pretrained/manifest.json \\
        --gram results/smollm2-135m/pretrained/stats/input_gram.safetensors --threads 1 \\
        > bench/results/shared_decomposition_cpu.md
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch

from lowrank.calibration import load_stat
from lowrank.decompose import StoredDecompositions, save_decompositions
from lowrank.model import find_targets
from lowrank.sharded import load_model_streaming
from lowrank.truncation import decompose_targets, truncate_model


def cpu(fn):
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--gram", required=True)
    ap.add_argument("--ratios", default="0.8,0.6,0.4")
    ap.add_argument("--method", default="eigh", help="decomposition.method (the config's default: eigh)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="storage of U and Vᵀ")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LOWRANK_NO_PROGRESS", "1")
    model = load_model_streaming(args.manifest, dtype=torch.float32, lazy=False)
    stats = {"input_gram": load_stat(args.gram)}
    targets = find_targets(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "decomposition.safetensors"
        directions, t_dec = cpu(lambda: decompose_targets(model, targets, "input_gram", stats, 1e-6, "cpu",
                                                          args.method))
        _, t_save = cpu(lambda: save_decompositions(path, directions, {"whitening": "input_gram"},
                                                        getattr(torch, args.dtype)))
        size = path.stat().st_size
        del directions
        rows.append(("decompose (once per model and space)", "", t_dec + t_save, ""))
        total_own = total_shared = 0.0
        for r in (float(x) for x in args.ratios.split(",")):
            ranks = {t.name: max(1, int(r * t.shape.m * t.shape.n / (t.shape.m + t.shape.n))) for t in targets}
            a, b = copy.deepcopy(model), copy.deepcopy(model)
            _, t_own = cpu(lambda: truncate_model(a, targets, ranks, "input_gram", stats, 1e-6, "cpu", args.method))
            _, t_sh = cpu(lambda: truncate_model(b, targets, ranks, "input_gram", stats, 1e-6, "cpu", args.method,
                                                 directions=StoredDecompositions(path)))
            sb = b.state_dict()
            diff = max(float((v - sb[k]).abs().max() / v.abs().max().clamp_min(1e-30))
                       for k, v in a.state_dict().items() if v.is_floating_point())
            rows.append((f"truncate at kept {r:.2f}", f"{t_own:.1f}", t_sh, f"{diff:.1e}"))
            total_own += t_own
            total_shared += t_sh
            del a, b
    print(f"SmolLM2-135M, 210 targets, input_gram space, decomposition {args.method}, CPU {args.threads} thread(s); "
          f"CPU seconds (process time), one process. Stored decomposition: {size / 1e6:.0f} MB "
          f"(U, Vᵀ {args.dtype})\n")
    print("| step | CPU s, each job decomposes (share false) | CPU s, shared file (share true) "
          "| max rel. weight difference |")
    print("|---|---:|---:|---|")
    for name, own, sh, same in rows:
        print(f"| {name} | {own} | {sh:.1f} | {same} |")
    n = len(args.ratios.split(","))
    print(f"| **{n} truncations** | **{total_own:.1f}** | **{total_shared + rows[0][2]:.1f}** (incl. decompose) | |")


if __name__ == "__main__":
    main()

"""Layer-local control of the refine stage's closed-form A refit, with NO upstream compression (X_c = X_d).

Each factored target of a compressed folder (A = up, B = down) is refitted from the dense inputs of the first N
calibration windows (C_cc = C_dc = C_N) and judged on VALIDATION windows of the training plays (outside every
calibration window, bench/refine_study.py's `validation_windows`): relative error
    e(A) = tr((AB − W) C_val (AB − W)ᵀ) / tr(W C_val Wᵀ)
against the unrefined factors' e(A₀). This isolates the variance of a small-sample refit from the bias it is
meant to remove (earlier blocks' errors), and checks that, refitted from the full calibration Gram that SVD-LLM
itself used (pretrained/stats/input_gram), A does not move (SVD-LLM's A is optimal for its B under that Gram).

    OMP_NUM_THREADS=1 python bench/refine_local.py --stage results/smollm2-135m/svd-llm/0.60/stage0
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import yaml

from refine_study import validation_windows
from lowrank.calibration import load_stat
from lowrank.checkpoint import load_compressed
from lowrank.data import token_stream
from lowrank.factorized import LowRankLinear
from lowrank.io import load_tensors
from lowrank.model import find_targets, linear_weight, load_model, load_tokenizer
from lowrank.refine import refit_up


def collect(dense, names_by_input, windows, chunks, batch):
    """Per chunk (a window range), per group input: XᵀX (float64, summed over tokens) and the token count."""
    grams = [{g: None for g in names_by_input} for _ in chunks]
    cur = {"k": 0}
    hooks = []
    for g in names_by_input:
        def hook(_m, args, g=g):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            d = grams[cur["k"]]
            d[g] = x.T @ x if d[g] is None else d[g].addmm_(x.T, x)
        hooks.append(dense.get_submodule(g).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for k, (lo, hi) in enumerate(chunks):
                cur["k"] = k
                for s in range(lo, hi, batch):
                    dense(input_ids=windows[s:min(s + batch, hi)], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return grams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", required=True)
    ap.add_argument("--results", default="results/smollm2-135m")
    ap.add_argument("--fit", default="4,8,16,32", help="nested window counts")
    ap.add_argument("--val", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = yaml.safe_load(open("config.yaml"))
    calib = {"seed": 3, "n_samples": 64, "seq_len": 512, **cfg["calibration"]}
    manifest = os.path.join(args.results, "pretrained", "manifest.json")
    dense = load_model(manifest)
    comp = load_compressed(args.stage)
    val = validation_windows(token_stream(calib["corpus"], load_tokenizer(manifest)), 512, args.val, calib)
    windows = load_tensors(os.path.join(args.results, "data", "calibration.safetensors"))[0]["tokens"]
    full = load_stat(os.path.join(args.results, "pretrained", "stats", "input_gram.safetensors"))
    targets = [t for t in find_targets(dense) if isinstance(comp.get_submodule(t.name), LowRankLinear)]
    group_of = {t.name: full.group_of[t.name] if hasattr(full, "group_of") else t.name for t in targets}
    groups = sorted(set(group_of.values()))
    ns = [int(x) for x in args.fit.split(",")]
    chunks = [(a, b) for a, b in zip([0] + ns[:-1], ns)]
    t0 = time.perf_counter()
    g_fit = collect(dense, groups, windows, chunks, 4)
    g_val = collect(dense, groups, val, [(0, val.shape[0])], 4)[0]
    t_col = time.perf_counter() - t0
    print(f"Grams of {ns[-1]} calibration + {args.val} validation windows: {t_col:.0f} s (1 thread)\n")
    cum = []
    for k in range(len(ns)):
        cum.append({g: sum(g_fit[j][g] for j in range(k + 1)) for g in groups})
    settings = [("damping 1e-4", dict(damping=1e-4, anchor=0.0)),
                ("damping 1e-2", dict(damping=1e-2, anchor=0.0)),
                ("damping 1e-1", dict(damping=1e-1, anchor=0.0)),
                ("anchor 0.1", dict(damping=0.0, anchor=0.1)),
                ("anchor 1", dict(damping=0.0, anchor=1.0)),
                ("anchor 10", dict(damping=0.0, anchor=10.0))]
    # log ratio e(A)/e(A0) per target, then geometric mean (and worst) per setting and N
    logr = {(s, n): [] for s, _ in settings for n in ns}
    drift = []
    t1 = time.perf_counter()
    for t in targets:
        mod = comp.get_submodule(t.name)
        W = linear_weight(dense.get_submodule(t.name)).detach().double()
        A0, B = mod.up.weight.detach().double(), mod.down.weight.detach().double()
        g = group_of[t.name]
        Cv = g_val[g]
        den = float(((W @ Cv) * W).sum())

        def err(A):
            D = A @ B - W
            return float(((D @ Cv) * D).sum()) / den

        e0 = err(A0)
        Cf = full.for_target(t.name).double()
        Af = refit_up(W, B, Cf, Cf, 1e-8)
        drift.append(float((Af - A0).norm() / A0.norm()))
        for k, n in enumerate(ns):
            C = cum[k][g]
            P = B @ C @ B.T
            M = W @ C @ B.T
            lam_scale = float(torch.diagonal(P).mean())
            for s, kw in settings:
                if kw["anchor"] > 0:
                    lam = kw["anchor"] * lam_scale
                    A = torch.linalg.solve(P + lam * torch.eye(P.shape[0], dtype=P.dtype), (M + lam * A0).T).T
                else:
                    A = refit_up(W, B, C, C, kw["damping"])
                logr[(s, n)].append(math.log(err(A) / e0))
    print(f"refits: {time.perf_counter() - t1:.0f} s; {len(targets)} targets\n")
    print(f"correctness: A refitted from the full calibration Gram (SVD-LLM's own, 64 x 512 tokens, damping 1e-8) "
          f"vs A0: relative change median {sorted(drift)[len(drift)//2]:.2e}, max {max(drift):.2e}\n")
    print("validation error of the layer, refitted A vs unrefitted A0 (geometric mean of e(A)/e(A0) over targets; "
          "< 1 = better; worst target in brackets)\n")
    print("| setting | " + " | ".join(f"N = {n} windows" for n in ns) + " |")
    print("|---|" + "---:|" * len(ns))
    for s, _ in settings:
        cells = []
        for n in ns:
            v = logr[(s, n)]
            cells.append(f"{math.exp(sum(v) / len(v)):.3f} ({math.exp(max(v)):.2f})")
        print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Choose the refine settings on VALIDATION windows of the training plays (never the held-out plays).

Validation windows: non-overlapping ``seq_len`` windows of the calibration corpus (the training plays), evenly
spaced, with every window that overlaps a calibration window (same seed, count and length as the config's
calibration) dropped. For each compressed folder given (a method's stage0), prints the validation perplexity
without refinement and with each setting, plus the time of each refinement and of one forward pass over the
refine windows (same run, contended CPU). The committed numbers: bench/results/refine_validation_study.md (the
settings study, with its commands) and bench/results/refine_study_cpu_contended.md (the first, over-fitting runs).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import yaml

from lowrank.allocation import Allocation
from lowrank.calibration import load_stat
from lowrank.checkpoint import load_compressed, save_compressed
from lowrank.data import token_stream
from lowrank.evaluation import perplexity
from lowrank.io import load_tensors, read_json
from lowrank.model import find_targets, load_model, load_tokenizer
from lowrank.refine import RefineConfig, refine_model
from lowrank.spaces import SPACES, output_factor
from lowrank.truncation import truncate_model

LSQ = dict(anchor=0.0, target_mix=1.0)  # plain least squares against the dense outputs (the first study's refit)
SETTINGS = {
    "defaults (A, anchor 1, target mix 0.5)": dict(mode="closed_form"),
    "A (damping 1e-4)": dict(mode="closed_form", damping=1e-4, **LSQ),
    "A then B (damping 1e-4)": dict(mode="closed_form", damping=1e-4, refit_b=True, **LSQ),
    "A (damping 1e-2)": dict(mode="closed_form", damping=1e-2, **LSQ),
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
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS ('' = none)")
    ap.add_argument("--custom", action="append", default=[],
                    help="an extra setting 'LABEL=key:value,key:value' of RefineConfig fields (repeatable), "
                         "e.g. 'anchor 1=anchor:1,damping:0'")
    ap.add_argument("--no-fit-ppl", action="store_true", help="skip the perplexity on the refine windows")
    ap.add_argument("--no-base", action="store_true", help="skip the unrefined row (printed by another process)")
    ap.add_argument("--time-truncation", action="store_true", help="also time the truncation (same run)")
    ap.add_argument("--output-metric", default=None, choices=["io_kl"],
                    help="weight every setting's B refit (refit_b) by this space's output metric T Tᵀ (io_kl: "
                         "IO-SVD's top-K KL metric, pretrained/stats/output_kl); the A refit is the same under any")
    ap.add_argument("--save", default=None,
                    help="write each setting's refined model to SAVE/<setting label> (load_compressed), so the "
                         "chosen one can be evaluated on the held-out plays without refitting it")
    ap.add_argument("--heldout", action="store_true",
                    help="also print the held-out ppl (results/<model>/data/evaluation.safetensors): a report "
                         "column only, never used to choose")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(open("config.yaml"))
    manifest = os.path.join(args.results, "pretrained", "manifest.json")
    calib = {"seed": 3, "n_samples": 64, "seq_len": 512, **cfg["calibration"]}
    val = None  # --val 0: no validation windows (no tokenisation of the training plays)
    if args.val > 0:
        val = validation_windows(token_stream(calib["corpus"], load_tokenizer(manifest)), 512, args.val, calib)
    windows = load_tensors(os.path.join(args.results, "data", "calibration.safetensors"))[0]["tokens"]
    dense = load_model(manifest)
    fit = windows[: args.windows]
    t0 = time.perf_counter()
    # the forward pass over the refine windows, timed (skipped with --no-fit-ppl)
    dense_fit = float("nan") if args.no_fit_ppl else perplexity(dense, fit)["ppl"]
    t_fwd = float("nan") if args.no_fit_ppl else time.perf_counter() - t0
    print(f"SmolLM2-135M, CPU ({args.threads} threads, contended), refine on {args.windows} x 512 calibration "
          f"tokens, validation {args.val} x 512 tokens of the training plays outside every calibration window")
    dense_val = "" if args.no_base or val is None else f"dense validation ppl {perplexity(dense, val)['ppl']:.2f}; "
    print(f"\n{dense_val}dense ppl on the refine windows {dense_fit:.2f}; forward over them {t_fwd:.1f} s\n")
    # the truncation of the first stage's method (input_gram whitening) in the same run, for the time ratio
    t_trunc = float("nan")
    if args.time_truncation:
        t_trunc = _time_truncation(args, cfg, dense)
        print(f"truncation (input_gram, ranks of {args.stage[0]}) {t_trunc:.1f} s\n")
    heldout = load_tensors(os.path.join(args.results, "data", "evaluation.safetensors"))[0]["tokens"]
    out_factor = None
    if args.output_metric:
        kind = SPACES[args.output_metric].output_stat  # the output side only
        ostats = {kind: load_stat(os.path.join(args.results, "pretrained", "stats", f"{kind}.safetensors"))}
        out_factor = lambda n: output_factor(args.output_metric, n, ostats)  # noqa: E731
        print(f"B refits weighted by the {args.output_metric} output metric\n")

    def ppl(model: torch.nn.Module) -> str:
        v = f"{perplexity(model, val)['ppl']:.2f}" if val is not None else "-"
        v = ("-" if args.no_fit_ppl else f"{perplexity(model, fit)['ppl']:.2f}") + " | " + v
        return v + (f" | {perplexity(model, heldout)['ppl']:.2f}" if args.heldout else "")

    print("| stage | setting | refine-window ppl | val ppl |" + (" held-out ppl |" if args.heldout else "") +
          " mean block error before -> after | refine s | refine / forward | refine / truncation |")
    print("|---|---|---:|---:|" + ("---:|" if args.heldout else "") + "---|---:|---:|---:|")
    for stage in args.stage:
        base = load_compressed(stage)
        name = "/".join(stage.rstrip("/").split("/")[-3:-1])
        if not args.no_base:
            print(f"| {name} | none | {ppl(base)} | | | | |", flush=True)
        settings = {k: SETTINGS[k] for k in args.settings.split(",") if k}
        for c in args.custom:
            label, _, body = c.partition("=")
            pairs = (kv.partition(":") for kv in body.split(",") if kv)
            settings[label] = {k: yaml.safe_load(v) for k, _, v in pairs}
        for key, setting in settings.items():
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            rep = refine_model(model, dense, windows, RefineConfig(**{"windows": args.windows, **setting}),
                               output_factor=out_factor)
            dt = time.perf_counter() - t0
            b = rep.blocks
            eb, ea = sum(x["error_before"] for x in b) / len(b), sum(x["error_after"] for x in b) / len(b)
            if args.save:
                save_compressed(os.path.join(args.save, key.replace("/", "_")), model, manifest,
                                {"stage": "refine", "after_stage": name, "refine": {"windows": args.windows, **setting},
                                 "blocks": b})
            polish = [x["polish_kept"] for x in b if "polish_kept" in x]
            kept = f"; polish kept in {sum(polish)}/{len(polish)} blocks" if polish else ""
            print(f"| {name} | {key} | {ppl(model)} | {eb:.4f} -> {ea:.4f}{kept} | {dt:.0f} | "
                  f"{dt / t_fwd:.1f} | {dt / t_trunc:.1f} |", flush=True)


def _time_truncation(args: argparse.Namespace, cfg: dict, dense: torch.nn.Module) -> float:
    """Seconds of the truncation of the first stage's method (input_gram whitening) with its ranks."""
    alloc = Allocation.from_json(read_json(os.path.join(args.stage[0], "..", "allocation.json")))
    stats = {"input_gram": load_stat(os.path.join(args.results, "pretrained", "stats", "input_gram.safetensors"))}
    trunc = copy.deepcopy(dense)
    t0 = time.perf_counter()
    truncate_model(trunc, find_targets(trunc), alloc.ranks, "input_gram", stats, cfg["whitening"]["damping"],
                   decomposition=cfg.get("decomposition", {}).get("method", "eigh"))
    t_trunc = time.perf_counter() - t0
    return t_trunc


if __name__ == "__main__":
    main()

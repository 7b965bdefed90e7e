"""Prehab study on a real model, in one process: each arm against its λ = 0 control (same steps, lr, tokens).

For each arm ``LABEL=key:value,...`` (fields of :class:`lowrank.prehab.PrehabConfig`, plus ``seq_len``: the
calibration windows are cut into windows of that many tokens, so a step sees fewer tokens and costs less) this
fine-tunes a copy of the pretrained model with ``CE + λ(t)·R`` (the arm) and with CE alone (its control: the same
batches, steps and lr, no surrogate term), then for each model:

* the planned tail ``mean_k Σ_{i>k} σ_i(W S)² / ‖W₀ S‖²`` at the SVD-LLM ranks of every kept fraction (``S`` the
  pretrained whitening, as the DAG's ``reuse_prehab_whitening: true``): the surrogate's movement;
* SVD-LLM (input_gram whitening of the pretrained statistics, uniform ranks of ``svd-llm/<ratio>/allocation.json``)
  at every kept fraction: perplexity on VALIDATION windows (training plays outside every calibration window,
  :func:`refine_study.validation_windows`), and on the held-out plays with ``--heldout`` (report only);
* with ``--zs-svd``: the default ZS-SVD recipe (tail_curvature scores on ``--gradient-windows`` calibration
  windows of the model itself, zero-sum allocation, input_gram truncation) at every kept fraction (or at
  ``--zs-ratios``).

One JSON line per model and fraction goes to ``--out`` (appended), so arms can run in separate processes;
``prehab_study.py --table FILE...`` prints them as one markdown table. The committed table and commands:
bench/results/prehab_study_cpu.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Any

import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from refine_study import validation_windows  # noqa: E402

from lowrank.allocation import Allocation, allocate  # noqa: E402
from lowrank.data import token_stream  # noqa: E402
from lowrank.evaluation import perplexity  # noqa: E402
from lowrank.finetune import train  # noqa: E402
from lowrank.io import load_tensors, read_json  # noqa: E402
from lowrank.model import find_targets, load_model, load_tokenizer  # noqa: E402
from lowrank.statistics import load_stat  # noqa: E402
from lowrank.streaming import fused_scores  # noqa: E402
from lowrank.prehab import PrehabConfig, RankPenalty, relative_tail, whitened_factors, whitened_spectra  # noqa: E402
from lowrank.truncation import decompose_targets, truncate_model  # noqa: E402


def parse_arm(text: str) -> tuple[str, dict[str, Any]]:
    label, _, body = text.partition("=")
    pairs = (kv.partition(":") for kv in body.split(",") if kv)
    return label, {k: _value(v) for k, _, v in pairs}


def _value(text: str) -> Any:
    """YAML scalar, with ``1e4`` read as a number (YAML 1.1 wants ``1.0e+4``)."""
    v = yaml.safe_load(text)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def planned_tails(model: torch.nn.Module, factors: dict, plans: dict[float, dict], energies: dict) -> dict:
    sig = whitened_spectra(model, find_targets(model), factors)
    out = {}
    for ratio, ranks in plans.items():
        per = relative_tail(sig, ranks, energies)
        out[f"{ratio:.2f}"] = sum(per.values()) / len(per)
    return out


def render(paths: list[str]) -> str:
    """Markdown table of JSONL files written by this script: one row per arm, model, recipe and kept fraction;
    ``vs control`` = ``1 − ppl / ppl_control`` of the same arm, recipe and fraction (positive: prehab better);
    the surrogate column is the recorded mean surrogate at the first and at the last step (before its update)."""
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    key = lambda r: (r["arm"], r["recipe"], r["ratio"])  # noqa: E731
    ctl: dict[tuple, dict] = {}
    for r in rows:  # an arm sharing another's control (same steps, lr, tokens) has none of its own
        if r["model"] == "control":
            ctl[key(r)] = r
            s = r["settings"]
            ctl[("shared", s["steps"], s["lr"], s["seq_len"], r["recipe"], r["ratio"])] = r
    out = ["| arm | model | recipe | kept | surrogate first → last step | planned tail 0.6 / 0.4 | dense val | "
           "val ppl | val vs control | dense held-out | held-out ppl | held-out vs control |",
           "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]

    def moved(r: dict) -> str:
        h = [x["surrogate"] for x in r.get("history", []) if "surrogate" in x]
        return f"{h[0]:.5g} → {h[-1]:.5g} ({100 * (h[-1] / h[0] - 1):+.1f} %)" if len(h) > 1 and h[0] else ""

    def gain(r: dict, c: dict | None, k: str) -> str:
        return "" if c is None or r["model"] != "prehab" or k not in r or k not in c else \
            f"{100 * (1 - r[k] / c[k]):+.1f} %"

    fmt = lambda r, k: f"{r[k]:.2f}" if k in r else ""  # noqa: E731
    for r in rows:
        s = r.get("settings", {})
        c = ctl.get(key(r)) or ctl.get(("shared", s.get("steps"), s.get("lr"), s.get("seq_len"), r["recipe"],
                                        r["ratio"]))
        t = r["tail"]
        tails = " / ".join(f"{t[k]:.5f}" if k in t else "" for k in ("0.60", "0.40"))
        out.append(f"| {r['arm']} | {r['model']} | {r['recipe']} | {r['ratio']:.1f} | {moved(r)} | {tails} | "
                   f"{r['dense_val']:.2f} | {r['val']:.2f} | {gain(r, c, 'val')} | {fmt(r, 'dense_heldout')} | "
                   f"{fmt(r, 'heldout')} | {gain(r, c, 'heldout')} |")
    return "\n".join(out)


def main() -> None:
    if sys.argv[1:2] == ["--table"]:
        print(render(sys.argv[2:]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default="results/smollm2-135m")
    ap.add_argument("--arm", action="append", default=[], help="LABEL=key:value,... (repeatable)")
    ap.add_argument("--ratios", default="0.6,0.4")
    ap.add_argument("--plan-ratio", type=float, default=0.6, help="the ratio whose SVD-LLM ranks tail_energy aims at")
    ap.add_argument("--val", type=int, default=8)
    ap.add_argument("--heldout", action="store_true")
    ap.add_argument("--zs-svd", action="store_true")
    ap.add_argument("--zs-ratios", help="the kept fractions of the ZS-SVD rows (default: --ratios)")
    ap.add_argument("--gradient-windows", type=int, default=8)
    ap.add_argument("--no-control", action="store_true")
    ap.add_argument("--baseline", action="store_true", help="also the untouched pretrained model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--save-dir", help="keep each trained arm's target weights here and reuse them on a later call")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(open("config.yaml"))
    damping = cfg["whitening"]["damping"]
    manifest = os.path.join(args.results, "pretrained", "manifest.json")
    calib = {"seed": 3, "n_samples": 64, "seq_len": 512, **cfg["calibration"]}
    val = validation_windows(token_stream(calib["corpus"], load_tokenizer(manifest)), 512, args.val, calib)
    heldout = load_tensors(os.path.join(args.results, "data", "evaluation.safetensors"))[0]["tokens"]
    windows = load_tensors(os.path.join(args.results, "data", "calibration.safetensors"))[0]["tokens"]
    grams = load_stat(os.path.join(args.results, "pretrained", "stats", "input_gram.safetensors"))
    stats = {"input_gram": grams}
    ratios = [float(r) for r in args.ratios.split(",")]
    plans = {r: Allocation.from_json(read_json(os.path.join(args.results, "svd-llm", f"{r:.2f}", "allocation.json"))
                                     ).ranks for r in sorted(set(ratios + [args.plan_ratio]))}
    base = load_model(manifest)
    targets = find_targets(base)
    factors = whitened_factors(targets, grams, damping)
    energies = {t.name: float((base.get_submodule(t.name).weight.detach() @ factors[t.name]).square().sum())
                for t in targets}

    def evaluate(model: torch.nn.Module, record: dict) -> None:
        t0 = time.perf_counter()
        record["tail"] = planned_tails(model, factors, plans, energies)
        record["dense_val"] = perplexity(model, val)["ppl"]
        if args.heldout:
            record["dense_heldout"] = perplexity(model, heldout)["ppl"]
        dirs = decompose_targets(model, find_targets(model), "input_gram", stats, damping, decomposition="eigh")
        for r in ratios:
            m = copy.deepcopy(model)
            truncate_model(m, find_targets(m), plans[r], "input_gram", stats, damping, directions=dirs)
            row = {**record, "recipe": "svd-llm", "ratio": r, "val": perplexity(m, val)["ppl"]}
            if args.heldout:
                row["heldout"] = perplexity(m, heldout)["ppl"]
            emit(row)
        if args.zs_svd:
            zs_svd(model, record)
        print(f"  evaluation {time.perf_counter() - t0:.0f} s", flush=True)

    def zs_svd(model: torch.nn.Module, record: dict) -> None:
        t0 = time.perf_counter()
        spec = cfg["methods"]["zs-svd"]
        scored, _ = fused_scores(model, windows[: args.gradient_windows], cfg["scoring"]["gradient_batch_size"],
                                 "cpu", find_targets(model), spec["scorer"], spec["whitening"], stats, damping,
                                 "eigh")  # the DAG's scorer (rule score_components, streamed)
        scores = {n: d["score"] for n, d in scored.items()}
        record = {**record, "score_s": round(time.perf_counter() - t0, 1)}
        shapes = {t.name: t.shape for t in find_targets(model)}
        for r in [float(x) for x in args.zs_ratios.split(",")] if args.zs_ratios else ratios:
            alloc = allocate(spec["allocator"], shapes, r, scores)
            m = copy.deepcopy(model)
            truncate_model(m, find_targets(m), alloc.ranks, "input_gram", stats, damping, decomposition="eigh")
            row = {**record, "recipe": "zs-svd", "ratio": r, "val": perplexity(m, val)["ppl"]}
            if args.heldout:
                row["heldout"] = perplexity(m, heldout)["ppl"]
            emit(row)

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    if args.baseline:
        evaluate(base, {"arm": "pretrained", "model": "pretrained"})
    controls_done: set[tuple] = set()  # a control is the same for every λ and surrogate: run once per key
    for text in args.arm:
        label, arm = parse_arm(text)
        seq_len = int(arm.pop("seq_len", 512))
        w = windows[:, : windows.shape[1] // seq_len * seq_len].reshape(-1, seq_len)
        pc = PrehabConfig(**{"plan": {"method": "svd-llm", "ratio": args.plan_ratio}, "checkpoint_every": 0, **arm})
        key = (pc.steps, pc.batch_size, pc.lr, pc.optimizer, pc.seed, seq_len)  # what the control depends on
        kinds = ["prehab"] + ([] if args.no_control or key in controls_done else ["control"])
        controls_done.add(key)
        for kind in kinds:
            model = copy.deepcopy(base)
            params = {t.name: model.get_submodule(t.name).weight for t in targets}
            saved = os.path.join(args.save_dir, f"{label}.{kind}.pt") if args.save_dir else None
            if saved and os.path.exists(saved):  # the same arm trained by an earlier call: its weights and history
                state = torch.load(saved)
                with torch.no_grad():
                    for name, p in params.items():
                        p.copy_(state["weights"][name])
                hist, dt = state["history"], state["train_s"]
            else:
                penalty = None if kind == "control" else RankPenalty(model, targets, factors, pc,
                                                                     plans[args.plan_ratio])
                t0 = time.perf_counter()
                res = train(model, params, w, steps=pc.steps, batch_size=pc.batch_size, lr=pc.lr,
                            optimizer=pc.optimizer, seed=pc.seed, penalty=penalty, desc=kind)
                dt = time.perf_counter() - t0
                hist = [{k: round(v, 6) if isinstance(v, float) else v for k, v in h.items()} for h in res.history]
                if saved:
                    torch.save({"weights": {n: p.detach() for n, p in params.items()}, "history": hist,
                                "train_s": dt}, saved)
            print(f"{label} {kind}: {pc.steps} steps in {dt:.0f} s; {hist}", flush=True)
            evaluate(model, {"arm": label, "model": kind, "settings": {**arm, "seq_len": seq_len},
                             "train_s": round(dt, 1), "history": hist})


if __name__ == "__main__":
    main()

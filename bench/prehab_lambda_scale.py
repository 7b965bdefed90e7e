"""Which λ makes a prehab surrogate's gradient comparable to the CE gradient, per target (issue 19).

Adam normalises each weight's step, so the penalty ``λ · (1/K) Σ_k s(W_k S_k)`` steers a weight only where
``λ |∂s/∂W|/K`` is not negligible next to ``|∂CE/∂W|``. This prints, over the K targets, the median and the
10th / 90th percentile of ``mean|∂CE/∂W_k| / mean|∂R/∂W_k|`` (R = the mean surrogate) on ``--windows`` calibration
windows: λ of that order balances the two.

    python bench/prehab_lambda_scale.py --run results/smollm2-135m --plan svd-llm/0.60 --surrogate tail_energy
"""

from __future__ import annotations

import argparse
import statistics

import torch

from lowrank.calibration import load_stat
from lowrank.gradients import causal_lm_loss
from lowrank.io import load_tensors, read_json
from lowrank.model import find_targets, load_model
from lowrank.prehab import SURROGATES, PrehabConfig, RankPenalty, whitened_factors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="results/<model> of a run (pretrained/, data/, <plan>/)")
    ap.add_argument("--plan", default="svd-llm/0.60", help="<method>/<ratio> whose allocation.json gives the ranks")
    ap.add_argument("--surrogate", default="tail_energy", choices=sorted(SURROGATES))
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--damping", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(f"{a.run}/pretrained/manifest.json")
    targets = find_targets(model)
    factors = whitened_factors(targets, load_stat(f"{a.run}/pretrained/stats/input_gram.safetensors"), a.damping)
    ranks = {n: t["rank"] for n, t in read_json(f"{a.run}/{a.plan}/allocation.json")["targets"].items()}
    windows = load_tensors(f"{a.run}/data/calibration.safetensors")[0]["tokens"][: a.windows]
    for p in model.parameters():
        p.requires_grad_(False)
    params = [model.get_submodule(t.name).weight for t in targets]
    for p in params:
        p.requires_grad_(True)
    loss, _ = causal_lm_loss(model, windows)
    g_ce = torch.autograd.grad(loss, params)
    method, ratio = a.plan.split("/")
    cfg = PrehabConfig(surrogate=a.surrogate, plan={"method": method, "ratio": float(ratio)})
    values = RankPenalty(model, targets, factors, cfg, ranks).values()
    g_r = torch.autograd.grad(values.mean(), params)
    ratios = sorted(float(c.abs().mean() / r.abs().mean().clamp_min(1e-30)) for c, r in zip(g_ce, g_r))
    k = len(ratios)
    print(f"| surrogate | R | CE | median | p10 | p90 |\n|---|---:|---:|---:|---:|---:|\n"
          f"| {a.surrogate} | {float(values.detach().mean()):.6f} | {float(loss):.4f} | {statistics.median(ratios):.3g} "
          f"| {ratios[k // 10]:.3g} | {ratios[9 * k // 10]:.3g} |")


if __name__ == "__main__":
    main()

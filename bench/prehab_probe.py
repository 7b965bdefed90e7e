"""One-batch probe of prehab on a real model: step time, CE vs penalty gradient norms, initial surrogates.

Usage: python bench/prehab_probe.py RESULTS/{model}  [batch_size]  (needs pretrained/manifest.json,
data/calibration.safetensors and pretrained/stats/input_gram.safetensors under it). Prints a table.
"""

import sys
import time

import torch

from lowrank.calibration import load_stat
from lowrank.gradients import causal_lm_loss
from lowrank.io import load_tensors
from lowrank.model import find_targets, load_model
from lowrank.prehab import PrehabConfig, RankPenalty, whitened_factors

root = sys.argv[1]
bs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
torch.set_num_threads(2)
model = load_model(f"{root}/pretrained/manifest.json")
windows = load_tensors(f"{root}/data/calibration.safetensors")[0]["tokens"][:bs]
grams = load_stat(f"{root}/pretrained/stats/input_gram.safetensors")
targets = find_targets(model)
factors = whitened_factors(targets, grams, 1e-6)
weights = [model.get_submodule(t.name).weight for t in targets]
for p in model.parameters():
    p.requires_grad_(False)
for w in weights:
    w.requires_grad_(True)
t0 = time.time()
ce, _ = causal_lm_loss(model, windows)
g_ce = torch.autograd.grad(ce, weights)
t_ce = time.time() - t0
print(f"CE {float(ce):.4f}; fwd+bwd of {bs}x{windows.shape[1]} tokens: {t_ce:.1f} s")
for name in ("stable_rank", "nuclear", "effective_rank"):
    pen = RankPenalty(model, targets, factors, PrehabConfig(surrogate=name))
    t0 = time.time()
    R = pen.values().mean()
    g_r = torch.autograd.grad(R, weights)
    t_r = time.time() - t0
    n_ce = torch.sqrt(sum(g.square().sum() for g in g_ce))
    n_r = torch.sqrt(sum(g.square().sum() for g in g_r))
    print(f"{name:15s} R={float(R):9.4f}  |dR/dW|={float(n_r):.3e}  |dCE/dW|={float(n_ce):.3e}  "
          f"ratio CE/R={float(n_ce / n_r):.3e}  time {t_r:.1f} s")

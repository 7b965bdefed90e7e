"""lowrank.sensitivity: ASVD's per-target sensitivity table and its binary search to the parameter budget."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml

from lowrank.accounting import TargetShape, stored_params
from lowrank.allocation import sensitivity_ranks
from lowrank.calibration import collect_act_scales, collect_input_grams
from lowrank.gradients import calibration_loss
from lowrank.model import find_targets, linear_weight, load_source, resolve_source, weight_is_transposed
from lowrank.sensitivity import CANDIDATE_RATIOS, Sensitivity, candidate_rank, measure_sensitivity
from lowrank.spaces import input_factor
from lowrank.truncation import truncate

SPECS = yaml.safe_load((Path(__file__).resolve().parents[1] / "data" / "architectures.yaml").read_text())
CPU = torch.device("cpu")


def _build(key: str):
    return load_source(resolve_source(dict(SPECS[key])))[0]


def _brute_force_ppl(model, name, ratio, stats, whitening, windows) -> float:
    """Perplexity of the whole model, ordinary forward, with only ``name`` truncated (float64 factors)."""
    model = copy.deepcopy(model)
    mod = model.get_submodule(name)
    t = next(t for t in find_targets(model) if t.name == name)
    k = candidate_rank(t.shape, ratio)
    W = linear_weight(mod).detach()
    f = truncate(W, k, input_factor(whitening, name, stats, 0.0, CPU))
    Wk = (f.A @ f.B).to(W.dtype)
    with torch.no_grad():
        mod.weight.copy_(Wk.T if weight_is_transposed(mod) else Wk)
    return math.exp(calibration_loss(model, windows, 2))


@pytest.mark.parametrize("key,whitening", [("llama", "act_scale"), ("gpt2", "act_scale"), ("opt", "input_gram")])
def test_table_equals_whole_model_forwards(key, whitening) -> None:
    """Replaying the dense inputs of a target's block gives the same perplexity as an ordinary forward."""
    model = _build(key)
    w = torch.randint(3, 256, (3, 12), generator=torch.Generator().manual_seed(7))
    stats = {"act_scale": collect_act_scales(model, w, 2, CPU), "input_gram": collect_input_grams(model, w, 2, CPU)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = measure_sensitivity(model, w, 2, CPU, stats, whitening, ratios=(0.4, 0.8), max_windows=None)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every weight restored
    targets = find_targets(model)
    assert list(sens.ppl) == [t.name for t in targets]
    assert sens.dense_ppl == pytest.approx(math.exp(calibration_loss(model, w, 2)), rel=1e-6)
    for t in (targets[0], targets[len(targets) // 2 + 1], targets[-1]):  # block 0 (no replay) and block 1
        for j, r in enumerate(sens.ratios):
            ref = _brute_force_ppl(model, t.name, r, stats, whitening, w)
            assert float(sens.ppl[t.name][j]) == pytest.approx(ref, rel=1e-5), (t.name, r)


def test_table_round_trip() -> None:
    sens = Sensitivity(ppl={"a": torch.tensor([3.0, 2.0])}, ratios=(0.4, 0.9), dense_ppl=1.5, tokens=10,
                       whitening="act_scale")
    back = Sensitivity.from_tensors(*sens.to_tensors())
    assert back.ratios == sens.ratios and back.dense_ppl == 1.5 and torch.equal(back.ppl["a"], sens.ppl["a"])


def _synthetic(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {f"t{i}": TargetShape(int(m), int(n), bool(i % 3 == 0))
              for i, (m, n) in enumerate(torch.randint(16, 96, (12, 2), generator=g).tolist())}
    # sensitivity rises as the kept ratio falls, at a per-target rate
    rate = torch.rand(len(shapes), generator=g) * 5
    ratios = CANDIDATE_RATIOS
    ppl = {n: 10 + rate[i] * torch.tensor([1 - r for r in ratios], dtype=torch.float64) ** 2
           for i, n in enumerate(shapes)}
    return shapes, Sensitivity(ppl=ppl, ratios=ratios, dense_ppl=10.0, tokens=1, whitening="act_scale")


def _kept(shapes, ranks) -> int:
    return sum(stored_params(shapes[n], r) for n, r in ranks.items())


@pytest.mark.parametrize("kept_fraction", [0.45, 0.55, 0.7, 0.85, 0.95])
def test_binary_search_meets_the_budget_with_the_largest_cut(kept_fraction) -> None:
    shapes, sens = _synthetic()
    total = sum(stored_params(s, None) for s in shapes.values())
    budget = int(kept_fraction * total)
    ranks = sensitivity_ranks(shapes, sens, kept_fraction)
    assert _kept(shapes, ranks) <= budget
    # brute force over every cut: the search returns the largest cut within the budget
    order = list(shapes)
    triples = sorted(((float(sens.ppl[n][j]), order.index(n), j) for n in shapes for j in range(len(sens.ratios))),
                     key=lambda x: (-x[0], x[1], x[2]))

    def choice(cut):
        smallest = {}
        for _, i, j in triples[cut:]:
            smallest[order[i]] = min(smallest.get(order[i], 1.0), sens.ratios[j])
        return {n: candidate_rank(shapes[n], smallest[n]) if n in smallest else None for n in shapes}

    feasible = [c for c in range(len(triples) + 1) if _kept(shapes, choice(c)) <= budget]
    assert ranks == choice(max(feasible))
    # one more cut (one fewer compression) would overspend: the search does not stop a step early or late
    if max(feasible) < len(triples):
        assert _kept(shapes, choice(max(feasible) + 1)) > budget


def test_ranks_shrink_as_the_budget_shrinks() -> None:
    shapes, sens = _synthetic(1)
    prev = None
    for rho in (0.95, 0.8, 0.65, 0.5):
        ranks = sensitivity_ranks(shapes, sens, rho)
        if prev is not None:
            for n in shapes:
                a = shapes[n].full_rank if prev[n] is None else prev[n]
                b = shapes[n].full_rank if ranks[n] is None else ranks[n]
                assert b <= a
        prev = ranks


def test_limits_and_errors() -> None:
    shapes, sens = _synthetic(2)
    assert sensitivity_ranks(shapes, sens, 1.0) == {n: None for n in shapes}
    with pytest.raises(ValueError, match="smallest candidate ratio"):
        sensitivity_ranks(shapes, sens, 0.2)
    with pytest.raises(ValueError, match="recompute"):
        sensitivity_ranks({**shapes, "extra": TargetShape(8, 8)}, sens, 0.8)
    with pytest.raises(ValueError, match="candidate keep ratios"):
        measure_sensitivity(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), 1, CPU, {}, ratios=(0.5, 1.2))


def test_allocate_dispatches_the_sensitivity_allocator() -> None:
    from lowrank.accounting import TargetShape
    from lowrank.allocation import allocate
    from lowrank.sensitivity import CANDIDATE_RATIOS, Sensitivity

    shapes = {"a": TargetShape(16, 16), "b": TargetShape(32, 16)}
    table = Sensitivity(ppl={"a": torch.linspace(9, 4, 6, dtype=torch.float64),
                             "b": torch.linspace(20, 5, 6, dtype=torch.float64)},
                        ratios=CANDIDATE_RATIOS, dense_ppl=3.0, tokens=100, whitening="act_scale")
    alloc = allocate("sensitivity", shapes, 0.6, None, 0.0, {"asvd_sensitivity": table})
    assert alloc.ranks == sensitivity_ranks(shapes, table, 0.6)
    assert alloc.kept_params <= alloc.budget.max_kept_params
    with pytest.raises(ValueError, match="asvd_sensitivity"):
        allocate("sensitivity", shapes, 0.6, None, 0.0, {})

"""lowrank.prehab / lowrank.finetune: surrogates vs hand computations and finite differences, the λ schedule,
one prehab step lowering the surrogate, resume == uninterrupted, and the bad-input errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lowrank.calibration import collect_input_grams
from lowrank.finetune import batch_indices, make_optimizer
from lowrank.model import find_targets, linear_weight
from lowrank.prehab import (PrehabConfig, RankPenalty, effective_rank, lambda_schedule, nuclear_norm,
                            nuclear_ratio, prehab, rank_summary, relative_tail, stable_rank, tail_energy, whitened_factors,
                            whitened_spectra)

D = torch.float64


def _matrix(sigmas: list[float], m: int = 6, n: int = 4, seed: int = 0) -> torch.Tensor:
    """``U diag(σ) Vᵀ`` with seeded random orthonormal U (m×r), V (n×r)."""
    g = torch.Generator().manual_seed(seed)
    r = len(sigmas)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=D))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=D))
    return U @ torch.diag(torch.tensor(sigmas, dtype=D)) @ V.T


SIG = [3.0, 2.0, 1.0, 0.5]


def test_stable_rank_equals_hand_value() -> None:
    M = _matrix(SIG)
    val, v = stable_rank(M, iters=200)
    assert float(val) == pytest.approx((9 + 4 + 1 + 0.25) / 9, rel=1e-10)
    # the returned vector is the top right singular vector: warm start converges in one iteration
    val1, _ = stable_rank(M, v, iters=1)
    assert float(val1) == pytest.approx(float(val), rel=1e-12)
    assert float(stable_rank(M.T, iters=200)[0]) == pytest.approx(float(val), rel=1e-10)  # wide matrix too


def test_nuclear_and_effective_rank_equal_hand_values() -> None:
    M = _matrix(SIG)
    ridge = 1e-6
    eps = ridge * sum(s * s for s in SIG) / 4  # tr(MᵀM)/n, n = 4 (the smaller Gram)
    st = [math.sqrt(s * s + eps) for s in SIG]
    assert float(nuclear_norm(M, ridge)) == pytest.approx(sum(st), rel=1e-12)
    p = [s / sum(st) for s in st]
    assert float(effective_rank(M, ridge)) == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-12)
    # rank-deficient tall matrix (m=6, n=4, rank 2): the ridge keeps every p_i > 0, the Gram is MᵀM (4×4)
    M2 = _matrix([2.0, 1.0])
    eps2 = ridge * 5.0 / 4
    st2 = [math.sqrt(4 + eps2), math.sqrt(1 + eps2), math.sqrt(eps2), math.sqrt(eps2)]
    assert float(nuclear_norm(M2, ridge)) == pytest.approx(sum(st2), rel=1e-10)


def test_tail_energy_is_the_truncation_error_over_a_fixed_energy() -> None:
    M = _matrix(SIG)
    E0 = 20.0
    for k, tail in ((0, 9 + 4 + 1 + 0.25), (1, 4 + 1 + 0.25), (2, 1.25), (3, 0.25), (4, 0.0), (9, 0.0)):
        assert float(tail_energy(M, k, E0)) == pytest.approx(tail / E0, rel=1e-10, abs=1e-14)
    # Eckart-Young: it equals the Frobenius error of the best rank-k approximation, relative to E0
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    best2 = U[:, :2] @ torch.diag(s[:2]) @ Vh[:2]
    assert float(tail_energy(M, 2, E0)) == pytest.approx(float((M - best2).square().sum()) / E0, rel=1e-10)
    # growing the head (σ_1) does not lower it, unlike the scale-invariant surrogates
    M_head = _matrix([30.0, 2.0, 1.0, 0.5])
    assert float(tail_energy(M_head, 1, E0)) == pytest.approx(float(tail_energy(M, 1, E0)), rel=1e-10)
    assert float(stable_rank(M_head, iters=200)[0]) < float(stable_rank(M, iters=200)[0])
    assert relative_tail({"a": s}, {"a": 1}, {"a": E0})["a"] == pytest.approx(5.25 / E0, rel=1e-10)
    assert relative_tail({"a": s}, {"a": None}, {"a": E0})["a"] == 0.0
    with pytest.raises(ValueError, match="positive reference energy"):
        tail_energy(M, 1, 0.0)


def test_nuclear_ratio_is_the_ratio_with_a_frozen_denominator_that_head_growth_raises() -> None:
    M = _matrix(SIG)
    fro0 = math.sqrt(9 + 4 + 1 + 0.25)
    st = [math.sqrt(s * s + 1e-6 * 14.25 / 4) for s in SIG]
    assert float(nuclear_ratio(M, fro0)) == pytest.approx(sum(st) / fro0, rel=1e-12)  # = ‖M‖_*/‖M‖_F at step 0
    # growing σ_1 lowers the live ratio and the entropy rank but raises the frozen ratio, by Δσ_1 / F₀
    M_head = _matrix([6.0, 2.0, 1.0, 0.5])
    live = lambda X: float(nuclear_norm(X) / X.norm())  # noqa: E731
    assert live(M_head) < live(M) and float(effective_rank(M_head)) < float(effective_rank(M))
    assert float(nuclear_ratio(M_head, fro0, 0.0) - nuclear_ratio(M, fro0, 0.0)) == pytest.approx(3.0 / fro0, rel=1e-9)
    # its gradient is U Vᵀ / F₀: every singular value is pulled down by the same amount
    X = M.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nuclear_ratio(X, fro0), X)
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    assert torch.allclose(g, U @ Vh / fro0, atol=1e-6)
    with pytest.raises(ValueError, match="positive reference norm"):
        nuclear_ratio(M, 0.0)


@pytest.mark.parametrize("name", ["stable_rank", "nuclear", "effective_rank", "tail_energy", "tail_energy_wide",
                                  "nuclear_ratio", "nuclear_ratio_wide"])
def test_gradients_match_finite_differences(name: str) -> None:
    M = _matrix([3.0, 2.0, 1.0, 0.5], m=5, n=4, seed=1)
    M = (M.T if name.endswith("wide") else M).clone().requires_grad_(True)
    f = {"stable_rank": lambda X: stable_rank(X, iters=300)[0], "nuclear": lambda X: nuclear_norm(X),
         "effective_rank": lambda X: effective_rank(X), "tail_energy": lambda X: tail_energy(X, 2, 7.0),
         "tail_energy_wide": lambda X: tail_energy(X, 1, 7.0), "nuclear_ratio": lambda X: nuclear_ratio(X, 3.0),
         "nuclear_ratio_wide": lambda X: nuclear_ratio(X, 3.0)}[name]
    (g,) = torch.autograd.grad(f(M), M)
    h = 1e-6
    fd = torch.zeros_like(M)
    with torch.no_grad():
        for i in range(M.shape[0]):
            for j in range(M.shape[1]):
                E = torch.zeros_like(M)
                E[i, j] = h
                fd[i, j] = (f(M + E) - f(M - E)) / (2 * h)
    assert torch.allclose(g, fd, rtol=1e-5, atol=1e-7), (g - fd).abs().max()


@pytest.mark.parametrize("name", ["stable_rank", "nuclear", "effective_rank", "tail_energy", "nuclear_ratio"])
def test_gradients_stay_finite_for_repeated_and_zero_singular_values(name: str) -> None:
    f = {"stable_rank": lambda X: stable_rank(X)[0], "nuclear": nuclear_norm, "effective_rank": effective_rank,
         "tail_energy": lambda X: tail_energy(X, 1, 1.0), "nuclear_ratio": lambda X: nuclear_ratio(X, 1.0)}[name]
    for M in (_matrix([1.0, 1.0, 1.0, 1.0]), _matrix([2.0, 2.0, 0.0, 0.0]), torch.eye(4, dtype=D),
              _matrix([1e-150, 1e-150, 1e-160]), torch.zeros(4, 3, dtype=D)):
        X = M.clone().requires_grad_(True)
        val = f(X)
        (g,) = torch.autograd.grad(val, X)
        assert torch.isfinite(val) and torch.isfinite(g).all(), (name, M)
    # eigh's own backward is not finite on a repeated spectrum: the reason for the spectral backward
    X = torch.eye(4, dtype=D).requires_grad_(True)
    lam, Q = torch.linalg.eigh(X.T @ X)
    (g,) = torch.autograd.grad((lam.sqrt().sum() + Q.sum()), X)
    assert not torch.isfinite(g).all()
    # the surrogate of the identity: every σ equal, so stable rank = effective rank = n
    assert float(stable_rank(torch.eye(4, dtype=D))[0]) == pytest.approx(4.0)
    assert float(effective_rank(torch.eye(4, dtype=D))) == pytest.approx(4.0)


def test_lambda_schedule_is_exponential_then_constant() -> None:
    lam = [lambda_schedule(t, 1e-4, 10.0, 10) for t in range(15)]
    assert lam[0] == pytest.approx(1e-4)
    assert lam[5] == pytest.approx(1e-4 * (1e5) ** 0.5)  # geometric midpoint = 0.1
    ratios = [lam[t + 1] / lam[t] for t in range(9)]
    assert all(r == pytest.approx(10 ** 0.5) for r in ratios)  # constant ratio (1e5)^(1/10)
    assert lam[10:] == [10.0] * 5
    assert lambda_schedule(0, 1e-4, 10.0, 0) == 10.0


@pytest.mark.parametrize("bad, match", [
    ({"surrogate": "frobenius"}, "surrogate 'frobenius' is unknown"),
    ({"lambda0": -1.0}, "lambda0"),
    ({"lambda0": 5.0, "lambda_max": 1.0}, "exceeds lambda_max"),
    ({"lambda0": 0.0}, "cannot warm up"),
    ({"steps": 0}, "steps = 0 must be an integer >= 1"),
    ({"lr": 0.0}, "lr = 0.0 must be > 0"),
    ({"optimizer": "lion"}, "optimizer 'lion' is unknown"),
    ({"step": 3}, "unknown prehab settings"),
    ({"surrogate": "tail_energy"}, "tail_energy needs prehab.plan"),
    ({"plan": {"method": "svd-llm", "ratio": 1.5}}, "plan = .* must be"),
    ({"plan": {"method": "svd-llm"}}, "plan = .* must be"),
])
def test_bad_settings_name_the_value(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PrehabConfig.from_dict(bad)


def test_batches_are_a_pure_function_of_seed_and_step() -> None:
    a = [batch_indices(10, 3, 7, t) for t in range(6)]
    b = [batch_indices(10, 3, 7, t) for t in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(set(torch.cat(a[:3]).tolist())) == 9  # one pass: 3 disjoint batches of a permutation
    with pytest.raises(ValueError, match="calibration.n_samples"):
        batch_indices(2, 3, 0, 0)
    with pytest.raises(ValueError, match="optimizer 'rmsprop'"):
        make_optimizer("rmsprop", [], 1e-3)


@pytest.fixture
def setup(tiny_llama):
    windows = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(5))
    targets = find_targets(tiny_llama)
    grams = collect_input_grams(tiny_llama, windows, 4, torch.device("cpu"), targets)
    return tiny_llama, windows, grams


def test_one_step_lowers_the_surrogate(setup) -> None:
    model, windows, grams = setup
    cfg = PrehabConfig(steps=1, lambda0=100.0, lambda_max=100.0, warmup_steps=0, lr=1e-2, batch_size=4,
                       checkpoint_every=0)
    targets = find_targets(model)
    factors = whitened_factors(targets, grams, 1e-6)
    r0 = float(RankPenalty(model, targets, factors, cfg).values().detach().mean())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = prehab(model, windows, grams, cfg)
    r1 = float(RankPenalty(model, targets, factors, cfg).values().detach().mean())
    assert r1 < r0 - 0.1, (r0, r1)
    assert res.train.history[0]["surrogate"] == pytest.approx(r0, rel=1e-4)
    s = res.summary()
    assert s["after"]["mean_stable_rank"] < s["before"]["mean_stable_rank"]
    # the reported spectra are those of W S (the value the penalty measured)
    assert rank_summary(whitened_spectra(model, targets, factors))["mean_stable_rank"] == pytest.approx(r1, rel=1e-3)
    # only target weights moved
    names = {f"{t.name}.weight" for t in targets}
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, frozen[n])}
    assert moved == names


def test_nuclear_ratio_prehab_starts_at_the_live_ratio_and_lowers_it_without_a_plan(setup) -> None:
    model, windows, grams = setup
    targets = find_targets(model)
    factors = whitened_factors(targets, grams, 1e-6)
    with torch.no_grad():
        Ms = [linear_weight(model.get_submodule(t.name)).to(factors[t.name].dtype) @ factors[t.name] for t in targets]
        live = [float(nuclear_norm(M) / M.norm()) for M in Ms]  # ‖M‖_*/‖M‖_F of the pretrained weights
    cfg = PrehabConfig(surrogate="nuclear_ratio", steps=2, lambda0=10.0, lambda_max=10.0, warmup_steps=0, lr=1e-2,
                       batch_size=4, checkpoint_every=0)
    pen = RankPenalty(model, targets, factors, cfg)
    assert float(pen.values().detach().mean()) == pytest.approx(sum(live) / len(live), rel=1e-5)
    res = prehab(model, windows, grams, cfg)
    h = res.train.history
    assert h[0]["surrogate"] == pytest.approx(sum(live) / len(live), rel=1e-5)
    assert float(pen.values().detach().mean()) < h[0]["surrogate"] - 0.05, h  # the frozen F₀ of step 0
    assert "tail" not in h[0]  # no plan: no planned truncation loss recorded


def test_tail_energy_prehab_lowers_the_planned_truncation_loss_and_records_it(setup) -> None:
    """One step of the tail surrogate lowers the relative tail energy at the planned ranks, the quantity that
    truncation to those ranks removes; a stable-rank run with the same plan records the same quantity as
    ``tail`` without optimising it."""
    model, windows, grams = setup
    targets = find_targets(model)
    ranks = {t.name: max(1, min(t.shape.m, t.shape.n) // 2) for t in targets}
    ranks[targets[0].name] = None  # kept dense by the plan: contributes 0
    plan = {"method": "svd-llm", "ratio": 0.5}
    base = copy.deepcopy(model)
    factors = whitened_factors(targets, grams, 1e-6)
    cfg = PrehabConfig(surrogate="tail_energy", plan=plan, steps=1, lambda0=100.0, lambda_max=100.0, warmup_steps=0,
                       lr=1e-2, batch_size=4, checkpoint_every=0)
    pen = RankPenalty(model, targets, factors, cfg, ranks)
    t0 = float(pen.values().detach().mean())
    assert pen.planned_tail() == pytest.approx(t0, rel=1e-4)
    res = prehab(model, windows, grams, cfg, ranks=ranks)
    rec = res.train.history[0]
    assert rec["tail"] == pytest.approx(t0, rel=1e-4) and rec["surrogate"] == rec["tail"]
    assert pen.planned_tail() < 0.9 * t0  # the same penalty object: E₀ fixed at the pretrained weights
    control = PrehabConfig(plan=plan, steps=1, lambda0=100.0, lambda_max=100.0, warmup_steps=0, lr=1e-2,
                           batch_size=4, checkpoint_every=0)
    res2 = prehab(base, windows, grams, control, ranks=ranks)
    assert res2.train.history[0]["tail"] == pytest.approx(t0, rel=1e-4)
    with pytest.raises(ValueError, match="needs the planned ranks"):
        RankPenalty(model, targets, factors, cfg)
    with pytest.raises(ValueError, match="no rank for 1 targets"):
        RankPenalty(model, targets, factors, cfg, {k: v for k, v in list(ranks.items())[1:]})


@pytest.mark.parametrize("optimizer", ["adam", "adafactor"])
def test_resume_after_interruption_equals_an_uninterrupted_run(setup, tmp_path, optimizer: str) -> None:
    model, windows, grams = setup
    cfg = PrehabConfig(steps=6, lambda0=1e-2, lambda_max=1.0, warmup_steps=3, lr=1e-3, batch_size=2,
                       checkpoint_every=2, optimizer=optimizer, seed=11)
    ref = copy.deepcopy(model)
    full = prehab(ref, windows, grams, cfg)
    ck = str(tmp_path / "ck.safetensors")
    killed = copy.deepcopy(model)
    part = prehab(killed, windows, grams, cfg, checkpoint=ck, stop_after=3)  # "killed" after step 3; ckpt at 2
    assert part.train.steps == 3
    resumed_model = copy.deepcopy(model)  # a fresh process: weights from the pretrained model again
    res = prehab(resumed_model, windows, grams, cfg, checkpoint=ck)
    assert res.train.resumed_from == 2 and res.train.steps == 6
    for t in find_targets(model):
        a = linear_weight(ref.get_submodule(t.name))
        b = linear_weight(resumed_model.get_submodule(t.name))
        assert torch.equal(a, b), t.name
    assert [h["loss"] for h in res.train.history] == [h["loss"] for h in full.train.history]
    # a checkpoint of other settings is ignored, not silently mixed in
    other = copy.deepcopy(model)
    res2 = prehab(other, windows, grams, PrehabConfig(**{**cfg.__dict__, "lr": 2e-3}), checkpoint=ck)
    assert res2.train.resumed_from == 0


def test_missing_statistics_are_named(setup) -> None:
    model, windows, grams = setup
    grams.group_of.pop(find_targets(model)[3].name)
    with pytest.raises(ValueError, match="no input statistics for target .*calibration_stats"):
        prehab(model, windows, grams, PrehabConfig(steps=1))


def test_rehab_trains_only_the_factors_and_lowers_the_calibration_loss(setup) -> None:
    from lowrank.allocation import allocate
    from lowrank.gradients import calibration_loss
    from lowrank.rehab import factor_parameters, rehab
    from lowrank.truncation import truncate_model

    model, windows, grams = setup
    targets = find_targets(model)
    alloc = allocate("uniform", {t.name: t.shape for t in targets}, 0.5)
    truncate_model(model, targets, alloc.ranks, "input_gram", {"input_gram": grams}, damping=1e-6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss0 = calibration_loss(model, windows, 4)
    res = rehab(model, windows, steps=5, lr=1e-3, batch_size=4)
    assert calibration_loss(model, windows, 4) < loss0 - 0.01
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(factor_parameters(model)) and len(moved) == 2 * len(targets)
    assert res.steps == 5 and len(res.history) == 5


def test_history_plot_draws_every_recorded_curve_of_run_and_control(tmp_path, monkeypatch) -> None:
    """The prehab report's per-step plot: CE, surrogate and planned tail of the run (solid) and its control (dashed);
    a run without a plan has no ``tail`` and draws nothing in that panel."""
    import matplotlib.axes

    from lowrank.report import plot_prehab_history

    drawn: list[tuple[str, list]] = []
    real = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        drawn.append((args[2], list(args[1])))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    run = [{"step": t, "ce": 3.5 - 0.1 * t, "surrogate": 0.05 - 0.001 * t, "tail": 0.05 - 0.001 * t} for t in range(3)]
    ctl = [{"step": t, "ce": 3.5 - 0.1 * t, "surrogate": 0.05, "tail": 0.05} for t in range(3)]
    bare = [{"step": t, "ce": 3.0, "surrogate": 3.5} for t in range(2)]  # stable rank, no plan: no tail
    path = tmp_path / "h.png"
    plot_prehab_history({"m": run, "n": bare}, {"m": ctl}, path)
    assert path.stat().st_size > 10_000
    assert [s for s, _ in drawn] == ["-", "-", "-", "--", "--", "--", "-", "-"]
    assert drawn[2][1] == pytest.approx([0.05, 0.049, 0.048]) and drawn[5][1] == [0.05, 0.05, 0.05]
    assert drawn[7][1] == [3.5, 3.5]

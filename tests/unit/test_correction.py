"""lowrank.correction: the projected step ``W_k + (⟨g, δ⟩/⟨g, g⟩) g`` and one correction of a truncated model."""

from __future__ import annotations

import copy

import pytest
import torch

from lowrank.allocation import allocate
from lowrank.calibration import collect_input_grams
from lowrank.checkpoint import factor_state
from lowrank.correction import correct_model, projected_step
from lowrank.factorized import LowRankLinear
from lowrank.gradients import calibration_gradients, calibration_loss
from lowrank.model import find_targets, linear_weight
from lowrank.spaces import bind, input_factor
from lowrank.truncation import truncate, truncate_model


def _mats(seed: int = 0, shape=(6, 9)):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g) for _ in range(3))  # float32, like module weights


def test_projected_step_formula_and_first_order_identity():
    W_k, W_T, g = _mats()
    new = projected_step(W_k, W_T, g)
    assert new.dtype == torch.float64 and new.shape == W_k.shape
    Wk, WT, g64 = W_k.double(), W_T.double(), g.double()
    alpha = float((g64 * (WT - Wk)).sum() / (g64 * g64).sum())
    torch.testing.assert_close(new, Wk + alpha * g64, rtol=0, atol=1e-12)
    # same first-order loss change as jumping to the teacher: ⟨g, W_new − W_k⟩ = ⟨g, W_T − W_k⟩
    lhs, rhs = float((g64 * (new - Wk)).sum()), float((g64 * (WT - Wk)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-12)
    # ... with the smallest step that does so (the projection of δ on g): ‖ΔW'‖ = |⟨g, δ⟩|/‖g‖ <= ‖δ‖
    step = float(torch.linalg.matrix_norm(new - Wk))
    assert step == pytest.approx(abs(rhs) / float(torch.linalg.matrix_norm(g64)), rel=1e-12)
    assert step < float(torch.linalg.matrix_norm(WT - Wk))
    # the step is along g: the residual δ − ΔW' is orthogonal to g
    assert float((g64 * (WT - new)).sum()) == pytest.approx(0.0, abs=1e-12 * abs(rhs))


def test_projected_step_scale_free_in_g():
    """Only the direction of g matters: scaling g by 1e-6 or −3 gives the same step."""
    W_k, W_T, g = _mats(1)
    ref = projected_step(W_k, W_T, g)
    torch.testing.assert_close(projected_step(W_k, W_T, 1e-6 * g.double()), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(projected_step(W_k, W_T, -3 * g.double()), ref, rtol=0, atol=1e-12)


def test_projected_step_zero_gradient_returns_W_k():
    W_k, W_T, _ = _mats(2)
    new = projected_step(W_k, W_T, torch.zeros_like(W_k))
    assert new.dtype == torch.float64
    assert torch.equal(new, W_k.double())
    new[0, 0] += 1.0  # a copy, not a view of the caller's weight
    assert float(W_k[0, 0]) != float(new[0, 0])


@pytest.fixture
def truncated(tiny_llama, token_windows):
    """The tiny LLaMA truncated in the input_gram space, uniform 0.5, except one target kept dense."""
    model = tiny_llama
    targets = find_targets(model)
    teacher = {t.name: linear_weight(model.get_submodule(t.name)).detach().clone() for t in targets}
    teacher_loss = calibration_loss(model, token_windows, 4)
    stats = {"input_gram": collect_input_grams(model, token_windows, 4, torch.device("cpu"), targets)}
    ranks = dict(allocate("uniform", {t.name: t.shape for t in targets}, 0.5).ranks)
    ranks[targets[2].name] = None  # layer 0 v_proj stays dense: the correction must leave it alone
    truncate_model(model, targets, ranks, "input_gram", stats, damping=1e-6)
    return {"model": model, "targets": targets, "teacher": teacher, "stats": stats, "ranks": ranks,
            "windows": token_windows, "teacher_loss": teacher_loss}


def test_correct_model_lowers_loss_and_keeps_ranks(truncated):
    model, targets, windows, stats = truncated["model"], truncated["targets"], truncated["windows"], truncated["stats"]
    factored = {n: r for n, r in truncated["ranks"].items() if r is not None}
    dense_name = targets[2].name
    dense_before = model.get_submodule(dense_name).weight.detach().clone()
    compressed_loss = calibration_loss(model, windows, 2)
    # teacher 5.5402, truncated 5.5477 on these windows: compression raised the loss
    assert compressed_loss > truncated["teacher_loss"]
    # the reference: the step and re-truncation computed here from gradients at the compressed weights
    dense_copy = copy.deepcopy(model)
    for n in factored:
        mod = dense_copy.get_submodule(n)
        dense_copy.set_submodule(n, mod.to_dense())
    grads = calibration_gradients(dense_copy, windows, 2, "cpu", [t for t in targets if t.name in factored])

    res = correct_model(model, truncated["teacher"], targets, windows, 2,
                        bind("input_gram", stats, 1e-6), "cpu")
    report, before = res.targets, res.loss_before
    after = calibration_loss(model, windows, 2)
    assert res.scale == 1.0 and res.trials[0][0] == 1.0  # the full step already lowered the loss here
    assert res.loss_after == pytest.approx(after, rel=1e-9)
    # loss_before is the loss at the compressed weights (same batches: float32 round-off only)
    assert before == pytest.approx(compressed_loss, rel=1e-6)
    # one correction lowers the calibration loss (measured 5.54767 -> 5.54374, i.e. -3.9e-3, about half the
    # first-order prediction Σ⟨g, δ⟩ = -7.5e-3 of the un-truncated step)
    assert after < before
    assert sum(r["predicted_delta_loss"] for r in report.values()) < 0
    # ranks preserved, LowRankLinear at every factored target, the dense target untouched
    _, ranks_after = factor_state(model)
    assert ranks_after == factored
    assert set(report) == set(factored)
    for name, k in factored.items():
        mod = model.get_submodule(name)
        assert isinstance(mod, LowRankLinear) and mod.rank == k and mod.up.weight.dtype == torch.float32
    assert isinstance(model.get_submodule(dense_name), torch.nn.Linear)
    assert torch.equal(model.get_submodule(dense_name).weight, dense_before)
    # each factored weight is the rank-k whitened truncation of the projected step
    for t in targets:
        if t.name not in factored:
            continue
        W_k = dense_copy.get_submodule(t.name).weight.detach()
        W_T, g = truncated["teacher"][t.name], grads.G[t.name]
        delta = W_T.double() - W_k.double()
        assert report[t.name]["predicted_delta_loss"] == pytest.approx(float((g * delta).sum()), rel=1e-9)
        assert report[t.name]["alpha"] == pytest.approx(float((g * delta).sum() / (g * g).sum()), rel=1e-9)
        S = input_factor("input_gram", t.name, stats, 1e-6)
        f = truncate(projected_step(W_k, W_T, g), factored[t.name], S)
        # float32 storage of factors of weights ~0.02-0.1: 1e-6 absolute is round-off
        torch.testing.assert_close(model.get_submodule(t.name).weight.double(), f.A @ f.B, rtol=0, atol=1e-6)


def test_correct_model_on_dense_model_changes_nothing(tiny_llama, token_windows):
    targets = find_targets(tiny_llama)
    teacher = {t.name: linear_weight(tiny_llama.get_submodule(t.name)).detach().clone() for t in targets}
    res = correct_model(tiny_llama, teacher, targets, token_windows, 4, bind("none"), "cpu")
    report, before = res.targets, res.loss_before
    assert report == {}
    assert before == pytest.approx(calibration_loss(tiny_llama, token_windows, 4), rel=1e-6)
    for t in targets:
        assert torch.equal(linear_weight(tiny_llama.get_submodule(t.name)), teacher[t.name])


def test_overshooting_step_is_backtracked_and_never_raises_the_loss(truncated):
    """A teacher far from the compressed weights makes the projected step long enough to overshoot: the
    safeguard halves it until the loss drops, or keeps the previous factors (scale 0)."""
    model, targets, windows, stats = truncated["model"], truncated["targets"], truncated["windows"], truncated["stats"]
    g = torch.Generator().manual_seed(1)
    far = {n: w + 3.0 * torch.randn(w.shape, generator=g) for n, w in truncated["teacher"].items()}
    before_weights = {n: model.get_submodule(n).weight.detach().clone() for n, r in truncated["ranks"].items()
                      if r is not None}
    res = correct_model(model, far, targets, windows, 2,
                        bind("input_gram", stats, 1e-6), "cpu", backtrack=3)
    assert res.trials[0][1] > res.loss_before  # the full step overshoots
    assert res.loss_after <= res.loss_before
    assert res.loss_after == pytest.approx(calibration_loss(model, windows, 2), rel=1e-9)
    assert [s for s, _ in res.trials] == [1.0, 0.5, 0.25, 0.125][: len(res.trials)]
    if res.scale == 0.0:  # nothing helped: the previous factors are back (round-off of one re-truncation)
        for n, W in before_weights.items():
            torch.testing.assert_close(model.get_submodule(n).weight, W, rtol=0, atol=1e-5)
    else:
        assert res.scale < 1.0 and res.loss_after < res.loss_before


def test_step_is_judged_on_windows_not_used_for_its_gradient(truncated):
    """With ``judge`` windows the loss before, every trial and the loss after are measured on them, not on the
    gradient windows; the kept step never raises the judged loss."""
    model, targets, windows, stats = truncated["model"], truncated["targets"], truncated["windows"], truncated["stats"]
    grad_w, judge = windows[: len(windows) // 2], windows[len(windows) // 2 :]
    before, before_grad = calibration_loss(model, judge, 2), calibration_loss(model, grad_w, 2)
    assert abs(before - before_grad) > 1e-3  # the two halves differ, so the check below can tell them apart
    res = correct_model(model, truncated["teacher"], targets, grad_w, 2,
                        bind("input_gram", stats, 1e-6), "cpu", judge=judge)
    assert res.loss_before == pytest.approx(before, rel=1e-12)
    assert res.loss_after == pytest.approx(calibration_loss(model, judge, 2), rel=1e-9)
    assert res.loss_after <= res.loss_before
    assert all(loss > before for _, loss in res.trials[:-1])  # every rejected trial was worse on the judge windows


def _saved_compressed(tiny_llama, token_windows, root, uphill: bool = False):
    """Base (teacher) shards, a uniform-0.5 compressed model of it in the input_gram space, and its stats.

    ``uphill``: the teacher's factored targets are ``W_k + ½‖W_k‖ g/‖g‖`` (``g`` the gradient at the compressed
    weights), so the projected step climbs the loss at every scale and the previous factors are kept."""
    from lowrank.checkpoint import save_compressed
    from lowrank.io import write_json

    base = copy.deepcopy(tiny_llama)
    model = copy.deepcopy(tiny_llama)
    targets = find_targets(model)
    stats = {"input_gram": collect_input_grams(model, token_windows, 4, torch.device("cpu"), targets)}
    ranks = dict(allocate("uniform", {t.name: t.shape for t in targets}, 0.5).ranks)
    ranks[targets[2].name] = None
    truncate_model(model, targets, ranks, "input_gram", stats, damping=1e-6)
    if uphill:
        dense = copy.deepcopy(model)
        factored = [t for t in targets if ranks[t.name] is not None]
        for t in factored:
            dense.set_submodule(t.name, dense.get_submodule(t.name).to_dense())
        G = calibration_gradients(dense, token_windows, 2, "cpu", factored).G
        with torch.no_grad():
            for t in factored:
                W_k, g = dense.get_submodule(t.name).weight, G[t.name].float()
                base.get_submodule(t.name).weight.copy_(W_k + 0.5 * W_k.norm() * g / g.norm())
    base.save_pretrained(str(root / "base"), safe_serialization=True, max_shard_size="60KB")
    write_json(root / "pretrained.json", {"path": "base", "path_relative": True, "has_tokenizer": False})
    save_compressed(root / "c", model, root / "pretrained.json", {})
    return stats


@pytest.mark.parametrize("case", ["own windows", "judged", "uphill teacher"])
def test_streamed_correction_equals_the_whole_model_one(tiny_llama, token_windows, tmp_path, case):
    """A lazy compressed model corrected one block at a time (teacher lazy too, W_k and steps on disk): the
    same report, losses, trials and factors as :func:`correct_model` on the model in memory."""
    from lowrank.blocks import resident
    from lowrank.checkpoint import load_compressed
    from lowrank.correction import correct_streamed
    from lowrank.model import find_blocks
    from lowrank.sharded import load_lazy_model

    stats = _saved_compressed(tiny_llama, token_windows, tmp_path, uphill=case == "uphill teacher")
    half = len(token_windows) // 2
    grad_w, judge = (token_windows[:half], token_windows[half:]) if case == "judged" else (token_windows, None)
    space = bind("input_gram", stats, 1e-6)
    whole = load_compressed(tmp_path / "c")
    teacher_model = load_lazy_model(tmp_path / "base")
    targets = find_targets(whole)
    teacher = {}  # the teacher's target weights in memory, as correct.py reads them for correct_model
    for i in range(len(find_blocks(teacher_model)[1])):
        with resident(teacher_model, i, "cpu"):
            teacher.update({t.name: linear_weight(teacher_model.get_submodule(t.name)).detach().clone()
                            for t in targets if t.block == i})
    ref = correct_model(whole, teacher, targets, grad_w, 2, space, "cpu", backtrack=2, judge=judge)
    lazy = load_compressed(tmp_path / "c", lazy=True)
    got = correct_streamed(lazy, teacher_model, find_targets(lazy), grad_w, 2, space, "cpu", tmp_path / "work",
                           backtrack=2, judge=judge)
    assert got.scale == ref.scale and [s for s, _ in got.trials] == [s for s, _ in ref.trials]
    if case == "uphill teacher":  # every trial raises the loss: the previous factors are the result
        assert ref.scale == 0.0 and all(loss > ref.loss_before for _, loss in ref.trials)
    for a, b in zip(got.trials, ref.trials):
        assert a[1] == pytest.approx(b[1], rel=1e-6)
    assert got.loss_before == pytest.approx(ref.loss_before, rel=1e-6)
    assert got.loss_after == pytest.approx(ref.loss_after, rel=1e-6)
    assert set(got.targets) == set(ref.targets)
    for n, r in ref.targets.items():
        assert got.targets[n]["alpha"] == pytest.approx(r["alpha"], rel=1e-9)
    tensors, ranks = factor_state(lazy)  # the result: every factor in CPU memory
    ref_tensors, ref_ranks = factor_state(whole)
    assert ranks == ref_ranks and set(tensors) == set(ref_tensors)
    for k, v in ref_tensors.items():
        torch.testing.assert_close(tensors[k], v, rtol=0, atol=1e-6)

"""Per-component scores of every target's (whitened) singular components; ratio-independent.

Every target is decomposed in its method's space (:mod:`lowrank.spaces`): ``W S = U Σ Vᵀ``. Scorers:

* ``sigma``: the singular values ``σ_i`` themselves (plain SVD with ``S = I``; SVD-LLM with the input whitening,
  where ``σ_i²`` is exactly the calibration output energy of component ``i``). Used for the spectra and by the
  uniform allocator, which does not need them to choose ranks.
* ``first_order`` (ZS-SVD): the predicted change of the calibration loss when component ``i`` is removed,
  ``ΔL_i = −σ_i · u_iᵀ H v_i`` with ``H = ∂L/∂(W S) = G S^{-T}`` the gradient in whitened coordinates
  (``G = ∂L/∂W`` from one backward pass per calibration batch; ``S^{-T}`` applied by a triangular solve).
  ``ΔL_i > 0``: removing ``i`` is predicted to raise the loss.
* ``second_order``: the same change to second order along the removed direction,
  ``ΔL_i ≈ −σ_i ḡ_i + ½ σ_i² F_i`` with ``ḡ_i = u_iᵀ H v_i`` (first_order's) and ``F_i`` the per-token empirical
  Fisher along component ``i``, ``F_i = (1/N) Σ_t (u_iᵀ δ_t)² (v_iᵀ S⁻¹ x_t)²`` (:class:`ComponentProbe`):
  ``x_t`` the target's input at token ``t``, ``δ_t = ∂(Σ_s CE_s)/∂y_t`` the gradient of the SUMMED loss at its
  output (``N`` times that of the mean loss). Removing component ``i`` is ``ΔW_i = −σ_i u_i v_iᵀ S⁻¹``; with
  the per-token gradients ``g_t = δ_t x_tᵀ`` (``G = (1/N) Σ_t g_t``) the empirical Fisher ``(1/N) Σ_t g_t g_tᵀ``
  stands in for the Hessian, ``½ ⟨ΔW_i, F ΔW_i⟩ = ½ σ_i² F_i``. In a causal model ``δ_t`` also carries the
  losses of later positions that attend to ``t``, so ``g_t`` is not one token's own gradient: the usual K-FAC
  approximation (the cross terms between positions are dropped). First order misses the curvature term, which
  grows with ``σ_i²`` and decides the large components; the curvature is positive, so ``second_order`` never
  predicts a gain where first order predicts a loss.
* ``window_curvature``: the curvature term alone, with the empirical Fisher taken over calibration WINDOWS
  instead of tokens, ``ΔL_i ≈ ½ σ_i² · T · (1/W) Σ_w ḡ_{w,i}²`` (``ḡ_{w,i}`` the mean gradient along component
  ``i`` of window ``w``'s token-mean loss, ``T`` its predictions, ``W`` windows). ``T ḡ_w`` is the gradient of the
  window's summed loss, so this is the empirical Fisher with the window as the sample, scaled to the token-mean
  loss: unlike the per-token ``F_i`` it keeps the covariances between the positions of a window (the cross terms
  the K-FAC per-token form drops). Why it is the default: on SmolLM2 the mean gradient along the tail components
  is still mostly sampling noise at 64 windows (``|σ ḡ|`` about ``σ · sd_w(ḡ_w) / √W``, a zero mean's size), so the
  first-order term ranks by noise, however many windows; the reference's one-window scores rank, in effect, by
  ``|σ ḡ_1|``, a one-sample estimate of exactly this curvature (a likely reason why one window beat sixteen).
  The windowed Fisher converges as windows are added (study: ``bench/results/zs_svd_gradient_windows_cpu.md``). It is
  non-negative, so the zero-sum allocator removes the smallest predicted increases first.

* ``tail_curvature``: the window Fisher of removing each matrix's whole σ tail AT ONCE, robust over windows.
  Truncation removes a tail ``i ≥ k``, not single components; for window ``w`` its first-order loss change is
  ``e_w(k) = −Σ_{i≥k} σ_i ḡ_{w,i}``, and the window Fisher of the tail is ``C(k) = ½ T M_w[e_w(k)²]``. Unlike the
  sum of ``window_curvature`` over the tail it keeps the cross terms ``σ_i σ_j ḡ_{w,i} ḡ_{w,j}`` between the
  components of one matrix (on SmolLM2 they largely cancel in the value projections, which window_curvature then
  keeps nearly whole). Component ``k``'s score is its marginal ``C(k) − C(k + 1)`` (``C(r) = 0``), so a tail's
  scores add up to ``C``. ``M_w`` is a trimmed mean over windows (each ``k``'s largest ``TAIL_TRIM`` = 10 % of the
  windows dropped): a few windows with ~5x the median gradient otherwise decide the ranks alone. Needs each
  window's ``ḡ_w`` (:class:`ComponentProbe` with ``per_window``, which :func:`lowrank.streaming.fused_scores`
  sets for it). Chosen on validation windows in ``bench/results/zs_svd_gradient_windows_cpu.md``. The marginals
  are NOT all non-negative: the cross terms make ``C`` non-monotone in ``k`` (about a third of SmolLM2's marginals
  are negative), so ``zero_sum`` takes the negative candidates first whenever its running sum is positive;
  ``min_abs`` (smallest ``|ΔL|`` first) was tried against it and was neutral outside validation
  (``bench/results/zs_svd_allocator_cpu.md``).

Progressive allocation (:func:`progressive_allocation`, recipe key ``allocation_stages``): scores of the DENSE
model predict single removals; over a deep cut (kept 0.4) they do not add up. Allocating to an intermediate
fraction, truncating, and re-scoring the components still kept from the gradients of that truncated model (along
the dense model's components) lowered validation perplexity at kept 0.4 by 15 % on SmolLM2
(``bench/results/zs_svd_progressive_cpu.md``).

In a two-sided space (IO-SVD, ``B = Tᵀ W S``) every scorer runs on ``W' = Tᵀ W`` with gradient
``G' = ∂L/∂W' = T^{-1} G``, so ``first_order`` gives ``g_i = u_iᵀ T^{-1} G S^{-T} v_i`` and ``ΔL_i = −σ_i g_i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .accounting import TargetShape
from .allocation import Allocation, allocate
from .decompose import singular_values, thin_svd
from .gradients import TargetGradients, calibration_gradients, streamed_gradients
from .model import Target, linear_weight
from .runtime import progress
from .spaces import bind
from .whitening import output_gradient, unwhiten_left, whiten, whiten_left

__all__ = ["Scorer", "SCORERS", "whitened_gradient", "first_order_delta", "second_order_delta",
           "window_curvature_delta", "tail_curvature_delta", "trimmed_window_mean", "TAIL_TRIM", "score_targets",
           "ComponentStats", "ComponentProbe", "component_directions", "stage_fractions", "prefix_scores",
           "progressive_allocation"]


def whitened_gradient(G: torch.Tensor, S: torch.Tensor | None) -> torch.Tensor:
    """``H = G S^{-T}`` (the gradient w.r.t. ``W S``), by solving ``H Sᵀ = G``; ``G`` itself when ``S = I``."""
    if S is None:
        return G.to(torch.float64)
    return torch.linalg.solve_triangular(S.T, G.to(S.dtype), upper=True, left=False)


def first_order_delta(W: torch.Tensor, S: torch.Tensor | None, G: torch.Tensor, method: str = "svd"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σ, ΔL)`` with ``ΔL_i = −σ_i · (Uᵀ H V)_ii`` for ``W S = U Σ Vᵀ``, ``H = G S^{-T}``.

    ``method``: how ``W S`` is decomposed (:func:`lowrank.decompose.thin_svd`: ``svd`` or ``eigh``)."""
    A = W.to(torch.float64) if S is None else whiten(W.to(torch.float64), S)
    U, sigma, Vh = thin_svd(A, method)  # U [m, r], Vh [r, n]
    H = whitened_gradient(G, S)  # [m, n]
    g_sigma = ((U.T @ H) * Vh).sum(dim=1)  # diag(Uᵀ H V), [r]
    return sigma, -sigma * g_sigma


def second_order_delta(sigma: torch.Tensor, g: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """``ΔL_i ≈ −σ_i ḡ_i + ½ σ_i² F_i`` (removing component ``i`` to second order, empirical-Fisher curvature)."""
    return -sigma * g + 0.5 * sigma.square() * fisher


def window_curvature_delta(sigma: torch.Tensor, g2: torch.Tensor, window_tokens: int) -> torch.Tensor:
    """``ΔL_i ≈ ½ σ_i² · T · g2_i`` with ``g2_i = (1/W) Σ_w ḡ_{w,i}²`` (the window-level empirical Fisher)."""
    return 0.5 * sigma.square() * window_tokens * g2


TAIL_TRIM = 0.1  # tail_curvature: fraction of windows dropped from the top of each window mean


def trimmed_window_mean(x: torch.Tensor, trim: float) -> torch.Tensor:
    """Mean over windows (dim 0 of ``x`` [W, r]) without each column's ``round(trim · W)`` largest values."""
    keep = x.shape[0] - int(round(trim * x.shape[0]))
    return x.sort(dim=0).values[: max(keep, 1)].mean(dim=0)


def tail_curvature_delta(sigma: torch.Tensor, g_rows: torch.Tensor, window_tokens: int, trim: float = TAIL_TRIM
                         ) -> torch.Tensor:
    """``ΔL_k = C(k) − C(k + 1)`` with ``C(k) = ½ T M_w[(Σ_{i≥k} σ_i ḡ_{w,i})²]`` (``C(r) = 0``): the window Fisher
    of removing the tail ``i ≥ k`` at once, ``M_w`` the mean over the windows (rows of ``g_rows`` [W, r]) without
    each column's top ``trim`` fraction."""
    tail = (sigma * g_rows).flip(-1).cumsum(-1).flip(-1)  # [W, r]: Σ_{i≥k} σ_i ḡ_{w,i}
    C = 0.5 * window_tokens * trimmed_window_mean(tail.square(), trim)
    return C - torch.cat([C[1:], C.new_zeros(1)])


def component_directions(W: torch.Tensor, S: torch.Tensor | None, T: torch.Tensor | None, method: str = "svd"
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(σ, P_out, P_in)`` for ``Tᵀ W S = U Σ Vᵀ`` (``T = I`` in one-sided spaces, ``S = I`` unwhitened).

    ``P_out = T^{-T} U`` (m×r) and ``P_in = S^{-T} V`` (n×r), by triangular solves, so that for a token with input
    ``x`` and output gradient ``δ`` the gradient along component ``i`` is ``u_iᵀ T^{-1} δ xᵀ S^{-T} v_i =
    (P_outᵀ δ)_i (P_inᵀ x)_i``. Float64."""
    W = W.to(torch.float64)
    Wp = W if T is None else whiten_left(W, T.to(torch.float64))
    A = Wp if S is None else whiten(Wp, S.to(torch.float64))
    U, sigma, Vh = thin_svd(A, method)  # U [m, r], Vh [r, n]
    P_out = U if T is None else unwhiten_left(U, T.to(torch.float64))
    P_in = Vh.T if S is None else torch.linalg.solve_triangular(S.to(torch.float64).T, Vh.T, upper=True)
    return sigma, P_out, P_in


@dataclass
class ComponentStats:
    """Per-component calibration statistics of one target in its space: ``σ`` [r], the mean gradient along each
    component ``ḡ``, the per-token empirical Fisher ``F`` and the mean squared WINDOW-mean gradient ``g2``
    (``(1/W) Σ_w ḡ_w²``) ([r], or [windows, r] per window: each window's own token mean, so any subset's value
    is the mean of its rows); ``window_tokens`` the predictions per window."""

    sigma: torch.Tensor
    g: torch.Tensor
    fisher: torch.Tensor
    g2: torch.Tensor | None = None
    window_tokens: int = 0

    def mean(self) -> "ComponentStats":
        """The statistics over all windows (the mean of per-window rows; itself when already averaged)."""
        if self.g.ndim == 1:
            return self
        g2 = None if self.g2 is None else self.g2.mean(dim=0)
        return ComponentStats(self.sigma, self.g.mean(dim=0), self.fisher.mean(dim=0), g2, self.window_tokens)


@dataclass
class ComponentProbe:
    """Accumulates ``ḡ_i = (1/N) Σ_t a_ti b_ti`` and ``F_i = (1/N) Σ_t (a_ti b_ti)²`` of every target, with
    ``a_t = P_outᵀ δ_t`` and ``b_t = P_inᵀ x_t`` (:func:`component_directions`), during a backward (the ``probe``
    of :func:`lowrank.gradients.streamed_gradients`, block by block, or of the whole-model
    :func:`lowrank.gradients.calibration_gradients`, every block open at once). The hooks give ``d_t = ∂L_b/∂y_t`` of the batch
    token-mean loss; the per-token gradient is ``δ_t = n_b d_t``. Each window's sums are divided by its
    ``T − 1`` predictions, and windows are averaged, which is the token mean over all windows (equal lengths).
    Directions are computed in float64; the projections ``a_t``, ``b_t`` run in the model's precision (at least
    float32; float64 for a float64 model), their products and sums in float64: on SmolLM2 this halves the probe's
    cost and leaves the zero-sum allocation identical at kept 0.8 / 0.6 / 0.4 (bench/results/default_run_cpu.md).
    ``per_window``: keep every window's row instead of the mean. ``directions``: fixed ``{target: (σ, P_out,
    P_in)}`` (:func:`component_directions` of other weights, e.g. the dense model's) used instead of decomposing
    the weights the model holds now: on a partially truncated model the probe then measures the gradient of the
    COMPRESSED model's loss along the ORIGINAL components (:func:`progressive_allocation`)."""

    model: nn.Module
    whitening: str
    stats: dict[str, Any]
    damping: float = 1e-6
    device: torch.device | str = "cpu"
    decomposition: str = "svd"
    per_window: bool = False
    directions: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    result: dict[str, ComponentStats] = field(default_factory=dict)
    _dirs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    _blocks: dict[int, list[str]] = field(default_factory=dict)  # open blocks: their targets
    window_tokens: int = 0

    @classmethod
    def for_scorer(cls, scorer: str, model: nn.Module, whitening: str, stats: dict[str, Any], damping: float,
                   device: torch.device | str, decomposition: str = "svd") -> "ComponentProbe | None":
        """The probe ``scorer`` reads (every window's rows for a ``window_rows`` scorer); None for a scorer that
        scores from ``G`` or from σ alone (or an unknown name, which :func:`score_targets` reports)."""
        sc = SCORERS.get(scorer)
        if sc is None or sc.from_components is None:
            return None
        return cls(model, whitening, stats, damping, device, decomposition, per_window=sc.window_rows)

    def begin_block(self, i: int, targets: list[Target]) -> None:
        self._blocks[i] = [t.name for t in targets]
        space = None
        for t in targets:
            W = linear_weight(self.model.get_submodule(t.name)).detach()
            pd = torch.promote_types(W.dtype, torch.float32)  # the projections' precision (see the class doc)
            if self.directions is not None:
                sigma, P_out, P_in = self.directions[t.name]
            else:
                space = space or bind(self.whitening, self.stats, self.damping, self.decomposition, self.device)
                S, T = space.factors(t.name)
                sigma, P_out, P_in = component_directions(W.to(self.device), S, T, self.decomposition)
            self._dirs[t.name] = (sigma, P_out.to(self.device, pd), P_in.to(self.device, pd))
            self._rows[t.name] = []

    def add(self, name: str, x: torch.Tensor, d: torch.Tensor, n_b: int) -> None:
        _, P_out, P_in = self._dirs[name]
        a = (d.to(P_out.dtype) * n_b) @ P_out.to(d.device)  # [b, T, r]: u_iᵀ T^{-1} δ_t
        b = x.to(P_in.dtype) @ P_in.to(x.device)  # [b, T, r]: v_iᵀ S^{-1} x_t
        p = a.to(torch.float64) * b.to(torch.float64)
        n_w = x.shape[1] - 1  # predictions per window
        self._rows[name].append((p.sum(dim=1) / n_w, p.square().sum(dim=1) / n_w))  # [b, r] each
        self.window_tokens = n_w

    def end_block(self, i: int) -> None:
        for name in self._blocks.pop(i):
            rows = self._rows.pop(name)
            g = torch.cat([r[0] for r in rows]).cpu()
            F = torch.cat([r[1] for r in rows]).cpu()
            stats = ComponentStats(self._dirs.pop(name)[0].cpu(), g, F, g.square(), self.window_tokens)
            self.result[name] = stats if self.per_window else stats.mean()


@dataclass(frozen=True)
class Scorer:
    """``fn(W, S, G) -> (σ, score)``; ``needs_gradients`` says whether ``G`` must be computed. A scorer with
    ``from_components`` scores from per-component statistics instead (:class:`ComponentStats` averaged over the
    windows, gathered by a :class:`ComponentProbe` during the streamed backward): ``from_components(stats) ->
    score``; with ``window_rows`` it gets the per-window rows ([windows, r]) instead of their means."""

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None  # fn(W, S, G, method="svd"|"eigh")
    needs_gradients: bool
    description: str
    from_components: Callable[[ComponentStats], torch.Tensor] | None = None
    window_rows: bool = False  # from_components reads every window's row, not the means


def _sigma(W: torch.Tensor, S: torch.Tensor | None, G: torch.Tensor | None, method: str = "svd"
           ) -> tuple[torch.Tensor, torch.Tensor]:
    A = W.to(torch.float64) if S is None else whiten(W.to(torch.float64), S)
    sigma = singular_values(A, method)
    return sigma, sigma.clone()


def _first_order(W: torch.Tensor, S: torch.Tensor | None, G: torch.Tensor | None, method: str = "svd"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    if G is None:
        raise ValueError("scorer first_order needs calibration gradients")
    return first_order_delta(W, S, G, method)


SCORERS: dict[str, Scorer] = {
    "sigma": Scorer(_sigma, False, "singular values of W S"),
    "first_order": Scorer(_first_order, True, "first-order loss change of removing each component (ZS-SVD)"),
    "second_order": Scorer(None, True, "first-order change plus the per-token empirical-Fisher curvature along "
                           "each component",
                           from_components=lambda c: second_order_delta(c.sigma, c.g, c.fisher)),
    "window_curvature": Scorer(None, True, "curvature of removing each component, from the empirical Fisher of "
                               "window-mean gradients (default zs-svd scorer)",
                               from_components=lambda c: window_curvature_delta(c.sigma, c.g2, c.window_tokens)),
    "tail_curvature": Scorer(None, True, "curvature of removing each sigma tail at once, from the windows' mean "
                             "gradients (trimmed mean over windows; default zs-svd scorer)",
                             from_components=lambda c: tail_curvature_delta(c.sigma, c.g, c.window_tokens),
                             window_rows=True),
}


@torch.no_grad()
def score_targets(model: nn.Module, targets: list[Target], scorer: str, whitening: str, stats: dict[str, Any],
                  damping: float = 1e-6, device: torch.device | str = "cpu",
                  gradients: TargetGradients | None = None, decomposition: str = "svd"
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """``{target: {"sigma": σ, "score": s}}`` (float64, σ descending) for every target.

    ``decomposition``: ``svd`` or ``eigh`` (:mod:`lowrank.decompose`)."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {sorted(SCORERS)}")
    sc = SCORERS[scorer]
    if sc.needs_gradients and gradients is None:
        raise ValueError(f"scorer {scorer!r} needs calibration gradients")
    out: dict[str, dict[str, torch.Tensor]] = {}
    if sc.from_components is not None:
        comps = gradients.components if gradients is not None else None
        missing = [t.name for t in targets if comps is None or t.name not in comps]
        if missing:
            raise ValueError(f"scorer {scorer!r} needs per-component statistics (a ComponentProbe in the streamed "
                             f"gradients, as fused_scores runs it); missing for {missing[:3]}")
        for t in targets:
            c = comps[t.name] if sc.window_rows else comps[t.name].mean()
            if sc.window_rows and c.g.ndim != 2:
                raise ValueError(f"scorer {scorer!r} needs every window's statistics (ComponentProbe with "
                                 f"per_window=True); {t.name} has their means only")
            out[t.name] = {"sigma": c.sigma, "score": sc.from_components(c)}
        return out
    space = bind(whitening, stats, damping, decomposition, device)
    for t in progress(targets, desc=f"score {scorer}/{whitening}"):
        W = linear_weight(model.get_submodule(t.name)).detach().to(device)
        S, T = space.factors(t.name)
        G = gradients.G[t.name].to(device) if gradients is not None else None
        if T is not None:  # two-sided space: output coordinates W' = Tᵀ W, G' = T^{-1} G
            W, G = whiten_left(W.to(torch.float64), T), None if G is None else output_gradient(G, T)
        sigma, score = sc.fn(W, S, G, method=decomposition)
        out[t.name] = {"sigma": sigma.cpu(), "score": score.cpu()}
    return out


def stage_fractions(kept_fraction: float, stages: list[float] | tuple[float, ...]) -> list[float]:
    """The intermediate kept fractions of a progressive allocation to ``kept_fraction``: the ``stages`` strictly
    between it and 1, largest first (a stage at or below the target does not apply: one-shot)."""
    return sorted({float(x) for x in stages if kept_fraction < float(x) < 1.0}, reverse=True)


def prefix_scores(scorer: str, stats: ComponentStats, k: int) -> torch.Tensor:
    """``scorer``'s scores of the first ``k`` components of a matrix from its statistics ``stats`` (all ``r``),
    as if the components ``i ≥ k`` were not there (they are already removed), followed by ``r − k`` zeros."""
    sc = SCORERS[scorer]
    r = stats.sigma.numel()
    g2 = None if stats.g2 is None else stats.g2[..., :k]
    part = ComponentStats(stats.sigma[:k], stats.g[..., :k], stats.fisher[..., :k], g2, stats.window_tokens)
    s = sc.from_components(part if sc.window_rows else part.mean())
    return torch.cat([s, s.new_zeros(r - k)])


@torch.no_grad()
def progressive_allocation(model: nn.Module, targets: list[Target], scores: dict[str, torch.Tensor],
                           kept_fraction: float, stages: list[float] | tuple[float, ...], allocator: str,
                           scorer: str, whitening: str, stats: dict[str, Any], windows: torch.Tensor,
                           batch_size: int, damping: float = 1e-6, device: torch.device | str = "cpu",
                           decomposition: str = "svd", min_rank_fraction: float = 0.0, streamed: bool = True
                           ) -> tuple[Allocation, list[dict[str, Any]]]:
    """Allocation by stages, re-scoring after each partial truncation (for deep cuts, where one set of scores of
    the DENSE model mispredicts: the loss changes of removing many components do not add up).

    With ``ρ_1 > … > ρ_s`` the :func:`stage_fractions` of ``stages`` and ``ρ_{s+1} = kept_fraction``: allocate to
    ``ρ_1`` with ``scores`` (the dense model's), then for each next stage: put ``W_k = P_out[:, :k] diag(σ_{:k})
    P_in[:, :k]ᵀ`` of the current ranks into ``model`` (the same truncation as :mod:`lowrank.truncation`, held
    dense), run one streamed backward over ``windows`` with a :class:`ComponentProbe` on the DENSE model's
    components (fixed ``directions``: ``ḡ``, ``F`` are now the compressed model's gradients along the original
    components), score the components still kept with ``scorer`` as if the removed ones were gone
    (:func:`prefix_scores`; the removed ones get 0, so every greedy allocator removes them first and their old
    scores are never reused), and allocate again to the next fraction. One extra gradient pass per stage. With no
    stage between ``kept_fraction`` and 1 this is ``allocate`` on ``scores``. ``model`` gets its dense weights
    back. Needs a scorer fed by the per-component statistics (``from_components``). ``streamed``: each re-scoring
    backward holds one block at a time (:func:`streamed_gradients`), else it runs the whole model on ``device``
    (:func:`calibration_gradients`, one forward and one backward per batch: the faster pass where the model fits,
    as for the dense scores). Returns the allocation and one record per stage (its kept fraction and the
    predicted loss change of the allocation made there)."""
    sc = SCORERS.get(scorer)
    if sc is None or sc.from_components is None:
        raise ValueError(f"progressive allocation re-scores from per-component statistics; scorer {scorer!r} has "
                         f"none (use one of {sorted(n for n, v in SCORERS.items() if v.from_components)})")
    shapes: dict[str, TargetShape] = {t.name: t.shape for t in targets}
    fracs = stage_fractions(kept_fraction, stages)
    alloc = allocate(allocator, shapes, fracs[0] if fracs else kept_fraction, scores, min_rank_fraction)
    trace = [{"kept_fraction": alloc.budget.kept_fraction, "rescored": False}]
    if not fracs:
        return alloc, trace
    space = bind(whitening, stats, damping, decomposition, device)
    dense: dict[str, torch.Tensor] = {}
    dirs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for t in targets:
        W = linear_weight(model.get_submodule(t.name)).detach()
        pd = torch.promote_types(W.dtype, torch.float32)
        S, T = space.factors(t.name)
        sigma, P_out, P_in = component_directions(W.to(device), S, T, decomposition)
        dense[t.name] = W.clone()
        dirs[t.name] = (sigma.cpu(), P_out.to("cpu", pd), P_in.to("cpu", pd))
    try:
        for nxt in fracs[1:] + [kept_fraction]:
            for t in targets:  # the current truncation, held as dense weights
                k = alloc.ranks[t.name]
                sigma, P_out, P_in = dirs[t.name]
                w = dense[t.name] if k is None else (P_out[:, :k] * sigma[:k].to(P_out.dtype)) @ P_in[:, :k].T
                linear_weight(model.get_submodule(t.name)).copy_(w)
            probe = ComponentProbe(model, whitening, stats, damping, device, decomposition,
                                   per_window=sc.window_rows, directions=dirs)
            calibration_gradients(model, windows, batch_size, device, targets, streamed=streamed, need_G=False,
                                  probe=probe)
            new = {t.name: prefix_scores(scorer, probe.result[t.name], t.shape.full_rank
                                         if alloc.ranks[t.name] is None else alloc.ranks[t.name]) for t in targets}
            alloc = allocate(allocator, shapes, nxt, new, min_rank_fraction)
            trace.append({"kept_fraction": nxt, "rescored": True,
                          "predicted_delta_loss": alloc.predicted_delta_loss(new)})
    finally:
        for t in targets:
            linear_weight(model.get_submodule(t.name)).copy_(dense[t.name])
    return alloc, trace

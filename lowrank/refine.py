"""Block-local refinement of a compressed model against the dense one, with the errors of earlier blocks seen.

Every truncation method chooses a target's factors from statistics of the DENSE model: block ``b`` is fitted as
if blocks ``< b`` were intact. Refinement streams both models one decoder block at a time, in model order:

* the inputs ``H_c`` of block ``b`` are the outputs of the already-refined compressed blocks ``< b``;
* the targets are the dense block's outputs ``Y_d = block_d(H_d)`` on the dense model's own inputs ``H_d``.

``closed_form`` (per factored linear ``y = A B x``, ``A ∈ R^{m×r}``, ``B ∈ R^{r×n}``, dense weight ``W``).
With ``X_d`` the target's inputs in the dense block (columns are tokens) and ``X_c`` its inputs in the compressed
block, after the targets upstream of it in the same block are refitted (q/k/v, then o on the refitted
attention, then gate/up, then down: the block's data-flow order, found by a hooked forward, never by names),
``A`` is refitted with ``B`` fixed by least squares of the compressed inputs against the dense outputs:

    min_A ‖W X_d − A B X_c‖²_F   ⇒   A = W C_dc Bᵀ (B C_cc Bᵀ + δ I)⁻¹,

    C_dc = X_d X_cᵀ,  C_cc = X_c X_cᵀ  (n×n, summed in float64 over every batch),

with ``δ = damping · tr(B C_cc Bᵀ)/r`` and the system solved by a damped Cholesky (no explicit inverse).
Optionally ``B`` is then refitted with that ``A`` fixed (``refit_b``):

    min_B ‖W X_d − A B X_c‖²_F   ⇒   B = (AᵀA + δ_A I)⁻¹ Aᵀ W C_dc (C_cc + δ_C I)⁻¹.

With identical inputs (``X_c = X_d``) and ``A B = W`` the first solve returns ``A`` unchanged (up to ``δ``); so
does it for SVD-LLM's factors when ``C_cc = C_dc`` is the Gram they were whitened with.

Output metrics. The refit of ``A`` (with or without the anchor below) is the same under any left weighting ``T``
of the output error, ``‖Tᵀ(W X_d − A B X_c)‖²`` (``T`` invertible): ``TᵀA`` ranges over every m×r matrix, so the
weighted optimum is ``Tᵀ`` times the plain one; two-sided spaces (IO-SVD's top-K KL metric ``T Tᵀ``) therefore
see their metric only through ``B``. ``refine_model(..., output_factor=f)`` gives the ``B`` refit that metric,
``f(name) = T`` (m×m, ``None`` = plain), and ``b_anchor`` ``μ`` a ridge toward the current ``B₀``, measured as the
weighted output change on an isotropic input of the same energy (``λ_B = μ · tr(C_cc)/n``):

    min_B ‖Tᵀ(W X_t − A B X_c)‖² + λ_B ‖TᵀA (B − B₀)‖²
        ⇒   B = ((AᵀM A)⁻¹ AᵀM W C_tc + λ_B B₀)(C_cc + λ_B I)⁻¹,   M = T Tᵀ.

``subspace`` refits the whole rank-r map instead (reduced-rank regression): ``A`` then ``B`` only improves the
truncation's subspace locally, while

    min_{rank M ≤ r} ‖Tᵀ(W X_t − M X_c)‖² + λ‖Tᵀ(M − M₀)‖²_F,   M₀ = A₀ B₀,   λ = anchor · tr(C_cc)/n

has the closed form of a whitened truncation: with ``L Lᵀ = C_cc + λ I`` (Cholesky) and the ridge least-squares
map ``M_ls = (W C_tc + λ M₀)(C_cc + λ I)⁻¹``, the objective is ``‖Tᵀ(M − M_ls) L‖² + const``, so ``M`` is the
rank-r truncation of ``M_ls`` whitened by ``L`` on the input side (and ``T`` on the output side):
``Tᵀ M_ls L = U Σ Vᵀ``, ``A = T⁻ᵀ U_r Σ_r^{1/2}``, ``B = Σ_r^{1/2} V_rᵀ L⁻¹`` (:func:`lowrank.truncation.truncate`
with ``S = L``). With ``X_t = X_c`` and no ridge this is SVD-LLM's truncation on the compressed model's inputs.

``anchor`` (``λ = anchor · tr(B C_cc Bᵀ)/r``) adds a ridge toward the CURRENT ``A₀`` instead of toward 0:

    min_A ‖W X_d − A B X_c‖² + λ‖A − A₀‖²   ⇒   A = (W C_dc Bᵀ + λ A₀)(B C_cc Bᵀ + λ I)⁻¹.

The refit sees only the first ``windows`` calibration windows while ``A₀`` was fitted on all of them: without it
the refit trades a small bias correction for the variance of a small sample and, on SmolLM2, raises the
perplexity of text it did not see (bench/results/refine_validation_study.md); the ridge keeps the directions
the sample barely excites (eigenvalues of ``B C_cc Bᵀ`` well below its mean) at ``A₀`` and refits the others.
``target_mix`` ``α`` replaces the target ``W X_d`` by ``W (α X_d + (1 − α) X_c)`` (``C_dc`` by
``α C_dc + (1 − α) C_cc``); ``sequential: false`` takes every group's ``X_c`` from the block before any of its
groups is refitted.
A bias stays on ``A``'s side unchanged (the dense bias), so the fit of ``W x`` is the fit of the layer.

``adam``: ``steps`` Adam steps (learning rate ``lr``) on the block-output MSE ``‖block_c(H_c) − Y_d‖²`` with
only the block's factors trainable, one batch of ``batch_size`` windows per step (cyclic order), starting from
the truncation's factors. ``polish_steps`` (``closed_form`` only) chains the two: after the closed-form refit of a
block, that many such Adam steps (``lr``) start from the refitted factors; the polish is kept only if it lowers
the block's output error below the closed form's (each stage guarded on its own).

Guard: the relative block-output error ``e = Σ_b ‖block_c(H_c,b) − Y_d,b‖² / Σ_b ‖Y_d,b‖²`` is measured before
and after; a block whose error would rise keeps its previous factors. Dense (unfactored) targets never change,
nor do ranks (so neither does the parameter budget).

Memory: one block of each model on the device, the two boundary streams ``H_c``, ``H_d`` and, for the current
block, the dense inputs of each target group (``N · Σ_groups n_g`` numbers, offloaded with the boundaries).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .blocks import block_output as _block_output, capture_block_inputs, offload_block_inputs, resident
from .factorized import LowRankLinear
from .grams import gram_update
from .model import Target, find_blocks, find_targets, linear_weight
from .runtime import progress
from .truncation import truncate
from .whitening import whitening_factor

__all__ = ["REFINE_MODES", "RefineConfig", "RefineReport", "check_recipe", "refit_up", "refit_up_projected",
           "refit_down", "refit_map", "block_groups", "refine_model", "block_errors"]

log = logging.getLogger(__name__)

REFINE_MODES = ("closed_form", "adam")


@dataclass(frozen=True)
class RefineConfig:
    """Settings of one refinement (the recipe's ``refine`` section).

    ``windows``: how many calibration windows (the first ones) feed the statistics; ``batch_size``: windows per
    block forward; ``damping``: relative ridge ``δ`` of the closed-form solves; ``refit_b``: refit ``B`` after
    ``A``; ``subspace``: refit the whole rank-r map (reduced-rank regression, ridge ``anchor`` toward ``A₀B₀``)
    instead of ``A`` (then ``B``); ``b_anchor``: relative ridge of that ``B`` refit toward the current ``B``;
    ``anchor``: relative ridge toward the current ``A`` (shrinkage instead of toward 0); ``target_mix``:
    weight of the dense inputs in the target (1 = ``W X_d``, 0 = ``W X_c``); ``sequential``: each target group
    sees the inputs produced by the block's already-refitted earlier groups (else all groups' inputs are taken
    from the unrefitted block); ``steps``/``lr``: the ``adam`` mode; ``polish_steps``: Adam steps (``lr``) after
    the closed form (0 = none); ``guard``: keep a block's previous factors when its output error would rise.
    The defaults of ``anchor`` and ``target_mix`` were chosen on validation
    windows of SmolLM2's training plays (bench/results/refine_validation_study.md).
    """

    mode: str = "closed_form"
    windows: int = 32
    batch_size: int = 4
    damping: float = 1e-4
    anchor: float = 1.0
    target_mix: float = 0.5
    sequential: bool = True
    refit_b: bool = False
    subspace: bool = False
    b_anchor: float = 0.0
    steps: int = 20
    lr: float = 1e-4
    polish_steps: int = 0
    guard: bool = True

    def __post_init__(self) -> None:
        if self.mode not in REFINE_MODES:
            raise ValueError(f"refine.mode must be one of {REFINE_MODES}, got {self.mode!r}")
        if self.windows < 1 or self.batch_size < 1:
            raise ValueError(f"refine.windows and refine.batch_size must be >= 1, got {self.windows}, "
                             f"{self.batch_size}")
        if not (self.damping >= 0 and self.damping == self.damping):
            raise ValueError(f"refine.damping must be a number >= 0, got {self.damping}")
        for key in ("anchor", "b_anchor"):
            v = getattr(self, key)
            if not (v >= 0 and v == v):
                raise ValueError(f"refine.{key} must be a number >= 0, got {v}")
        if not (0.0 <= self.target_mix <= 1.0):
            raise ValueError(f"refine.target_mix must be in [0, 1], got {self.target_mix}")
        if self.steps < 0 or self.polish_steps < 0 or not (self.lr > 0):
            raise ValueError(f"refine.steps and refine.polish_steps must be >= 0 and refine.lr > 0, got "
                             f"{self.steps}, {self.polish_steps}, {self.lr}")
        if self.subspace and (self.refit_b or self.mode != "closed_form"):
            raise ValueError("refine.subspace refits the whole rank-r map in closed form (A and B at once): it "
                             f"needs mode closed_form and refit_b false, got mode {self.mode!r}, refit_b "
                             f"{self.refit_b}")
        if self.polish_steps and self.mode != "closed_form":
            raise ValueError(f"refine.polish_steps polishes the closed form: it needs mode closed_form, got "
                             f"{self.mode!r} (mode adam takes `steps`)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RefineConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown refine settings {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def check_recipe(name: str, recipe: dict[str, Any]) -> RefineConfig | None:
    """The refine settings of recipe ``name`` (``None`` when it has no refine stage); ``ValueError`` naming the
    recipe and the fix for bad settings or a combination that cannot run (refine after quantize: the int8 rows
    would have to be refitted around, not implemented; refine with rehab: both follow the last stage)."""
    spec = dict(recipe.get("refine") or {})
    if spec.get("mode", "none") == "none":
        return None
    try:
        cfg = RefineConfig.from_dict(spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"method {name!r}: {e}") from None
    if (recipe.get("quantize") or {}).get("mode", "none") != "none":
        raise ValueError(f"method {name!r}: refine after quantize (refitting the float rows only) is not "
                         "implemented; drop `refine` or `quantize` from the recipe")
    if (recipe.get("rehab") or {}).get("steps", 0) > 0:
        raise ValueError(f"method {name!r} asks for both refine and rehab, which both follow the last stage; "
                         "keep one of them")
    return cfg


def _solve_right(M: torch.Tensor, P: torch.Tensor, damping: float) -> torch.Tensor:
    """``M (P + δI)⁻¹`` for symmetric PSD ``P`` (float64), by a damped Cholesky ``S Sᵀ = P + δI`` and
    ``cholesky_solve``; ``δ = damping · tr(P)/k`` (raised by :func:`lowrank.whitening.whitening_factor` when
    ``P`` is singular)."""
    S = whitening_factor(P, damping=damping).S
    return torch.cholesky_solve(M.T.contiguous(), S).T


def refit_up(W: torch.Tensor, B: torch.Tensor, C_dc: torch.Tensor, C_cc: torch.Tensor,
             damping: float = 1e-4, anchor: float = 0.0, A0: torch.Tensor | None = None) -> torch.Tensor:
    """``A = (W C_dc Bᵀ + λ A₀)(B C_cc Bᵀ + (δ + λ) I)⁻¹`` (m×r, float64): the least-squares ``A`` of
    ``W X_d ≈ A B X_c`` with a ridge ``λ‖A − A₀‖²`` toward ``A0`` (``λ = anchor · tr(B C_cc Bᵀ)/r``; no ridge
    when ``anchor`` is 0) and a damping ``δ = damping · tr(B C_cc Bᵀ)/r`` toward 0."""
    W, B, C_dc, C_cc = (t.to(torch.float64) for t in (W, B, C_dc, C_cc))
    return refit_up_projected(W, C_dc @ B.T, B @ C_cc @ B.T, damping, anchor, A0)


def refit_up_projected(W: torch.Tensor, Q: torch.Tensor, P: torch.Tensor, damping: float = 1e-4,
                       anchor: float = 0.0, A0: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`refit_up` from the projected statistics ``Q = C_dc Bᵀ = Σ X_d Zᵀ`` (n×r) and ``P = B C_cc Bᵀ =
    Σ Z Zᵀ`` (r×r) of the projected inputs ``Z = B X_c``: ``A = (W Q + λ A₀)(P + (δ + λ) I)⁻¹``. The same
    solution, accumulated in ``N (2 n r + r²)`` instead of ``2 N n²`` multiply-adds over ``N`` tokens: less
    whenever ``r`` is well below ``n`` (SmolLM2's down projections at kept 0.6: about 6× less)."""
    M = W.to(torch.float64) @ Q.to(torch.float64)
    return _anchored_solve(M, P.to(torch.float64), damping, anchor, A0, "refit_up", "A0")


def _anchored_solve(M: torch.Tensor, P: torch.Tensor, damping: float, anchor: float, X0: torch.Tensor | None,
                    who: str, name: str) -> torch.Tensor:
    """``(M + λ X₀)(P + (δ + λ) I)⁻¹`` with ``λ = anchor · tr(P)/k`` (no ridge when ``anchor`` is 0): the
    normal equations of a least-squares fit ``M P⁻¹`` with a ridge toward ``X0``; ``δ`` the absolute damping of
    :func:`_solve_right` on ``P`` alone."""
    if anchor > 0:
        if X0 is None:
            raise ValueError(f"{who}: anchor > 0 needs the current factor ({name})")
        lam = anchor * float(torch.diagonal(P).mean())
        M = M + lam * X0.to(torch.float64)
        P = P + lam * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
        damping = damping / (1.0 + anchor)  # the same absolute δ: whitening_factor scales by P's mean diagonal
    return _solve_right(M, P, damping)


def refit_map(W: torch.Tensor, r: int, C_tc: torch.Tensor, C_cc: torch.Tensor, damping: float = 1e-4,
              anchor: float = 0.0, M0: torch.Tensor | None = None, T: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` (m×r, r×n, float64) minimising ``‖Tᵀ(W X_t − A B X_c)‖² + λ‖Tᵀ(A B − M₀)‖²_F`` over every
    rank-``r`` map (reduced-rank regression; ``λ = anchor · tr(C_cc)/n``, no ridge when ``anchor`` is 0;
    ``T = None``: ``T = I``): the truncation of ``M_ls = (W C_tc + λ M₀)(C_cc + λ I)⁻¹`` whitened by the
    Cholesky factor ``L`` of ``C_cc + λ I`` (damped by ``δ``, as :func:`_solve_right`)."""
    W, C_tc, C_cc = (t.to(torch.float64) for t in (W, C_tc, C_cc))
    M = W @ C_tc
    if anchor > 0:
        if M0 is None:
            raise ValueError("refit_map: anchor > 0 needs the current map (M0)")
        lam = anchor * float(torch.diagonal(C_cc).mean())
        M = M + lam * M0.to(torch.float64)
        C_cc = C_cc + lam * torch.eye(C_cc.shape[0], dtype=C_cc.dtype, device=C_cc.device)
        damping = damping / (1.0 + anchor)
    L = whitening_factor(C_cc, damping=damping).S
    M_ls = torch.cholesky_solve(M.T.contiguous(), L).T
    f = truncate(M_ls, r, S=L, T=None if T is None else T.to(torch.float64))
    return f.A, f.B


def refit_down(W: torch.Tensor, A: torch.Tensor, C_dc: torch.Tensor, C_cc: torch.Tensor,
               damping: float = 1e-4, anchor: float = 0.0, B0: torch.Tensor | None = None,
               T: torch.Tensor | None = None) -> torch.Tensor:
    """``B = ((AᵀM A + δ_A I)⁻¹ AᵀM W C_dc + λ B₀)(C_cc + (δ_C + λ) I)⁻¹`` (r×n, float64), ``M = T Tᵀ``: the
    least-squares ``B`` of ``‖Tᵀ(W X_d − A B X_c)‖²`` with ``A`` fixed (``T = None``: ``M = I``) and, when
    ``anchor`` > 0, the ridge ``λ‖TᵀA (B − B₀)‖²`` toward ``B0`` (``λ = anchor · tr(C_cc)/n``)."""
    W, A, C_dc, C_cc = (t.to(torch.float64) for t in (W, A, C_dc, C_cc))
    if T is not None:  # Tᵀ(W − A B) = W_t − A_t B
        Tt = T.to(torch.float64).T
        W, A = Tt @ W, Tt @ A
    left = _solve_right((A.T @ W @ C_dc).T, A.T @ A, damping).T  # (AᵀA)⁻¹ Aᵀ W C_dc  (r×n; AᵀA symmetric)
    return _anchored_solve(left, C_cc, damping, anchor, B0, "refit_down", "B0")


class _Stop(Exception):
    pass


def block_groups(block: nn.Module, names: dict[str, nn.Module], run: Any) -> list[list[str]]:
    """Targets of one block in data-flow order, grouped by shared input tensor.

    ``names`` maps target name → module (inside ``block``); ``run()`` calls the block once. The order is the
    order of the targets' first calls; targets called on the same tensor object (q/k/v, gate/up) form a group.
    """
    order: list[tuple[str, torch.Tensor]] = []
    handles = [mod.register_forward_hook(lambda _m, args, _o, n=n: order.append((n, args[0])))
               for n, mod in names.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    inputs: list[torch.Tensor] = []
    for n, x in order:
        if any(n in g for g in groups):
            continue
        for g, t in zip(groups, inputs):
            if t is x:
                g.append(n)
                break
        else:
            groups.append([n])
            inputs.append(x)
    return groups


def _capture_input(block: nn.Module, module: nn.Module, call: Any) -> torch.Tensor:
    """The input of ``module`` when ``call()`` runs ``block``, stopping the block right after it is seen."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise _Stop

    h = module.register_forward_pre_hook(hook)
    try:
        call()
    except _Stop:
        pass
    finally:
        h.remove()
    if not seen:
        raise RuntimeError(f"{type(module).__name__} was not called by its block: cannot refine it")
    return seen[0].reshape(-1, seen[0].shape[-1])


@dataclass
class RefineReport:
    """Per block: relative output error before / after and whether the refit was kept (with ``polish_steps``:
    also the error after the closed form alone and whether the polish was kept)."""

    blocks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def block_errors(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """``Σ_b ‖o_b − y_b‖² / Σ_b ‖y_b‖²`` (float64)."""
    num = sum(float((o.double() - y.to(o.device).double()).pow(2).sum()) for o, y in zip(outputs, targets))
    den = sum(float(y.double().pow(2).sum()) for y in targets)
    return num / max(den, 1e-300)


def _finite(mods: dict[str, LowRankLinear]) -> bool:
    return all(bool(torch.isfinite(m.up.weight).all() and torch.isfinite(m.down.weight).all())
               for m in mods.values())


def _factor_state(mods: dict[str, LowRankLinear]) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in mods.items()}


def _group_statistics(cblk: nn.Module, first: nn.Module, h_c: list[torch.Tensor], calls: list[Any],
                      xd_list: list[torch.Tensor], mix: float, downs: dict[str, torch.Tensor] | None,
                      device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The float64 sums of one group over every batch, its compressed inputs ``X_c`` captured from the block as
    it is now and the target's inputs ``X_t = α X_d + (1 − α) X_c`` (``α`` = ``mix``).

    ``downs is None``: ``{"": (C_tc, C_cc)}``, ``C_tc = Σ X_t X_cᵀ`` (= ``α C_dc + (1 − α) C_cc``) and
    ``C_cc = Σ X_c X_cᵀ`` (n×n). Else, for each target with its ``B`` in ``downs``: ``(Q, P)`` with
    ``Z = B X_c``, ``Q = Σ X_t Zᵀ`` (n×r) and ``P = Σ Z Zᵀ`` (r×r) (:func:`refit_up_projected`)."""
    out: dict[str, list[torch.Tensor]] = {}
    Bt = {n: B.detach().to(device=device, dtype=torch.float64).T for n, B in (downs or {}).items()}
    for b in range(len(h_c)):
        args, kwargs = calls[b]
        xc = _capture_input(cblk, first, lambda: cblk(h_c[b].to(device), *args, **kwargs)).to(torch.float64)
        xt = xd_list[b].to(device=device, dtype=torch.float64)
        if mix < 1.0:
            xt = mix * xt + (1.0 - mix) * xc
        if downs is None:
            if not out:
                out[""] = [torch.zeros(xc.shape[1], xc.shape[1], dtype=torch.float64, device=device)
                           for _ in range(2)]
            out[""][0].addmm_(xt.T, xc)
            gram_update(out[""][1], xc)
            continue
        for n, bt in Bt.items():
            z = xc @ bt  # [N_b, r]
            if n not in out:
                out[n] = [torch.zeros(xc.shape[1], bt.shape[1], dtype=torch.float64, device=device),
                          torch.zeros(bt.shape[1], bt.shape[1], dtype=torch.float64, device=device)]
            out[n][0].addmm_(xt.T, z)
            out[n][1].addmm_(z.T, z)
    return {n: (v[0], v[1]) for n, v in out.items()}


def _projected_is_cheaper(mods: list[LowRankLinear]) -> bool:
    """Whether the per-target projected sums (``Σ_t (2 n r_t + r_t²)`` multiply-adds a token) cost less than
    the group's two n×n Grams (``2 n²``)."""
    n = mods[0].in_features
    return sum(2 * n * m.rank + m.rank * m.rank for m in mods) < 2 * n * n


def _refit_closed_form(cblk: nn.Module, dense: nn.Module, model: nn.Module, groups: list[list[str]],
                       factored: dict[str, LowRankLinear], h_c: list[torch.Tensor], calls: list[Any],
                       x_d: dict[str, list[torch.Tensor]], cfg: RefineConfig, device: torch.device,
                       output_factor: Callable[[str], torch.Tensor | None] | None = None) -> None:
    todo_groups = [g for g in groups if any(n in factored for n in g)]

    def statistics(group: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        mods = {n: factored[n] for n in group if n in factored}
        projected = not (cfg.refit_b or cfg.subspace) and _projected_is_cheaper(list(mods.values()))
        downs = {n: m.down.weight for n, m in mods.items()} if projected else None
        return _group_statistics(cblk, model.get_submodule(group[0]), h_c, calls, x_d[group[0]],
                                 cfg.target_mix, downs, device)

    stats: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    if not cfg.sequential:  # every group's inputs from the block before any refit (B never moves before use)
        for g in todo_groups:
            stats[g[0]] = statistics(g)
    for group in todo_groups:
        st = stats.pop(group[0]) if not cfg.sequential else statistics(group)
        for n in (n for n in group if n in factored):
            mod = factored[n]
            W = linear_weight(dense.get_submodule(n)).detach().to(device)
            A0 = mod.up.weight.detach()
            if "" in st and cfg.subspace:
                T = None if output_factor is None else output_factor(n)
                A, B = refit_map(W, mod.rank, *st[""], cfg.damping, cfg.anchor, A0 @ mod.down.weight.detach(),
                                 None if T is None else T.to(device))
                mod.down.weight.data.copy_(B.to(mod.down.weight.dtype))
            elif "" in st:
                C_tc, C_cc = st[""]
                A = refit_up(W, mod.down.weight.detach(), C_tc, C_cc, cfg.damping, cfg.anchor, A0)
                if cfg.refit_b:
                    T = None if output_factor is None else output_factor(n)
                    B = refit_down(W, A, C_tc, C_cc, cfg.damping, cfg.b_anchor, mod.down.weight.detach(),
                                   None if T is None else T.to(device))
                    mod.down.weight.data.copy_(B.to(mod.down.weight.dtype))
            else:
                A = refit_up_projected(W, *st[n], cfg.damping, cfg.anchor, A0)
            mod.up.weight.data.copy_(A.to(mod.up.weight.dtype))


def _refit_adam(cblk: nn.Module, factored: dict[str, LowRankLinear], h_c: list[torch.Tensor], calls: list[Any],
                y_d: list[torch.Tensor], steps: int, lr: float, device: torch.device) -> None:
    """``steps`` Adam steps (``lr``) on the block-output MSE with only ``factored``'s ``A`` and ``B`` trainable,
    batch ``step mod len(h_c)`` at step ``step``."""
    params = [p for m in factored.values() for p in (m.up.weight, m.down.weight)]
    if not params or steps == 0:
        return
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    try:
        with torch.enable_grad():
            for step in range(steps):
                b = step % len(h_c)
                args, kwargs = calls[b]
                out = _block_output(cblk(h_c[b].to(device), *args, **kwargs))
                loss = (out - y_d[b].to(device)).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None


@torch.no_grad()
def refine_model(model: nn.Module, dense: nn.Module, windows: torch.Tensor, cfg: RefineConfig,
                 device: torch.device | str = "cpu", targets: list[Target] | None = None,
                 output_factor: Callable[[str], torch.Tensor | None] | None = None) -> RefineReport:
    """Refine every ``LowRankLinear`` of ``model`` (in place) block by block against ``dense``.

    ``output_factor``: target name → ``T`` (m×m) of the output metric ``T Tᵀ`` the ``B`` refit (``refit_b``)
    weights its error with (``None``: plain); the ``A`` refit is the same under any such metric.

    ``model`` and ``dense`` share the architecture and the stem (embeddings, rotary tables); ``windows`` is
    ``LongTensor[B, T]`` (the first ``cfg.windows`` are used). Returns the per-block errors.
    """
    device = torch.device(device)
    windows = windows[: cfg.windows]
    targets = targets or find_targets(dense)
    by_block: dict[int, list[str]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t.name)
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, windows, cfg.batch_size, device)
    offload_block_inputs(inputs, device)
    h_c = inputs.hidden
    h_d = [h.clone() for h in h_c]
    report = RefineReport()
    for i in progress(range(len(blocks)), desc=f"refine ({cfg.mode})", total=len(blocks)):
        calls = [inputs.calls[b][i] for b in range(len(h_c))]
        with resident(dense, i, device) as dblk, resident(model, i, device) as cblk:
            names = by_block.get(i, [])
            factored = {n: m for n in names if isinstance(m := model.get_submodule(n), LowRankLinear)}
            groups = block_groups(dblk, {n: dense.get_submodule(n) for n in names},
                                  lambda: dblk(h_d[0].to(device), *calls[0][0], **calls[0][1])) if names else []
            # the dense block: its outputs (targets and the next dense inputs), and each group's dense inputs
            x_d: dict[str, list[torch.Tensor]] = {g[0]: [] for g in groups}
            hooks = [dense.get_submodule(g[0]).register_forward_pre_hook(
                lambda _m, args, n=g[0]: x_d[n].append(args[0].reshape(-1, args[0].shape[-1]).to(h_c[0].device)))
                for g in groups] if factored else []
            try:
                y_d = [_block_output(dblk(h_d[b].to(device), *calls[b][0], **calls[b][1])).to(h_c[0].device)
                       for b in range(len(h_d))]
            finally:
                for h in hooks:
                    h.remove()

            def run_compressed() -> list[torch.Tensor]:
                return [_block_output(cblk(h_c[b].to(device), *calls[b][0], **calls[b][1])).to(h_c[0].device)
                        for b in range(len(h_c))]

            before_out = run_compressed()
            before = block_errors(before_out, y_d)
            after, kept, polished = before, False, None
            if factored:
                saved = _factor_state(factored)
                if cfg.mode == "closed_form":
                    _refit_closed_form(cblk, dense, model, groups, factored, h_c, calls, x_d, cfg, device,
                                       output_factor)
                else:
                    _refit_adam(cblk, factored, h_c, calls, y_d, cfg.steps, cfg.lr, device)
                after_out = run_compressed()
                after = block_errors(after_out, y_d)
                kept = _finite(factored) and (after <= before or not cfg.guard)
                if not kept:
                    for n, m in factored.items():
                        m.load_state_dict(saved[n])
                    after, after_out = before, before_out
                closed = after
                if cfg.polish_steps:  # Adam from the closed form's factors (or the previous ones, if rejected)
                    stage = _factor_state(factored)
                    _refit_adam(cblk, factored, h_c, calls, y_d, cfg.polish_steps, cfg.lr, device)
                    pol_out = run_compressed()
                    pol = block_errors(pol_out, y_d)
                    polished = _finite(factored) and (pol <= after or not cfg.guard)
                    if polished:
                        after, after_out, kept = pol, pol_out, True
                    else:
                        for n, m in factored.items():
                            m.load_state_dict(stage[n])
                h_c = after_out
            else:
                h_c = before_out
            h_d = y_d
            del x_d
        report.blocks.append({"block": i, "error_before": before, "error_after": after, "refit_kept": kept,
                              "factored": len(factored)}
                             | ({} if polished is None else {"error_closed_form": closed, "polish_kept": polished}))
        log.info("block %d: relative output error %.4g -> %.4g%s", i, before, after,
                 "" if kept or not factored else " (refit rejected, previous factors kept)")
    return report

"""Low-Rank Prehab: a short fine-tune that pulls every target weight toward low rank in its whitened space.

For target ``k`` with weight ``W_k`` (m×n, ``y = W x``) and the lower-triangular whitening factor ``S_k`` of the
*pretrained* model's input second moment (``S Sᵀ = XᵀX/N + εI``, :mod:`lowrank.whitening`), the whitened weight is
``M_k = W_k S_k``; its singular values are exactly what SVD-LLM / ZS-SVD truncation drops (each dropped ``σ_i``
costs ``σ_i²`` of output error). Prehab minimises, at step ``t``,

    L_t = CE(batch_t) + λ(t) · R,      R = (1/K) Σ_k s(M_k),
    λ(t) = λ_0 (λ_max / λ_0)^(t / T_w)  for t < T_w,   λ_max afterwards   (exponential warm-up),

over the target weights only (``W`` is trained directly; ``S`` is fixed, so ``R(W S)`` is the reference's
objective in plain coordinates; see the method note §1.5, §1.9). Surrogates ``s`` (:data:`SURROGATES`):

* ``stable_rank``: ``‖M‖_F² / σ_max(M)²`` (scale invariant, in [1, rank]). ``σ_max`` by power iteration on
  ``MᵀM``, warm-started from the previous step's right vector; the value is ``‖M‖_F² / (uᵀ M v)²`` with the
  detached top pair ``(u, v)``, whose gradient is the analytic ``2M/σ² − 2‖M‖_F² u vᵀ / σ³`` at convergence.
  It stays finite when ``σ_max`` is repeated (any top pair is a valid subgradient) and for tiny ``M`` (the value
  is computed on ``M / c`` with a detached scale ``c``).
* ``nuclear``: ``Σ_i √(λ_i + ε)`` with ``λ_i`` the eigenvalues of the smaller Gram (``MᵀM`` or ``MMᵀ``) and the
  relative ridge ``ε = ridge · tr(Gram) / dim`` (the ViT recipe; scale dependent: with ``C = XᵀX/N`` the scale
  of ``M`` does not depend on the number of calibration tokens).
* ``effective_rank``: ``exp(H(p))``, ``p_i = σ̃_i / Σ_j σ̃_j``, ``σ̃_i = √(λ_i + ε)`` (Roy & Vetterli's entropy
  effective rank, ridged like the nuclear norm so that ``log p`` is finite).
* ``nuclear_ratio``: ``Σ_i σ̃_i / F₀`` with ``F₀ = ‖W₀ S‖_F`` the pretrained whitened Frobenius norm, a constant:
  the nuclear/Frobenius ratio ``‖M‖_* / ‖M‖_F`` (in ``[1, √rank]``, an effective-rank measure) with its
  denominator frozen at step 0. The live ratio falls when ``σ_1`` grows (``∂/∂σ_1 = (‖M‖_F² − σ_1‖M‖_*)/‖M‖_F³
  ≤ 0``); the frozen one has ``∂/∂σ_i = 1/F₀ > 0`` for every ``i``, so growing any singular value raises it. Its
  gradient ``U Vᵀ / F₀`` lowers every ``σ_i`` by the same amount per step (soft thresholding): relative to its
  size, the tail moves most. Needs no plan.
* ``tail_energy``: ``Σ_{i>k} σ_i(M)² / E₀`` with ``k`` the rank the planned allocation keeps for this target
  (``prehab.plan``: a recipe and kept fraction, allocated on the PRETRAINED model) and ``E₀ = ‖W₀ S‖_F²`` the
  pretrained whitened energy, a constant. Its value is exactly the relative whitened output error that
  truncating ``M`` to rank ``k`` costs (SVD-LLM's loss, Eckart-Young), so it aims at what truncation removes. The
  three scale-invariant surrogates above fall when ``σ_1`` grows (with ``σ_1`` dominating the whitened spectrum,
  the stable rank falls that way while the tail stays); a FIXED denominator cannot be lowered by growing the
  head, only by moving energy out of the tail (or by shrinking ``W``, which the CE term resists). A target the
  plan leaves dense (``k`` None or ``k ≥ min(m, n)``) adds 0.

Every surrogate run with a plan also records, per logged step, ``tail`` = the mean over targets of that same
relative tail energy at the planned ranks: the predicted truncation loss of the plan, the number prehab should
lower (``prehab_report`` plots it).

The two eigenvalue surrogates are spectral functions ``F(M) = f(λ(MᵀM))`` whose gradient is formed directly as
``∂F/∂M = 2 M Q diag(∂f/∂λ) Qᵀ`` from the eigenvectors ``Q`` of the Gram. Differentiating through ``eigh``
instead would divide by ``λ_i − λ_j`` and blow up on repeated eigenvalues; this form has no such term (``∂f/∂λ``
of a symmetric function is equal on equal eigenvalues), so it is finite for repeated and zero singular values.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
from torch import nn

from .finetune import OPTIMIZERS, TrainResult, train
from .model import Target, find_targets, linear_weight

__all__ = ["SURROGATES", "power_iteration", "stable_rank", "nuclear_norm", "effective_rank", "nuclear_ratio",
           "tail_energy",
           "relative_tail", "lambda_schedule", "PrehabConfig", "RankPenalty", "whitened_factors", "whitened_spectra",
           "whitened_spectra_of", "rank_summary", "prehab", "PrehabResult"]

log = logging.getLogger(__name__)


# ---- surrogates ----------------------------------------------------------------------------------------------


@torch.no_grad()
def power_iteration(M: torch.Tensor, v0: torch.Tensor | None = None, iters: int = 10
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triple ``(σ, u, v)`` of ``M`` by ``iters`` iterations of ``v ← MᵀM v / ‖MᵀM v‖`` from ``v0``
    (default: the normalised all-ones vector, deterministic). A start orthogonal to the row space restarts from
    a fixed pseudo-random vector."""
    n = M.shape[1]
    v = torch.ones(n, dtype=M.dtype, device=M.device) if v0 is None else v0.to(M.dtype, copy=True)
    for attempt in range(2):
        v = v / v.norm().clamp_min(torch.finfo(M.dtype).tiny)
        for _ in range(max(1, iters)):
            w = M.T @ (M @ v)
            nw = w.norm()
            if not nw > 0:
                break
            v = w / nw
        Mv = M @ v
        sigma = Mv.norm()
        if sigma > 0 or attempt == 1:
            break
        g = torch.Generator().manual_seed(12345)
        v = torch.randn(n, generator=g, dtype=M.dtype).to(M.device)
    u = Mv / sigma.clamp_min(torch.finfo(M.dtype).tiny)
    return sigma, u, v


def stable_rank(M: torch.Tensor, v0: torch.Tensor | None = None, iters: int = 10
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``‖M‖_F² / σ_max²`` (differentiable) and the right singular vector to warm-start the next call."""
    c = M.detach().abs().max()
    c = torch.where(c > 0, c, torch.ones_like(c))
    Mn = M / c  # scale-invariant surrogate: evaluate on a well-scaled copy (gradient includes the 1/c)
    _, u, v = power_iteration(Mn.detach(), v0, iters)
    sigma = u @ (Mn @ v)  # = σ_max at convergence; d/dM = u vᵀ / c
    fro2 = (Mn * Mn).sum()
    return fro2 / sigma.square().clamp_min(torch.finfo(M.dtype).tiny), v


class _Spectral(torch.autograd.Function):
    """``f(λ)`` of the eigenvalues of the smaller Gram of ``M``; backward ``2 M Q diag(∂f/∂λ) Qᵀ`` (no eigh
    backward, hence no ``1/(λ_i − λ_j)`` terms)."""

    @staticmethod
    def forward(ctx, M: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # type: ignore
        A = M.detach().to(torch.float64)
        tall = A.shape[0] >= A.shape[1]
        G = A.T @ A if tall else A @ A.T
        lam, Q = torch.linalg.eigh(0.5 * (G + G.T))
        with torch.enable_grad():
            lam_r = lam.clamp_min(0).detach().requires_grad_(True)
            val = f(lam_r)
            (g,) = torch.autograd.grad(val, lam_r)
        ctx.save_for_backward(M, Q, g)
        ctx.tall = tall
        return val.detach().to(M.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore
        M, Q, g = ctx.saved_tensors
        P = (Q * g) @ Q.T  # Σ_i (∂f/∂λ_i) q_i q_iᵀ
        A = M.to(torch.float64)
        grad = 2 * (A @ P if ctx.tall else P @ A)
        return (grad_out.to(torch.float64) * grad).to(M.dtype), None


def _ridge(lam: torch.Tensor, ridge: float) -> torch.Tensor:
    return (ridge * lam.sum() / lam.numel()).clamp_min(torch.finfo(lam.dtype).tiny)


def nuclear_norm(M: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """``Σ √(λ_i(Gram) + ε)``, ``ε = ridge · tr(Gram)/dim``: the ridged nuclear norm of ``M``."""
    return _Spectral.apply(M, lambda lam: (lam + _ridge(lam, ridge)).sqrt().sum())


def effective_rank(M: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """``exp(−Σ p_i log p_i)``, ``p = σ̃ / Σσ̃``, ``σ̃ = √(λ + ε)``: the entropy effective rank of ``M``."""

    def f(lam: torch.Tensor) -> torch.Tensor:
        s = (lam + _ridge(lam, ridge)).sqrt()
        p = s / s.sum()
        return torch.exp(-(p * p.log()).sum())

    return _Spectral.apply(M, f)


def nuclear_ratio(M: torch.Tensor, fro0: float, ridge: float = 1e-6) -> torch.Tensor:
    """``‖M‖_* / fro0`` (ridged nuclear norm, :func:`nuclear_norm`) with a fixed ``fro0 = ‖W₀ S‖_F`` of the
    pretrained weight: the nuclear/Frobenius ratio whose denominator σ_1 growth cannot raise."""
    if not fro0 > 0:
        raise ValueError(f"nuclear_ratio needs a positive reference norm, got {fro0!r} (an all-zero weight?)")
    return nuclear_norm(M, ridge) / fro0


def tail_energy(M: torch.Tensor, k: int, energy: float) -> torch.Tensor:
    """``Σ_{i>k} σ_i(M)² / energy``: the whitened energy beyond rank ``k`` (the smallest ``min(m, n) − k``
    eigenvalues of the smaller Gram) over a fixed ``energy`` (``‖W₀ S‖_F²`` of the pretrained weight). Gradient
    ``2 M Q_tail Q_tailᵀ / energy`` (the spectral form; a subgradient where ``σ_k = σ_{k+1}``)."""
    if not energy > 0:
        raise ValueError(f"tail_energy needs a positive reference energy, got {energy!r} (an all-zero weight?)")

    def f(lam: torch.Tensor) -> torch.Tensor:
        tail = max(lam.numel() - int(k), 0)
        return lam[:tail].sum() / energy if tail else (lam * 0).sum()  # eigh: ascending, the tail comes first

    return _Spectral.apply(M, f)


@torch.no_grad()
def relative_tail(sigmas: dict[str, torch.Tensor], ranks: dict[str, int | None],
                  energies: dict[str, float]) -> dict[str, float]:
    """``Σ_{i>k} σ_i² / E₀`` per target from descending singular values (0 where the plan keeps it dense)."""
    out = {}
    for name, s in sigmas.items():
        k = ranks.get(name)
        out[name] = 0.0 if k is None or k >= s.numel() else float(s[int(k):].square().sum() / energies[name])
    return out


@dataclass(frozen=True)
class Surrogate:
    description: str
    needs_vector: bool


SURROGATES: dict[str, Surrogate] = {
    "stable_rank": Surrogate("‖M‖_F²/σ_max², warm-started power iteration (the reference's BERT / LLaMA choice)",
                             True),
    "nuclear": Surrogate("Σ√(λ(MᵀM)+ε), relative ridge (the reference's ViT choice; scale dependent)", False),
    "effective_rank": Surrogate("exp(entropy of σ/Σσ), ridged", False),
    "tail_energy": Surrogate("Σ_{i>k}σ_i² / ‖W₀S‖_F² at the planned ranks k (prehab.plan): the truncation loss "
                             "itself, with a fixed denominator σ_1 growth cannot game", False),
    "nuclear_ratio": Surrogate("‖M‖_* / ‖W₀S‖_F: the nuclear/Frobenius ratio with the pretrained denominator "
                               "frozen, so σ_1 growth raises it", False),
}


def lambda_schedule(t: int, lambda0: float, lambda_max: float, warmup_steps: int) -> float:
    """``λ_0 (λ_max/λ_0)^(t/T_w)`` for ``t < T_w``, else ``λ_max`` (``T_w = 0``: ``λ_max`` from the start)."""
    if t >= warmup_steps or lambda0 == lambda_max:
        return float(lambda_max)
    return float(lambda0 * (lambda_max / lambda0) ** (t / warmup_steps))


# ---- configuration -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrehabConfig:
    """Settings of one prehab run; ``__post_init__`` names a bad value and the fix."""

    surrogate: str = "stable_rank"
    lambda0: float = 1e-4
    lambda_max: float = 10.0
    warmup_steps: int = 10
    steps: int = 100
    lr: float = 2e-5
    batch_size: int = 4
    optimizer: str = "adam"
    seed: int = 0
    checkpoint_every: int = 10
    power_iters: int = 10
    ridge: float = 1e-6
    log_every: int = 1
    plan: dict[str, Any] | None = None  # {method, ratio}: the allocation whose ranks tail_energy and `tail` use

    def __post_init__(self) -> None:
        if self.surrogate not in SURROGATES:
            raise ValueError(f"prehab.surrogate {self.surrogate!r} is unknown; choose one of {sorted(SURROGATES)}")
        if self.surrogate == "tail_energy" and not self.plan:
            raise ValueError("prehab.surrogate tail_energy needs prehab.plan: {method: <a recipe without prehab>, "
                             "ratio: <kept fraction>}, whose allocation on the pretrained model gives the ranks")
        if self.plan is not None and (set(self.plan) != {"method", "ratio"} or not 0 < float(self.plan["ratio"]) < 1):
            raise ValueError(f"prehab.plan = {self.plan!r} must be {{method: <recipe>, ratio: <kept fraction in "
                             "(0, 1)>}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"prehab.optimizer {self.optimizer!r} is unknown; choose one of {sorted(OPTIMIZERS)}")
        for name in ("lambda0", "lambda_max", "lr", "ridge"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"prehab.{name} = {v!r} must be a finite number >= 0")
        if not self.lr > 0:
            raise ValueError(f"prehab.lr = {self.lr} must be > 0 (e.g. 2e-5)")
        if self.lambda0 > self.lambda_max:
            raise ValueError(f"prehab.lambda0 = {self.lambda0} exceeds lambda_max = {self.lambda_max}; the warm-up "
                             "rises from lambda0 to lambda_max: swap them or lower lambda0")
        if self.lambda0 == 0 and self.lambda_max > 0 and self.warmup_steps > 0:
            raise ValueError("prehab.lambda0 = 0 cannot warm up exponentially to lambda_max; use a small positive "
                             "lambda0 (e.g. 1e-4) or warmup_steps 0")
        for name, lo in (("steps", 1), ("batch_size", 1), ("power_iters", 1), ("warmup_steps", 0),
                         ("checkpoint_every", 0), ("log_every", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"prehab.{name} = {v!r} must be an integer >= {lo}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrehabConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown prehab settings {unknown}; known: {sorted(known)}")
        return cls(**d)


# ---- whitening factors and diagnostics ------------------------------------------------------------------------


def whitened_factors(targets: list[Target], grams: Any, damping: float, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """``S_k`` for every target (one tensor per shared-input group, referenced by each of its targets), cast to
    ``dtype`` (float32 halves the memory of the float64 factorisation; the surrogates are ratios/sums of
    float32-accurate quantities)."""
    out: dict[str, torch.Tensor] = {}
    by_group: dict[str, torch.Tensor] = {}
    for t in targets:
        if t.name not in grams.group_of:
            raise ValueError(f"no input statistics for target {t.name!r}: prehab needs the input_gram statistics of "
                             "this very model; recompute them (rule calibration_stats) for it")
        g = grams.group_of[t.name]
        if g not in by_group:
            by_group[g] = grams.factor_for(t.name, damping, device).S.to(dtype)
        out[t.name] = by_group[g]
    return out


@torch.no_grad()
def whitened_spectra(model: nn.Module, targets: list[Target], factors: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """Singular values (float64, descending) of ``M_k = W_k S_k`` for every target, as ``√λ`` of the smaller Gram
    (``eigvalsh`` is several times cheaper than an SVD; values below ~1e-8 σ_max are round-off)."""
    return whitened_spectra_of({t.name: model.get_submodule(t.name) for t in targets}, factors)


@torch.no_grad()
def whitened_spectra_of(modules: dict[str, nn.Module], factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`whitened_spectra` of named modules."""
    out = {}
    for name, mod in modules.items():
        W = linear_weight(mod).detach().to(torch.float64)
        M = W @ factors[name].to(W.device, torch.float64)
        G = M.T @ M if M.shape[0] >= M.shape[1] else M @ M.T
        out[name] = torch.linalg.eigvalsh(G).clamp_min(0).sqrt().flip(0).cpu()
    return out


def rank_summary(sigmas: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per target and averaged: stable rank ``Σσ²/σ_1²`` and entropy effective rank ``exp H(σ/Σσ)``."""
    per: dict[str, dict[str, float]] = {}
    for name, s in sigmas.items():
        s = s.to(torch.float64).clamp_min(0)
        sr = float((s.square().sum() / s[0].square()).item()) if s[0] > 0 else 0.0
        p = s / s.sum() if s.sum() > 0 else s
        p = p[p > 0]
        er = float(torch.exp(-(p * p.log()).sum()).item()) if p.numel() else 0.0
        per[name] = {"stable_rank": sr, "effective_rank": er, "full_rank": int(s.numel())}
    k = max(1, len(per))
    return {"mean_stable_rank": sum(v["stable_rank"] for v in per.values()) / k,
            "mean_effective_rank": sum(v["effective_rank"] for v in per.values()) / k,
            "mean_effective_rank_fraction": sum(v["effective_rank"] / v["full_rank"] for v in per.values()) / k,
            "targets": per}


# ---- the penalty and the run ----------------------------------------------------------------------------------


class RankPenalty:
    """``λ(t) · (1/K) Σ_k s(W_k S_k)`` over the targets; keeps the power-iteration vectors between steps."""

    def __init__(self, model: nn.Module, targets: list[Target], factors: dict[str, torch.Tensor],
                 cfg: PrehabConfig, ranks: dict[str, int | None] | None = None) -> None:
        self.modules = {t.name: model.get_submodule(t.name) for t in targets}
        self.factors = factors
        self.cfg = cfg
        self.vectors: dict[str, torch.Tensor] = {}
        if cfg.surrogate == "tail_energy" and ranks is None:
            raise ValueError("the tail_energy surrogate needs the planned ranks (prehab.plan's allocation)")
        self.ranks = ranks
        self.energies: dict[str, float] = {}
        if ranks is not None:
            missing = sorted(set(self.modules) - set(ranks))
            if missing:
                raise ValueError(f"the planned allocation has no rank for {len(missing)} targets, e.g. "
                                 f"{missing[:3]}: it belongs to another model; rerun its allocate job")
        if ranks is not None or cfg.surrogate == "nuclear_ratio":
            with torch.no_grad():  # E₀ = ‖W₀ S‖_F², fixed at the start (the pretrained weights)
                self.energies = {n: float((linear_weight(m).to(factors[n].dtype) @ factors[n]).square().sum())
                                 for n, m in self.modules.items()}

    def _value(self, name: str, mod: nn.Module) -> torch.Tensor:
        S = self.factors[name]
        M = linear_weight(mod).to(S.dtype) @ S
        if self.cfg.surrogate == "tail_energy":
            k = self.ranks[name] if self.ranks is not None else None
            return tail_energy(M, min(M.shape) if k is None else int(k), self.energies[name])
        if self.cfg.surrogate == "stable_rank":
            val, v = stable_rank(M, self.vectors.get(name), self.cfg.power_iters)
            self.vectors[name] = v.detach()
            return val
        if self.cfg.surrogate == "nuclear":
            return nuclear_norm(M, self.cfg.ridge)
        if self.cfg.surrogate == "nuclear_ratio":
            return nuclear_ratio(M, math.sqrt(self.energies[name]), self.cfg.ridge)
        return effective_rank(M, self.cfg.ridge)

    def values(self) -> torch.Tensor:
        """``s(M_k)`` of every target (K,), differentiable w.r.t. the weights."""
        return torch.stack([self._value(name, mod) for name, mod in self.modules.items()])

    def __call__(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Back-propagates ``λ(t)/K · s(M_k)`` into the weights' ``.grad`` one target at a time and returns the
        detached ``λ(t) R``: the penalty's autograd graph never holds more than one ``M_k = W_k S_k`` (a joint
        graph would keep an fp32 copy of every target weight alive until the backward)."""
        lam = lambda_schedule(step, self.cfg.lambda0, self.cfg.lambda_max, self.cfg.warmup_steps)
        total = 0.0
        K = len(self.modules)
        for name, mod in self.modules.items():
            if lam == 0:
                with torch.no_grad():
                    val = self._value(name, mod)
            else:
                val = self._value(name, mod)
                (val * (lam / K)).backward()
            total += float(val.detach())
        R = total / K
        logs = {"lambda": lam, "surrogate": R}
        if self.ranks is not None:
            logs["tail"] = R if self.cfg.surrogate == "tail_energy" else self.planned_tail()
        return torch.tensor(lam * R), logs

    @torch.no_grad()
    def planned_tail(self) -> float:
        """Mean over targets of ``Σ_{i>k} σ_i² / E₀`` at the planned ranks: the plan's predicted truncation loss."""
        sig = whitened_spectra_of(self.modules, self.factors)
        per = relative_tail(sig, self.ranks or {}, self.energies)
        return sum(per.values()) / max(1, len(per))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"v.{n}": v for n, v in self.vectors.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.vectors = {k[2:]: v for k, v in tensors.items() if k.startswith("v.")}


@dataclass
class PrehabResult:
    """Training history plus the whitened spectra of every target before and after."""

    train: TrainResult
    sigmas_before: dict[str, torch.Tensor]
    sigmas_after: dict[str, torch.Tensor]

    def summary(self) -> dict[str, Any]:
        before, after = rank_summary(self.sigmas_before), rank_summary(self.sigmas_after)
        return {"before": {k: v for k, v in before.items() if k != "targets"},
                "after": {k: v for k, v in after.items() if k != "targets"},
                "targets": {n: {"before": before["targets"][n], "after": after["targets"][n]}
                            for n in before["targets"]}}


def prehab(model: nn.Module, windows: torch.Tensor, grams: Any, cfg: PrehabConfig, damping: float = 1e-6,
           device: torch.device | str = "cpu", checkpoint: str | None = None, stop_after: int | None = None,
           ranks: dict[str, int | None] | None = None) -> PrehabResult:
    """Run prehab in place on ``model`` (its targets' weights change; nothing else does).

    ``grams``: the pretrained model's ``input_gram`` statistics (:class:`lowrank.calibration.InputGrams`);
    ``checkpoint``: file to resume from / write every ``cfg.checkpoint_every`` steps; ``ranks``: the planned
    allocation's rank per target (``None`` = kept dense), needed by ``tail_energy`` and recorded as ``tail``.
    """
    targets = find_targets(model)
    factors = whitened_factors(targets, grams, damping, device=device)
    before = whitened_spectra(model, targets, factors)
    params = {t.name: model.get_submodule(t.name).weight for t in targets}  # the Parameter (Conv1D: Wᵀ)
    for name, p in params.items():
        if not isinstance(p, nn.Parameter):
            raise TypeError(f"target {name} has no trainable weight parameter (a transposed Conv1D view?); prehab "
                            "trains nn.Linear weights")
    penalty = RankPenalty(model, targets, factors, cfg, ranks)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint_every", "log_every")}
    settings["damping"] = damping
    res = train(model, params, windows, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                optimizer=cfg.optimizer, seed=cfg.seed, device=device, penalty=penalty, checkpoint=checkpoint,
                checkpoint_every=cfg.checkpoint_every, settings=settings, log_every=cfg.log_every, desc="prehab",
                stop_after=stop_after)
    after = whitened_spectra(model, targets, factors)
    return PrehabResult(train=res, sigmas_before=before, sigmas_after=after)

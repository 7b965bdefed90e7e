"""The coordinate spaces truncation and scoring work in: which input factor ``S`` each whitening kind uses.

A whitening kind names the calibration statistic it reads and how ``S`` (lower triangular, n×n) is built from
it for a target; ``None`` means the plain weight space (``S = I``). Every decomposition in the pipeline is the SVD
of ``W S``, so scorers, truncation and correction all agree on the space by going through this registry.

The baselines' scalings are diagonal ``S`` (lower triangular as they stand): ASVD scales input channel ``j`` by
its mean absolute activation to the power ``α``, FWSVD by the square root of its Fisher information (summed
over the output rows) to the power ``α``. The truncated SVD of ``W S`` then minimises ``‖(W − W') S‖_F``, and
truncation un-scales the right factor by the same triangular solve as SVD-LLM's whitening. Their exponents are
properties of the space, stored with the statistic (one value per run, like the damping), so every method and
scorer that works in a space sees the same ``S``.

Two-sided (IO-SVD, ``io_kl``): besides ``S`` an output factor ``T`` (lower triangular, m×m) with ``T Tᵀ`` the
damped top-K KL output metric (:mod:`lowrank.output_metric`); the decomposition is ``B = Tᵀ W S`` and
``‖Tᵀ ΔW S‖²_F = tr(ΔWᵀ C ΔW R) ≈ 2 ΔKL``. Everything one-sided carries over by a change of output coordinates
``W' = Tᵀ W`` (gradient ``T^{-1} G``, left factor un-whitened by ``T^{-T}``), which is how scoring and truncation
use it; one-sided spaces have ``T = I`` and are untouched.

:func:`bind` ties a kind to one run's statistics, damping, decomposition method and device: the
:class:`BoundSpace` every stage asks for a target's ``S`` and ``T`` (scoring, truncation, correction,
quantization, sensitivity), so the space travels as one object instead of loose arguments or callables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Space", "SPACES", "input_factor", "output_factor", "space_stats", "diagonal_scaling", "DIAGONAL_FLOOR",
           "BoundSpace", "bind"]


@dataclass(frozen=True)
class Space:
    """``stat``: the calibration statistic kind it needs (``None``: none); ``factor(name, stat, damping, device)``.

    Two-sided spaces (IO-SVD) also name an ``output_stat`` and an ``output(name, stat, device)`` giving the
    lower-triangular output factor ``T`` (m×m); the decomposition is then the SVD of ``Tᵀ W S``. One-sided spaces
    leave both ``None`` (``T = I``).
    """

    stat: str | None
    factor: Callable[[str, Any, float, torch.device | str], torch.Tensor | None]
    description: str
    output_stat: str | None = None
    output: Callable[[str, Any, torch.device | str], torch.Tensor] | None = None


def _identity(name: str, stat: Any, damping: float, device: torch.device | str) -> None:
    return None


def _input_gram(name: str, grams: Any, damping: float, device: torch.device | str) -> torch.Tensor:
    return grams.factor_for(name, damping, device).S


# ASVD adds an absolute 1e-6 to its scales; relative to the mean scale it means the same for activations of any
# size and for Fisher scales (square roots of squared gradients, often ~1e-5 themselves)
DIAGONAL_FLOOR = 1e-6


def diagonal_scaling(s: torch.Tensor, name: str = "target", floor: float = DIAGONAL_FLOOR) -> torch.Tensor:
    """``S = diag(s + floor · mean(s))`` (float64, n×n): a diagonal, hence lower-triangular, input factor.

    The relative floor keeps ``S`` invertible when a channel is dead (``s_j = 0``) without changing the scale of
    the others; a constant ``s`` gives ``S = c I``, whose SVD of ``W S`` is plain SVD's.
    """
    s = s.to(torch.float64)
    if s.ndim != 1:
        raise ValueError(f"{name}: a diagonal scaling needs a vector, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all() or bool((s < 0).any()):
        raise ValueError(f"{name}: scaling has negative or non-finite entries; recompute its calibration statistics "
                         "in float32 (runtime.dtype)")
    mean = float(s.mean())
    if mean <= 0:
        raise ValueError(f"{name}: every entry of its scaling is zero (no calibration signal reached it); check "
                         "the calibration windows")
    return torch.diag(s + floor * mean)


def _diagonal(name: str, stat: Any, damping: float, device: torch.device | str) -> torch.Tensor:
    return diagonal_scaling(stat.scale_for(name).to(device), name)


def _output_kl(name: str, metrics: Any, device: torch.device | str) -> torch.Tensor:
    return metrics.factor_for(name, device).S


SPACES: dict[str, Space] = {
    "none": Space(None, _identity, "plain weights, S = I (plain SVD)"),
    "input_gram": Space("input_gram", _input_gram,
                        "truncation-aware whitening, S Sᵀ = XᵀX/N + εI (SVD-LLM, ZS-SVD)"),
    "act_scale": Space("act_scale", _diagonal,
                       "activation-aware scaling, S = diag(mean|x|^α) (ASVD; α = statistics.act_scale.alpha)"),
    "fisher": Space("fisher", _diagonal,
                    "Fisher-weighted scaling, S = diag(√(Σ_i F_ij)^α) (FWSVD; α = statistics.fisher.alpha)"),
    "io_kl": Space("input_gram", _input_gram,
                   "two-sided whitening Tᵀ W S: S Sᵀ = XᵀX/N + εI, T Tᵀ = top-K KL output metric + λ tr/m I (IO-SVD)",
                   output_stat="output_kl", output=_output_kl),
}


def space_stats(kind: str) -> tuple[str, ...]:
    """Every calibration statistic kind whitening ``kind`` reads (input side first)."""
    if kind not in SPACES:
        raise ValueError(f"unknown whitening {kind!r}; choose one of {sorted(SPACES)}")
    sp = SPACES[kind]
    return tuple(k for k in (sp.stat, sp.output_stat) if k)


def input_factor(kind: str, name: str, stats: Mapping[str, Any], damping: float,
                 device: torch.device | str = "cpu") -> torch.Tensor | None:
    """``S`` of target ``name`` in whitening ``kind``, from the loaded statistics ``stats[stat kind]``."""
    if kind not in SPACES:
        raise ValueError(f"unknown whitening {kind!r}; choose one of {sorted(SPACES)}")
    space = SPACES[kind]
    if space.stat is not None and space.stat not in stats:
        raise ValueError(f"whitening {kind!r} needs the {space.stat!r} statistics")
    return space.factor(name, stats.get(space.stat) if space.stat else None, damping, device)


def output_factor(kind: str, name: str, stats: Mapping[str, Any], device: torch.device | str = "cpu"
                  ) -> torch.Tensor | None:
    """``T`` (lower triangular, m×m) of target ``name`` in whitening ``kind``; ``None`` for one-sided spaces."""
    if kind not in SPACES:
        raise ValueError(f"unknown whitening {kind!r}; choose one of {sorted(SPACES)}")
    space = SPACES[kind]
    if space.output is None:
        return None
    if space.output_stat not in stats:
        raise ValueError(f"whitening {kind!r} needs the {space.output_stat!r} statistics")
    return space.output(name, stats[space.output_stat], device)


@dataclass(frozen=True)
class BoundSpace:
    """A whitening ``kind`` bound to its loaded statistics: the input factor ``S`` (n×n, lower triangular;
    ``None`` = I) and output factor ``T`` (m×m; ``None`` = I, one-sided) of each target, built on ``device`` with
    ``damping`` (``S Sᵀ = XᵀX/N + εI`` in the Gram spaces); ``decomposition`` is how ``Tᵀ W S`` is decomposed
    (:func:`lowrank.decompose.thin_svd`). A missing statistic is a ``ValueError`` when a factor is first asked
    for (a stage that cuts every target from stored directions needs none)."""

    kind: str
    stats: Mapping[str, Any]
    damping: float = 1e-6
    decomposition: str = "svd"
    device: torch.device | str = "cpu"

    @property
    def two_sided(self) -> bool:
        return SPACES[self.kind].output is not None

    def input(self, name: str) -> torch.Tensor | None:
        """``S`` of target ``name``."""
        return input_factor(self.kind, name, self.stats, self.damping, self.device)

    def output(self, name: str) -> torch.Tensor | None:
        """``T`` of target ``name`` (``None`` in a one-sided space)."""
        return output_factor(self.kind, name, self.stats, self.device)

    def factors(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(S, T)`` of target ``name``."""
        return self.input(name), self.output(name)


def bind(kind: str, stats: Mapping[str, Any] | None = None, damping: float = 1e-6, decomposition: str = "svd",
         device: torch.device | str = "cpu") -> BoundSpace:
    """The space ``kind`` (:data:`SPACES`) bound to ``stats`` (``{stat kind: loaded statistic}``), ``damping``,
    ``decomposition`` and ``device``; an unknown kind is a ``ValueError`` here."""
    if kind not in SPACES:
        raise ValueError(f"unknown whitening {kind!r}; choose one of {sorted(SPACES)}")
    return BoundSpace(kind, stats or {}, damping, decomposition, device)

"""What a calibration statistic IS: the stored objects, their files, and the registry that reads them back.

Every statistic is computed once per model (:mod:`lowrank.calibration` holds how; :data:`lowrank.calibration.STATS`
the collectors) and written with ``to_tensors()`` as one safetensors file whose metadata names its ``kind``;
:func:`load_stat` reads any of them back through :data:`STAT_LOADERS`. This module imports no model code, so a
stage that only reads statistics does not depend on how they are collected.

* ``input_gram`` (:class:`InputGrams`): ``C = XᵀX / N`` per distinct target input (float64 n×n).
* ``act_scale`` (:class:`ActScales`): ``a_j = (1/N) Σ_t |x_tj|`` per distinct input; ASVD's scaling ``s = a^α``.
* ``fisher`` (:class:`FisherColumns`): ``F_j = Σ_i (1/B) Σ_b (∂L_b/∂W_ij)²`` per target; FWSVD's ``(√F)^α``.
* ``output_kl`` (:class:`OutputMetrics`): IO-SVD's output metric ``C_e`` (float64 m×m) per target.
* ``asvd_sensitivity`` (:class:`Sensitivity`): calibration perplexity with one target truncated to each
  candidate keep ratio.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .io import load_tensors
from .whitening import WhiteningFactor, whitening_factor

__all__ = ["InputGrams", "ActScales", "FisherColumns", "OutputMetrics", "Sensitivity", "DEFAULT_OUTPUT_DAMPING",
           "check_alpha", "check_damping", "STAT_LOADERS", "load_stat"]

DEFAULT_OUTPUT_DAMPING = 1e-2  # relative: C + λ tr(C)/m I


@dataclass
class InputGrams:
    """Second moments ``C = XᵀX/N`` per shared-input group, and which targets read each group.

    ``C[group]`` is float64 n×n; ``group_of[target]`` names the group; ``tokens[group]`` is N.
    """

    C: dict[str, torch.Tensor]
    group_of: dict[str, str]
    tokens: dict[str, int]
    _factors: dict = field(default_factory=dict, repr=False, compare=False)
    factor_methods: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def for_target(self, name: str) -> torch.Tensor:
        if name not in self.group_of:
            raise KeyError(f"no input statistics for target {name!r}; recompute the calibration statistics of "
                           "this model (they belong to another model or an older run)")
        return self.C[self.group_of[name]]

    def factor_for(self, name: str, damping: float, device: torch.device | str = "cpu") -> WhiteningFactor:
        """The whitening factor of ``name``'s input group, computed once per group and cached."""
        group = self.group_of.get(name)
        key = (group, damping, str(device))
        if key not in self._factors:
            self._factors.clear()  # one group at a time: targets come in block order, a group's use is contiguous
            self._factors[key] = whitening_factor(self.for_target(name).to(device), damping=damping)
            self.factor_methods[group] = self._factors[key].method  # cholesky / jitter / eig_clamp, for reports
        return self._factors[key]

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Flat float32 tensors + metadata, for :func:`lowrank.io.save_tensors`."""
        tensors = {f"C.{g}": c.to(torch.float32) for g, c in self.C.items()}
        return tensors, {"kind": "input_gram", "group_of": self.group_of, "tokens": self.tokens}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "InputGrams":
        C = {k[2:]: v.to(torch.float64) for k, v in tensors.items() if k.startswith("C.")}
        return cls(C=C, group_of=dict(meta["group_of"]), tokens={k: int(v) for k, v in meta["tokens"].items()})


def check_alpha(alpha: float, kind: str) -> float:
    """``alpha`` as a float, or a ``ValueError`` naming ``statistics.<kind>.alpha`` unless finite and >= 0."""
    alpha = float(alpha)
    if not (alpha >= 0 and alpha == alpha and alpha != float("inf")):
        raise ValueError(f"statistics.{kind}.alpha must be a finite number >= 0, got {alpha}")
    return alpha


@dataclass
class ActScales:
    """ASVD's activation statistic: mean absolute input per channel, per shared-input group.

    ``mean_abs[group]`` is float64 (n,), ``a_j = (1/N) Σ_t |x_tj|``; ``group_of[target]`` names the group;
    ``tokens[group]`` is N; ``alpha`` is ASVD's exponent, so the scaling of a target is ``s = a^α``
    (:meth:`scale_for`). ``α = 0`` gives ``s = 1`` (plain SVD); ASVD's default is 0.5.
    """

    mean_abs: dict[str, torch.Tensor]
    group_of: dict[str, str]
    tokens: dict[str, int]
    alpha: float = 0.5

    def __post_init__(self) -> None:
        self.alpha = check_alpha(self.alpha, "act_scale")

    def scale_for(self, name: str) -> torch.Tensor:
        """``s = a^α`` (float64, n) of target ``name``'s input channels."""
        if name not in self.group_of:
            raise KeyError(f"no activation scales for target {name!r}; recompute the calibration statistics of "
                           "this model (they belong to another model or an older run)")
        return self.mean_abs[self.group_of[name]].pow(self.alpha)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"mean_abs.{g}": a.to(torch.float32) for g, a in self.mean_abs.items()}
        return tensors, {"kind": "act_scale", "group_of": self.group_of, "tokens": self.tokens,
                         "alpha": self.alpha}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "ActScales":
        p = "mean_abs."
        mean_abs = {k[len(p):]: v.to(torch.float64) for k, v in tensors.items() if k.startswith(p)}
        return cls(mean_abs=mean_abs, group_of=dict(meta["group_of"]),
                   tokens={k: int(v) for k, v in meta["tokens"].items()}, alpha=float(meta["alpha"]))


@dataclass
class FisherColumns:
    """FWSVD's statistic: empirical Fisher information of each target collapsed onto its input columns.

    ``F[target]`` is float64 (n,), ``F_j = Σ_i (1/B) Σ_b (∂L_b/∂W_ij)²`` (``L_b`` the token-mean loss of
    calibration batch ``b``, ``B`` batches). The importance of input column ``j`` is ``d_j = √F_j`` (Hsu et al.'s
    row importance, in their in×out layout) and the scaling is ``d^α`` (:meth:`scale_for`); ``α = 1`` is the
    paper's form, ASVD's code uses 0.5.
    """

    F: dict[str, torch.Tensor]
    batches: int
    tokens: int
    alpha: float = 1.0
    loss: float | None = None

    def __post_init__(self) -> None:
        self.alpha = check_alpha(self.alpha, "fisher")

    def scale_for(self, name: str) -> torch.Tensor:
        """``d^α = F^{α/2}`` (float64, n) of target ``name``'s input columns."""
        if name not in self.F:
            raise KeyError(f"no Fisher information for target {name!r}; recompute the calibration statistics of "
                           "this model (they belong to another model or an older run)")
        return self.F[name].sqrt().pow(self.alpha)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"F.{n}": f.to(torch.float32) for n, f in self.F.items()}
        return tensors, {"kind": "fisher", "batches": self.batches, "tokens": self.tokens, "alpha": self.alpha,
                         "loss": self.loss}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "FisherColumns":
        F = {k[2:]: v.to(torch.float64) for k, v in tensors.items() if k.startswith("F.")}
        return cls(F=F, batches=int(meta["batches"]), tokens=int(meta["tokens"]), alpha=float(meta["alpha"]),
                   loss=meta.get("loss"))


def check_damping(damping: float) -> float:
    """``damping`` as a float, or a ``ValueError`` naming ``statistics.output_kl.damping`` unless finite and >= 0."""
    damping = float(damping)
    if not (damping >= 0 and damping != float("inf")):
        raise ValueError(f"statistics.output_kl.damping must be a finite number >= 0, got {damping}")
    return damping


@dataclass
class OutputMetrics:
    """``C[target]`` (float64 m×m) per target output, the number of positions ``N``, K, and the relative damping.

    ``damping`` λ is a property of the space (like ASVD's α), stored with the statistic: the output factor is the
    lower-triangular ``L_o`` with ``L_o L_oᵀ = C + λ (tr C / m) I`` (:meth:`factor_for`).
    """

    C: dict[str, torch.Tensor]
    tokens: int
    top_k: int
    damping: float = DEFAULT_OUTPUT_DAMPING
    windows: int = 0
    _factors: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.damping = check_damping(self.damping)

    def for_target(self, name: str) -> torch.Tensor:
        if name not in self.C:
            raise KeyError(f"no output metric for target {name!r}; recompute the output_kl statistics of this "
                           "model (they belong to another model or an older run)")
        return self.C[name]

    def factor_for(self, name: str, device: torch.device | str = "cpu") -> WhiteningFactor:
        """``L_o`` of target ``name`` (lower triangular, float64), cached for the last target asked."""
        key = (name, self.damping, str(device))
        if key not in self._factors:
            self._factors.clear()
            self._factors[key] = whitening_factor(self.for_target(name).to(device), damping=self.damping)
        return self._factors[key]

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"C.{n}": c.to(torch.float32) for n, c in self.C.items()}
        return tensors, {"kind": "output_kl", "tokens": self.tokens, "top_k": self.top_k, "damping": self.damping,
                         "windows": self.windows}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "OutputMetrics":
        C = {k[2:]: v.to(torch.float64) for k, v in tensors.items() if k.startswith("C.")}
        return cls(C=C, tokens=int(meta["tokens"]), top_k=int(meta["top_k"]), damping=float(meta["damping"]),
                   windows=int(meta.get("windows", 0)))


@dataclass
class Sensitivity:
    """``ppl[target][j]``: calibration perplexity with only ``target`` truncated to keep ratio ``ratios[j]``."""

    ppl: dict[str, torch.Tensor]
    ratios: tuple[float, ...]
    dense_ppl: float
    tokens: int
    whitening: str

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"ppl.{n}": p.to(torch.float64) for n, p in self.ppl.items()}
        return tensors, {"kind": "asvd_sensitivity", "ratios": list(self.ratios), "dense_ppl": self.dense_ppl,
                         "tokens": self.tokens, "whitening": self.whitening}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "Sensitivity":
        ppl = {k[4:]: v.to(torch.float64) for k, v in tensors.items() if k.startswith("ppl.")}
        return cls(ppl=ppl, ratios=tuple(float(r) for r in meta["ratios"]), dense_ppl=float(meta["dense_ppl"]),
                   tokens=int(meta["tokens"]), whitening=str(meta["whitening"]))


# the registry: statistic kind -> from_tensors(tensors, metadata), the inverse of to_tensors()
STAT_LOADERS: dict[str, Callable[[dict[str, torch.Tensor], dict[str, Any]], Any]] = {
    "input_gram": InputGrams.from_tensors,
    "act_scale": ActScales.from_tensors,
    "fisher": FisherColumns.from_tensors,
    "asvd_sensitivity": Sensitivity.from_tensors,
    "output_kl": OutputMetrics.from_tensors,
}


def load_stat(path: str | os.PathLike) -> Any:
    """Load a statistics file written from ``to_tensors()``; its kind is read from the file's metadata."""
    tensors, meta = load_tensors(path)
    kind = meta.get("kind")
    if kind not in STAT_LOADERS:
        raise ValueError(f"{path}: unknown statistics kind {kind!r}; recompute it with this version of lowrank")
    return STAT_LOADERS[kind](tensors, meta)

"""Typed, frozen recipes: one ``methods.<name>`` entry of the config as a :class:`Recipe`.

:meth:`Recipe.from_dict` builds it once from the (schema-validated) dict and holds every rule that relates two
fields of a recipe, each a ``ValueError`` naming the recipe and the fix:

* a greedy allocator (``zero_sum``, ``min_abs``: :data:`lowrank.allocation.GREEDY_ALLOCATORS`) ranks components
  across matrices by their predicted loss change, so it needs a loss-change scorer, not ``sigma``;
* ``allocation_stages`` (progressive allocation) re-scores from per-component statistics between greedy
  allocations under the parameter budget: a greedy allocator, a ``from_components`` scorer, no quantize;
* a quantize stage's ranks are allocated under the byte budget by a greedy allocator, and it excludes rehab (which
  fine-tunes float factors) and correction stages;
* prehab shapes the spectrum of ``W S`` in a statistics space, so it needs a whitening that reads one;
* a refine stage excludes quantize and rehab (:func:`lowrank.refine.check_recipe`).

Single-field ranges (enums, minima) are the schema's; :meth:`Recipe.from_dict` fills the schema's defaults for
a partial dict, so a test or a notebook can build one from ``{"scorer": ..., "allocator": ...}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .allocation import ALLOCATORS, GREEDY_ALLOCATORS
from .correction import CorrectionConfig
from .quantization import QuantizeConfig
from .refine import RefineConfig, check_recipe
from .rehab import RehabConfig
from .scoring import SCORERS
from .spaces import SPACES

__all__ = ["Recipe"]


def _section(cls: type, name: str, recipe: str, values: dict[str, Any] | None) -> Any:
    """``cls(**values)``, or a ``ValueError`` naming an unknown key of the recipe's ``name`` section."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"method {recipe!r}: unknown {name} keys {unknown}; known: {sorted(known)}")
    return cls(**values)


def _prehab_value(name: str, value: Any) -> bool | str:
    """``prehab``: true / false, or ``control`` (the prehab run's λ = 0 twin: the same steps on the same batches,
    CE only, so a prehab row's gain over its control is the rank surrogate's own effect)."""
    if value == "control" or isinstance(value, bool):
        return value
    raise ValueError(f"method {name!r}: prehab {value!r} must be true, false or control")


@dataclass(frozen=True)
class Recipe:
    """One compression recipe: the space (``whitening``), the per-component ``scorer``, the rank ``allocator``
    (with its ``min_rank_fraction`` floor), and the optional stages around the truncation, each a frozen config of
    the module that runs it (:class:`lowrank.correction.CorrectionConfig`, :class:`lowrank.quantization.
    QuantizeConfig`, :class:`lowrank.rehab.RehabConfig`, :class:`lowrank.refine.RefineConfig`), which the stage's
    script builds from its own config slice."""

    name: str
    scorer: str
    allocator: str
    whitening: str = "none"
    min_rank_fraction: float = 0.0
    allocation_stages: tuple[float, ...] = ()  # progressive allocation (lowrank.scoring.progressive_allocation)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    prehab: bool | str = False  # True: the prehab model; "control": the same run with λ = 0 (plain fine-tune)
    rehab: RehabConfig = field(default_factory=RehabConfig)
    refine: RefineConfig | None = None  # None: no refine stage

    @property
    def source(self) -> str:
        """The model the recipe compresses: ``prehab``, its λ = 0 control ``prehab-control``, or ``pretrained``."""
        if self.prehab == "control":
            return "prehab-control"
        return "prehab" if self.prehab else "pretrained"

    @property
    def allocation_key(self) -> tuple[Any, ...]:
        """Everything the rank allocation reads from the recipe: the model it scores (``source``), the space, the
        scorer, the allocator and its floor, the progressive stages and the budget's unit (the int8 layout's bytes
        or parameters). Two recipes with equal keys get the same ranks at every kept fraction (the stages after
        the allocation, correction / refine / rehab, do not enter it), so one allocation serves both."""
        return (self.source, self.whitening, self.scorer, self.allocator, self.min_rank_fraction,
                self.allocation_stages, self.quantize.mode)

    @property
    def greedy(self) -> bool:
        return ALLOCATORS[self.allocator].greedy

    @classmethod
    def from_dict(cls, name: str, spec: dict[str, Any]) -> "Recipe":
        """The recipe ``methods.<name>`` of the config, checked (see the module docstring)."""
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"method {name!r}: unknown keys {unknown}; known: {sorted(known)}")
        for key, registry in (("scorer", SCORERS), ("allocator", ALLOCATORS), ("whitening", SPACES)):
            value = spec.get(key, "none" if key == "whitening" else None)
            if value not in registry:
                raise ValueError(f"method {name!r}: {key} {value!r} is not one of {sorted(registry)}")
        recipe = cls(name=name, scorer=spec["scorer"], allocator=spec["allocator"],
                     whitening=spec.get("whitening", "none"),
                     min_rank_fraction=float(spec.get("min_rank_fraction", 0.0)),
                     allocation_stages=tuple(float(x) for x in spec.get("allocation_stages", ())),
                     correction=_section(CorrectionConfig, "correction", name, spec.get("correction")),
                     quantize=_section(QuantizeConfig, "quantize", name, spec.get("quantize")),
                     prehab=_prehab_value(name, spec.get("prehab", False)),
                     rehab=_section(RehabConfig, "rehab", name, spec.get("rehab")),
                     refine=check_recipe(name, spec))
        recipe._check()
        return recipe

    def _check(self) -> None:
        name = self.name
        if self.greedy and self.scorer == "sigma":
            raise ValueError(f"method {name!r}: allocator {self.allocator!r} ranks components across matrices by "
                             "their predicted loss change; use scorer first_order or second_order (sigma values "
                             "of different matrices are not comparable)")
        mode = self.quantize.mode
        if self.allocation_stages:
            sc = SCORERS[self.scorer]
            if not self.greedy or sc.from_components is None or mode != "none":
                raise ValueError(f"method {name!r}: allocation_stages re-score the kept components between greedy "
                                 f"allocations from per-component statistics under the parameter budget; it needs "
                                 f"a greedy allocator (not {self.allocator!r}), a scorer among "
                                 f"{sorted(n for n, v in SCORERS.items() if v.from_components)} (not "
                                 f"{self.scorer!r}) and no quantize stage")
        if mode != "none":
            if self.allocator not in GREEDY_ALLOCATORS:
                raise ValueError(f"method {name!r}: quantize.mode {mode!r} allocates ranks under the byte "
                                 f"budget with a greedy allocator; set allocator to zero_sum or min_abs (not "
                                 f"{self.allocator!r})")
            if self.rehab.steps > 0:
                raise ValueError(f"method {name!r}: rehab fine-tunes float factors, which the quantize stage "
                                 "replaces; set rehab.steps to 0 or remove quantize")
            if self.correction.stages > 0:
                raise ValueError(f"method {name!r}: quantize after correction stages is not supported; set "
                                 "correction.stages to 0 or remove quantize")
        if self.prehab and SPACES[self.whitening].stat is None:  # the control too: same source, λ = 0
            raise ValueError(f"method {name!r} has prehab: true but whitening {self.whitening!r}, which reads no "
                             "calibration statistics: prehab shapes the spectrum of W S in the input_gram space, "
                             "so compress it there. Set whitening: input_gram (or drop prehab from the recipe)")

"""lowrank.recipes: a recipe built once from its config dict, frozen, with every rule between its fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from lowrank.recipes import Recipe

FULL = Path(__file__).resolve().parents[2] / "config" / "full.yaml"


def test_a_partial_dict_takes_the_schema_defaults() -> None:
    r = Recipe.from_dict("zs", {"whitening": "input_gram", "scorer": "first_order", "allocator": "zero_sum"})
    assert (r.name, r.whitening, r.scorer, r.allocator, r.min_rank_fraction) == ("zs", "input_gram", "first_order",
                                                                                 "zero_sum", 0.0)
    assert r.allocation_stages == ()
    assert Recipe.from_dict("p", {"scorer": "tail_curvature", "allocator": "zero_sum",
                                  "allocation_stages": [0.6]}).allocation_stages == (0.6,)
    assert (r.correction.stages, r.correction.windows, r.correction.batch_size, r.correction.backtrack) == (0, 4, 2, 3)
    assert (r.quantize.mode, r.rehab.steps, r.refine, r.prehab, r.source, r.greedy) == ("none", 0, None, False,
                                                                                         "pretrained", True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.scorer = "sigma"  # type: ignore[misc]


def test_every_recipe_of_the_full_config_builds() -> None:
    methods = yaml.safe_load(FULL.read_text())["methods"]
    recipes = {name: Recipe.from_dict(name, m) for name, m in methods.items()}
    assert len(recipes) == len(methods) >= 10
    assert {r.source for r in recipes.values()} == {"pretrained", "prehab", "prehab-control"}
    assert any(r.refine is not None and r.refine.mode == "closed_form" for r in recipes.values())
    assert any(r.quantize.mode == "loss_aware" for r in recipes.values())


@pytest.mark.parametrize("spec, message", [
    ({"scorer": "sigma", "allocator": "zero_sum"}, "use scorer first_order or second_order"),
    ({"scorer": "first_order", "allocator": "uniform", "quantize": {"mode": "remap"}},
     "set allocator to zero_sum or min_abs"),
    ({"scorer": "first_order", "allocator": "zero_sum", "quantize": {"mode": "hq"}, "rehab": {"steps": 2}},
     "set rehab.steps to 0 or remove quantize"),
    ({"scorer": "first_order", "allocator": "zero_sum", "quantize": {"mode": "hq"}, "correction": {"stages": 1}},
     "set correction.stages to 0 or remove quantize"),
    ({"scorer": "sigma", "allocator": "uniform", "prehab": True}, "Set whitening: input_gram"),
    ({"scorer": "sigma", "allocator": "uniform", "refine": {"mode": "closed_form"}, "rehab": {"steps": 1}},
     "keep one of them"),
    ({"scorer": "sigma", "allocator": "uniform", "quantise": {}}, "unknown keys \\['quantise'\\]"),
    ({"scorer": "sigma", "allocator": "uniform", "rehab": {"step": 1}}, "unknown rehab keys"),
    ({"scorer": "sigma", "allocator": "greedy"}, "allocator 'greedy' is not one of"),
    ({"scorer": "tail_curvature", "allocator": "uniform", "allocation_stages": [0.6]}, "needs a greedy allocator"),
    ({"scorer": "first_order", "allocator": "zero_sum", "allocation_stages": [0.6]}, "not 'first_order'"),
    ({"scorer": "tail_curvature", "allocator": "zero_sum", "allocation_stages": [0.6], "quantize": {"mode": "remap"}},
     "no quantize stage"),
])
def test_a_rule_between_fields_names_the_recipe_and_the_fix(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as e:
        Recipe.from_dict("bad", spec)
    assert "'bad'" in str(e.value)


def test_prehab_names_its_source_and_a_bad_value_is_named() -> None:
    base = {"whitening": "input_gram", "scorer": "sigma", "allocator": "uniform"}
    assert [Recipe.from_dict("p", {**base, "prehab": v}).source for v in (False, True, "control")] == [
        "pretrained", "prehab", "prehab-control"]
    with pytest.raises(ValueError, match="prehab 'yes' must be true, false or control"):
        Recipe.from_dict("p", {**base, "prehab": "yes"})
    with pytest.raises(ValueError, match="has prehab: true but whitening 'none'"):
        Recipe.from_dict("p", {**base, "whitening": "none", "prehab": "control"})


def test_allocation_key_follows_what_the_allocation_reads() -> None:
    """Recipes that differ only after the allocation (correction, refine, rehab) share one allocation; any field the
    allocate job reads (source, space, scorer, allocator, floor, stages, the budget's unit) separates them."""
    base = {"whitening": "input_gram", "scorer": "tail_curvature", "allocator": "zero_sum"}
    key = Recipe.from_dict("zs", base).allocation_key
    for after in ({"correction": {"stages": 1}}, {"refine": {"mode": "closed_form", "polish_steps": 8}},
                  {"rehab": {"steps": 4}}):
        assert Recipe.from_dict("zs-x", {**base, **after}).allocation_key == key
    for changed in ({"whitening": "none"}, {"scorer": "first_order"}, {"allocator": "min_abs"},
                    {"min_rank_fraction": 0.1}, {"allocation_stages": [0.6]}, {"quantize": {"mode": "remap"}},
                    {"prehab": True}, {"prehab": "control"}):
        assert Recipe.from_dict("zs-y", {**base, **changed}).allocation_key != key, changed
    methods = yaml.safe_load(FULL.read_text())["methods"]
    keys = {n: Recipe.from_dict(n, m).allocation_key for n, m in methods.items()}
    assert keys["zs-svd-refine"] == keys["zs-svd-corr"] == keys["zs-svd"] != keys["zs-svd-paper"]
    assert keys["svd-llm-refine"] == keys["svd-llm"] != keys["prehab-svd-llm"]

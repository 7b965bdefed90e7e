"""lm-eval's `hf` model type loads a lowrank HF folder by path once lowrank is imported, and scores with its factors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lowrank.allocation import allocate
from lowrank.factorized import LowRankLinear
from lowrank.hf_format import save_hf_folder
from lowrank.model import find_targets
from lowrank.truncation import truncate_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
from wf import write_byte_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow


def test_lm_eval_hf_loads_the_folder_by_path(tiny_llama, tmp_path) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    targets = find_targets(tiny_llama)
    ranks = allocate("uniform", {t.name: t.shape for t in targets}, 0.5).ranks
    truncate_model(tiny_llama, targets, ranks, "none", {}, damping=1e-6)
    tok = AutoTokenizer.from_pretrained(str(write_byte_tokenizer(tmp_path / "tok")))
    folder = save_hf_folder(tiny_llama, tmp_path / "hf", tokenizer=tok)
    lm = HFLM(pretrained=str(folder), device="cpu", batch_size=2)
    assert sum(isinstance(m, LowRankLinear) for m in lm.model.modules()) == len(targets)
    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("the king", " rose"), 0)])
    ctx, cont = tok("the king").input_ids, tok(" rose").input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(tiny_llama(input_ids=ids).logits[0, :-1].double(), -1)
    expected = float(lp[torch.arange(len(ctx) - 1, ids.shape[1] - 1), ids[0, len(ctx):]].sum())
    assert ll == pytest.approx(expected, abs=1e-4)

"""lowrank.zeroshot through lm-eval itself: accuracy of a low-rank model vs a direct computation, task errors.

Marked slow: importing lm-eval and indexing its ~14k task definitions takes 5-10 s per test on 2 cores.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from lowrank.factorized import LowRankLinear
from lowrank.model import replace_module
from lowrank.zeroshot import (NEXT_LINE_TASK, check_tasks, evaluate_zeroshot, next_line_items, task_manager,
                              write_items)

pytestmark = pytest.mark.slow

WORDS = "the king queen castle sword night rose river stone light dark crown ghost storm sea fire".split()


def _text(n: int = 400, seed: int = 1) -> str:
    r = random.Random(seed)
    return "\n".join(" ".join(r.choice(WORDS) for _ in range(r.randint(4, 10))) for _ in range(n))


def _byte_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=alphabet[0]).save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


@torch.no_grad()
def _reference_accuracy(model, tok, items) -> float:
    """argmax_j Σ log p(choice_j tokens | context) computed directly, lm-eval's `acc` definition."""
    hits = 0
    for it in items:
        ctx = tok(it["context"] + "\n").input_ids
        scores = []
        for choice in it["choices"]:
            cont = tok(" " + choice).input_ids
            ids = torch.tensor([ctx + cont])
            lp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            scores.append(float(lp[len(ctx) - 1 :].gather(-1, ids[0, len(ctx) :, None]).sum()))
        hits += int(max(range(len(scores)), key=scores.__getitem__) == it["label"])
    return hits / len(items)


def test_lm_eval_accuracy_of_a_low_rank_model_equals_a_direct_computation(tiny_llama, tmp_path) -> None:
    tok = _byte_tokenizer(tmp_path / "tok")
    model = copy.deepcopy(tiny_llama)
    # one target factored, so the wrapper evaluates LowRankLinear layers as they are
    lin = model.model.layers[0].mlp.up_proj
    U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    replace_module(model, "model.layers.0.mlp.up_proj", LowRankLinear.from_factors(U[:, :8] * S[:8], Vh[:8]))
    items = next_line_items(_text(), 10, context_lines=1, n_choices=3, seed=0)
    write_items(tmp_path / "items.jsonl", items)
    out = evaluate_zeroshot(model, tok, [NEXT_LINE_TASK], {NEXT_LINE_TASK: str(tmp_path / "items.jsonl")},
                            batch_size=4, max_length=128)
    res = out[NEXT_LINE_TASK]
    assert res["n"] == 10
    assert res["acc"] == pytest.approx(_reference_accuracy(model, tok, items))
    assert res["acc_stderr"] == pytest.approx((res["acc"] * (1 - res["acc"]) / 9) ** 0.5)


def test_unknown_task_is_named_with_suggestions(tmp_path) -> None:
    manager = task_manager({}, tmp_path)
    with pytest.raises(ValueError, match=r"unknown lm-eval task 'arc_easyy'.*arc_easy"):
        check_tasks(["arc_easyy"], manager)


def test_paper_task_without_its_data_offline_says_how_to_provide_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = task_manager({}, tmp_path)
    try:
        check_tasks(["arc_easy"], manager)
    except RuntimeError as e:
        msg = str(e)
        assert "'arc_easy'" in msg and "allenai/ai2_arc" in msg and "evaluation.zeroshot.tasks" in msg
    else:
        pytest.skip("arc_easy's data is in this machine's datasets cache")

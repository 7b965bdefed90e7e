"""Shared fixtures of the unit tests: tiny, seeded, randomly initialised causal LMs on CPU.

The models are built from a transformers config (no download, no tokenizer): a LLaMA-shaped one (hidden 64,
intermediate 128, 2 blocks, 4 heads, 2 KV heads, vocab 256: tests/data/tiny.yaml's, the workflow tests' model) and
a GPT-2 one (``Conv1D`` projections). Each is built once per session; tests get a deep copy, so in-place
compression never leaks between tests. :func:`target_inputs` is the reference capture of the targets' inputs that
the streamed (block-by-block) collectors are tested against.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ.setdefault("LOWRANK_NO_PROGRESS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

# Tiny matrices: one intra-op thread is fastest, and it avoids 10-40x slow-downs of small SVDs / Choleskys when
# the cores are shared (parallel Snakemake jobs, CI runners).
torch.set_num_threads(int(os.environ.get("LOWRANK_TEST_THREADS", "1")))

# the one tiny LLaMA of the tests: the model of the workflow tests' tiny.yaml (tests/workflow/wf.py runs the DAG on
# it; tests/workflow/test_cli.py saves it as a Hugging Face folder), built here for the unit tests
TINY_LLAMA_CONFIG: dict = yaml.safe_load((Path(__file__).parent / "data" / "tiny.yaml").read_text())[
    "models"]["tiny-llama"]["config"]
TINY_GPT2_CONFIG = {
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "n_positions": 64,
    "vocab_size": 128,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
LLAMA_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def build_model(model_type: str, config: dict, seed: int = 0) -> torch.nn.Module:
    """A seeded random-init model through the package's own source loader (float32, eval, CPU)."""
    from lowrank.model import load_source, resolve_source

    model, tok = load_source(resolve_source({"source": "random_init", "model_type": model_type,
                                             "config": dict(config), "seed": seed}))
    assert tok is None
    return model


def build_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    return build_model("llama", {**TINY_LLAMA_CONFIG, **overrides}, seed)


def target_inputs(model: torch.nn.Module, windows: torch.Tensor, names: list[str] | None = None
                  ) -> dict[str, torch.Tensor]:
    """The reference input capture: each target's input ``X`` ([N, n], float64, ``N`` = tokens) from forward hooks
    on one ordinary whole-model forward (no grad, no KV cache); ``names``: these targets (default: every one)."""
    from lowrank.model import find_targets

    xs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name in names if names is not None else [t.name for t in find_targets(model)]:
        def hook(_mod, args, _out, name=name):
            xs.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in xs.items()}


@pytest.fixture(scope="session")
def _llama_base() -> torch.nn.Module:
    return build_llama()


@pytest.fixture(scope="session")
def _gpt2_base() -> torch.nn.Module:
    return build_model("gpt2", TINY_GPT2_CONFIG)


@pytest.fixture
def tiny_llama(_llama_base) -> torch.nn.Module:
    """A private copy of the tiny LLaMA (tie_word_embeddings=False)."""
    return copy.deepcopy(_llama_base)


@pytest.fixture
def tiny_gpt2(_gpt2_base) -> torch.nn.Module:
    return copy.deepcopy(_gpt2_base)


@pytest.fixture(scope="session")
def make_llama():
    """Factory of fresh tiny LLaMAs: ``make_llama(seed=0, **config_overrides)``."""
    return build_llama


@pytest.fixture
def tiny_llama_spec() -> dict:
    """The ``models.<key>`` entry of the tiny LLaMA (a fresh dict per test)."""
    return {"source": "random_init", "model_type": "llama", "config": dict(TINY_LLAMA_CONFIG), "seed": 0}


@pytest.fixture(scope="session")
def llama_projections() -> tuple[str, ...]:
    """The 7 target projections of a LLaMA block, relative to the block."""
    return LLAMA_PROJECTIONS


@pytest.fixture
def token_windows() -> torch.Tensor:
    """Four seeded windows of 16 random token ids (LongTensor[4, 16]) valid for both tiny vocabularies."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 128, (4, 16), generator=g)


@pytest.fixture
def cpu() -> torch.device:
    return torch.device("cpu")

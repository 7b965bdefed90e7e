"""Every common decoder architecture, found by structure; the FWSVD and ASVD scalings.

Tiny randomly initialised configs of Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3, GPT-2 and OPT:
structural discovery lists exactly the expected targets (fused projections, ``Conv1D``, biases, tied embeddings
left alone); block-streamed statistics equal those of an ordinary forward (so the block catcher passes each
architecture's masks, rotary tables and positional arguments); full-rank truncation in every whitening space
reproduces the logits; FWSVD with a uniform Fisher and ASVD with α = 0 are plain SVD.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lowrank.accounting import TargetShape
from lowrank.calibration import (
    STAT_LOADERS,
    STATS,
    ActScales,
    FisherColumns,
    capture_block_inputs,
    collect_act_scales,
    collect_fisher,
    collect_input_grams,
    load_stat,
    stream_blocks,
)
from lowrank.factorized import LowRankLinear
from lowrank.io import save_tensors
from lowrank.model import find_blocks, find_targets, linear_bias, linear_weight, load_source, resolve_source
from lowrank.output_metric import collect_output_kl
from lowrank.refine import RefineConfig, refine_model
from lowrank.spaces import SPACES, diagonal_scaling, input_factor
from lowrank.truncation import truncate, truncate_model

from conftest import target_inputs

ARCH_FILE = Path(__file__).resolve().parents[1] / "data" / "architectures.yaml"
SPECS: dict[str, dict] = yaml.safe_load(ARCH_FILE.read_text())  # key -> models.<key> entry (random_init)

# key -> (blocks path, tied embeddings, per-block targets as (relative name, m, n, bias)), in module order
_GQA = [("self_attn.q_proj", 32, 32), ("self_attn.k_proj", 16, 32), ("self_attn.v_proj", 16, 32),
        ("self_attn.o_proj", 32, 32), ("mlp.gate_proj", 64, 32), ("mlp.up_proj", 64, 32), ("mlp.down_proj", 32, 64)]
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
ARCHS: dict[str, tuple[str, bool, list[tuple[str, int, int, bool]]]] = {
    "llama": ("model.layers", False, [(n, m, k, False) for n, m, k in _GQA]),
    "mistral": ("model.layers", False, [(n, m, k, False) for n, m, k in _GQA]),
    "qwen2": ("model.layers", True, [(n, m, k, n in _QKV) for n, m, k in _GQA]),  # biases on q/k/v only
    "qwen3": ("model.layers", False, [(n, m, k, False) for n, m, k in _GQA]),
    "gemma2": ("model.layers", True, [(n, m, k, False) for n, m, k in _GQA]),
    "gemma3": ("model.layers", True, [(n, m, k, False) for n, m, k in _GQA]),
    # fused projections are one target each
    "phi3": ("model.layers", False, [("self_attn.o_proj", 32, 32, False),
                                     ("self_attn.qkv_proj", 32 + 2 * 16, 32, False),
                                     ("mlp.gate_up_proj", 2 * 64, 32, False), ("mlp.down_proj", 32, 64, False)]),
    # Conv1D stores Wᵀ; the shapes are in the y = W x orientation
    "gpt2": ("transformer.h", True, [("attn.c_attn", 96, 32, True), ("attn.c_proj", 32, 32, True),
                                     ("mlp.c_fc", 128, 32, True), ("mlp.c_proj", 32, 128, True)]),
    # project_in / project_out are linears outside the blocks: never targets
    "opt": ("model.decoder.layers", True, [("self_attn.k_proj", 32, 32, True), ("self_attn.v_proj", 32, 32, True),
                                           ("self_attn.q_proj", 32, 32, True), ("self_attn.out_proj", 32, 32, True),
                                           ("fc1", 64, 32, True), ("fc2", 32, 64, True)]),
}
# targets that read the same input tensor in one block (grouped by identity during the forward)
SHARED_INPUTS = {
    "opt": [("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj")],
    "gpt2": [],
    "phi3": [],
}
_DEFAULT_SHARED = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")]

CPU = torch.device("cpu")
# Full-rank factors are exact in float64; cast to float32 and multiplied in float32, each matrix is off by
# ~1e-7 relative. Through 2 blocks the tiny models' logits (|logit| ~ 0.1-1) move by at most a few 1e-6; the
# whitened spaces add the conditioning of S (ASVD's scales and the Grams of 192 tokens are mild), hence 1e-4.
LOGIT_ATOL = 1e-4


def build(key: str) -> nn.Module:
    model, _ = load_source(resolve_source(dict(SPECS[key])))
    return model


def windows(n: int = 8, T: int = 24, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 256, (n, T), generator=torch.Generator().manual_seed(seed))


def test_every_architecture_file_entry_is_tested() -> None:
    assert set(SPECS) == set(ARCHS)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request) -> dict:
    """One architecture: the model, calibration windows and all three statistics (computed once per module)."""
    mt = request.param
    model = build(mt)
    w = windows()
    stats = {"input_gram": collect_input_grams(model, w, 4, CPU, precision="float64"),
             "act_scale": collect_act_scales(model, w, 4, CPU, alpha=0.5),
             "fisher": collect_fisher(model, w, 4, CPU, alpha=1.0, max_windows=4),
             "output_kl": collect_output_kl(model, w, 4, CPU, top_k=3, max_windows=2)}
    with torch.no_grad():
        logits = model(input_ids=w).logits
    return {"type": mt, "model": model, "windows": w, "stats": stats, "logits": logits}


# ---- structural discovery -----------------------------------------------------------------------------------


def test_structural_discovery_lists_exactly_the_expected_targets(arch) -> None:
    model, mt = arch["model"], arch["type"]
    path, tied, per_block = ARCHS[mt]
    prefix, blocks = find_blocks(model)
    assert prefix == path and len(blocks) == 2
    expected = [(f"{path}.{b}.{rel}", b, TargetShape(m, n, bias)) for b in range(2) for rel, m, n, bias in per_block]
    got = [(t.name, t.block, t.shape) for t in find_targets(model)]
    assert got == expected
    for name, _, shape in expected:  # the recorded shape is the y = W x orientation, also for Conv1D
        mod = model.get_submodule(name)
        assert tuple(linear_weight(mod).shape) == (shape.m, shape.n)
        assert (linear_bias(mod) is not None) == shape.bias
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert (head.weight.data_ptr() == emb.weight.data_ptr()) == tied
    names = {t[0] for t in expected}
    for mod_name, mod in model.named_modules():
        if mod is emb or mod is head:
            assert mod_name not in names


def test_streamed_statistics_equal_an_ordinary_forward(arch) -> None:
    """The catcher records each block's own call (masks, rotary tables, GPT-2's positional mask), so the
    streamed inputs of every target are those of the whole-model forward."""
    model, mt = arch["model"], arch["type"]
    direct = target_inputs(model, arch["windows"])
    grams, scales = arch["stats"]["input_gram"], arch["stats"]["act_scale"]
    assert set(direct) == set(grams.group_of) == set(scales.group_of)
    for name, X in direct.items():
        C = X.T @ X / X.shape[0]
        got = grams.for_target(name)
        assert float((got - C).abs().max()) <= 1e-10 * float(C.abs().max()), name
        torch.testing.assert_close(scales.mean_abs[scales.group_of[name]], X.abs().mean(0), rtol=1e-10, atol=0)
    path = ARCHS[mt][0]
    for b in range(2):
        for group in SHARED_INPUTS.get(mt, _DEFAULT_SHARED):
            heads = {grams.group_of[f"{path}.{b}.{g}"] for g in group}
            assert len(heads) == 1, group
    assert len(grams.C) == 2 * 4  # attention input, attention output, MLP input, MLP hidden


def test_stream_blocks_reproduces_the_last_block_output(arch) -> None:
    """Capture + streaming through every block gives the last block's output of an ordinary forward."""
    model, w = arch["model"], arch["windows"]
    _, blocks = find_blocks(model)
    seen: list[torch.Tensor] = []
    handles = [blocks[0].register_forward_pre_hook(lambda _m, a, k: seen.append(a[0] if a else k["hidden_states"]),
                                                   with_kwargs=True),
               blocks[-1].register_forward_hook(lambda _m, _a, o: seen.append(o[0] if isinstance(o, tuple) else o))]
    try:
        with torch.no_grad():
            model(input_ids=w, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    first, last = seen
    inputs = capture_block_inputs(model, w, 3, CPU)
    assert len(inputs.hidden) == 3  # batches of 3, 3 and 2
    torch.testing.assert_close(torch.cat(inputs.hidden), first, rtol=0, atol=0)
    stream_blocks(model, inputs, CPU)
    torch.testing.assert_close(torch.cat(inputs.hidden), last, rtol=1e-5, atol=1e-5)


# ---- full rank reproduces the model, in every space ----------------------------------------------------------


@pytest.mark.parametrize("space", sorted(SPACES))
def test_full_rank_truncation_reproduces_logits(arch, space) -> None:
    model = copy.deepcopy(arch["model"])
    targets = find_targets(model)
    emb_ptr = model.get_input_embeddings().weight.data_ptr()
    biases = {t.name: None if linear_bias(model.get_submodule(t.name)) is None
              else linear_bias(model.get_submodule(t.name)).detach().clone() for t in targets}
    ranks = {t.name: min(t.shape.m, t.shape.n) for t in targets}
    truncate_model(model, targets, ranks, space, arch["stats"])
    for t in targets:
        mod = model.get_submodule(t.name)
        assert isinstance(mod, LowRankLinear) and mod.rank == ranks[t.name]
        if biases[t.name] is not None:  # the bias is carried over exactly, on the up projection
            assert torch.equal(mod.up.bias, biases[t.name])
    # tied embeddings stay tied and untouched
    assert model.get_input_embeddings().weight.data_ptr() == emb_ptr
    assert (model.get_output_embeddings().weight.data_ptr() == emb_ptr) == ARCHS[arch["type"]][1]
    with torch.no_grad():
        out = model(input_ids=arch["windows"]).logits
    torch.testing.assert_close(out, arch["logits"], rtol=0, atol=LOGIT_ATOL)


# ---- block-local refinement on every architecture -------------------------------------------------------------


def test_refine_lowers_every_block_error_and_keeps_the_ranks(arch) -> None:
    """The refine stage (closed-form A then B, the Adam polish) walks each architecture's blocks with the
    compressed model's own inputs: every block's output error against the dense block drops, the ranks and the
    untouched parts (embeddings, norms, biases' place) stay, and the logits stay finite."""
    dense = arch["model"]
    model = copy.deepcopy(dense)
    targets = find_targets(model)
    ranks = {t.name: max(1, min(t.shape.m, t.shape.n) // 4) for t in targets}
    truncate_model(model, targets, ranks, "input_gram", arch["stats"], damping=1e-6)
    report = refine_model(model, dense, arch["windows"], RefineConfig(refit_b=True, b_anchor=1.0, polish_steps=4,
                                                                      lr=1e-3))
    assert len(report.blocks) == len(find_blocks(model))
    for b in report.blocks:
        assert b["error_after"] <= b["error_before"], (arch["type"], b)
    # a real gain: the sum of the block errors drops by 15-30 % on every architecture (measured; 5 % asked)
    assert sum(b["error_after"] for b in report.blocks) < 0.95 * sum(b["error_before"] for b in report.blocks)
    for t in targets:
        assert model.get_submodule(t.name).rank == ranks[t.name]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=arch["windows"]).logits).all()


# ---- FWSVD and ASVD: their scalings, and the limits that are plain SVD ---------------------------------------


def _factors_close(W: torch.Tensor, k: int, S: torch.Tensor | None, ref: torch.Tensor) -> None:
    f = truncate(W, k, S)
    got = f.A @ f.B
    assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max())


def test_fwsvd_with_uniform_fisher_equals_plain_svd(arch) -> None:
    model = arch["model"]
    fisher = arch["stats"]["fisher"]
    uniform = FisherColumns(F={n: torch.full_like(f, 3.7e-9) for n, f in fisher.F.items()}, batches=1, tokens=1,
                            alpha=1.0)
    for t in find_targets(model):
        W = linear_weight(model.get_submodule(t.name)).detach()
        k = max(1, min(t.shape.m, t.shape.n) // 3)
        plain = truncate(W, k)
        S = input_factor("fisher", t.name, {"fisher": uniform}, 1e-6)
        _factors_close(W, k, S, plain.A @ plain.B)


def test_asvd_with_alpha_zero_equals_plain_svd(arch) -> None:
    model = arch["model"]
    scales = arch["stats"]["act_scale"]
    flat = ActScales(mean_abs=scales.mean_abs, group_of=scales.group_of, tokens=scales.tokens, alpha=0.0)
    for t in find_targets(model):
        assert torch.equal(flat.scale_for(t.name), torch.ones(t.shape.n, dtype=torch.float64))
        W = linear_weight(model.get_submodule(t.name)).detach()
        k = max(1, min(t.shape.m, t.shape.n) // 3)
        plain = truncate(W, k)
        _factors_close(W, k, input_factor("act_scale", t.name, {"act_scale": flat}, 1e-6), plain.A @ plain.B)


def test_scaled_truncation_is_optimal_in_its_own_metric(arch) -> None:
    """Eckart–Young in the scaled metric: ASVD's and FWSVD's factors have a smaller ‖(W − W') S‖_F than plain
    SVD's at the same rank, and that error is exactly the discarded scaled energy."""
    model = arch["model"]
    for space in ("act_scale", "fisher"):
        for t in find_targets(model)[:4]:
            W = linear_weight(model.get_submodule(t.name)).detach().double()
            S = input_factor(space, t.name, arch["stats"], 1e-6)
            k = max(1, min(t.shape.m, t.shape.n) // 2)
            scaled, plain = truncate(W, k, S), truncate(W, k)
            err_scaled = float(((W - scaled.A @ scaled.B) @ S).norm() ** 2)
            err_plain = float(((W - plain.A @ plain.B) @ S).norm() ** 2)
            assert err_scaled == pytest.approx(scaled.discarded_energy(), rel=1e-8)
            assert err_scaled <= err_plain * (1 + 1e-9)


def test_fisher_columns_match_per_window_autograd() -> None:
    """F_j = Σ_i (1/B) Σ_b g_b,ij², with g_b the gradient of window b's token-mean loss (one window per backward)."""
    model = build("llama")
    w = windows(n=3, T=12, seed=9)
    fisher = collect_fisher(model, w, 8, CPU, alpha=1.0, max_windows=None, windows_per_backward=1)
    targets = find_targets(model)
    ref = {t.name: torch.zeros(t.shape.n, dtype=torch.float64) for t in targets}
    weights = [model.get_submodule(t.name).weight for t in targets]
    for b in range(3):
        for p in weights:
            p.requires_grad_(True)
        loss = model(input_ids=w[b : b + 1], labels=w[b : b + 1]).loss
        grads = torch.autograd.grad(loss, weights)
        for t, g in zip(targets, grads):
            ref[t.name] += g.double().square().sum(0) / 3
        for p in weights:
            p.requires_grad_(False)
    assert fisher.batches == 3 and fisher.tokens == 3 * 11
    for name, F in ref.items():
        torch.testing.assert_close(fisher.F[name], F, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(fisher.scale_for(name), F.sqrt(), rtol=1e-4, atol=1e-9)
    # max_windows takes the first windows; windows_per_backward batches them (fewer, averaged gradients)
    two = collect_fisher(model, w, 8, CPU, max_windows=2, windows_per_backward=2)
    assert two.batches == 1 and two.tokens == 2 * 11


def test_conv1d_fisher_is_in_the_linear_orientation() -> None:
    model = build("gpt2")
    fisher = collect_fisher(model, windows(n=2, T=12), 1, CPU, max_windows=2)
    for t in find_targets(model):
        assert fisher.F[t.name].shape == (t.shape.n,)
        assert bool((fisher.F[t.name] > 0).all())


@pytest.mark.parametrize("kind", ["act_scale", "fisher"])
def test_statistics_round_trip_with_their_alpha(arch, kind, tmp_path) -> None:
    stat = arch["stats"][kind]
    tensors, meta = stat.to_tensors()
    assert meta["kind"] == kind and all(v.dtype == torch.float32 for v in tensors.values())
    save_tensors(tmp_path / "s.safetensors", tensors, meta)
    back = load_stat(tmp_path / "s.safetensors")
    assert type(back) is type(stat) and back.alpha == stat.alpha
    for t in find_targets(arch["model"]):
        torch.testing.assert_close(back.scale_for(t.name), stat.scale_for(t.name), rtol=1e-6, atol=0)
    with pytest.raises(KeyError, match="recompute"):
        back.scale_for("no.such.target")


def test_act_scale_alpha_is_a_power_of_the_mean_abs(arch) -> None:
    s = arch["stats"]["act_scale"]
    for alpha in (0.25, 1.0):
        other = ActScales(s.mean_abs, s.group_of, s.tokens, alpha=alpha)
        for name, g in list(s.group_of.items())[:3]:
            torch.testing.assert_close(other.scale_for(name), s.mean_abs[g] ** alpha, rtol=1e-12, atol=0)


def test_registries_hold_the_baselines() -> None:
    assert STATS["act_scale"].collect is collect_act_scales and STATS["fisher"].collect is collect_fisher
    assert set(STATS) == set(STAT_LOADERS)
    assert SPACES["act_scale"].stat == "act_scale" and SPACES["fisher"].stat == "fisher"
    assert {s.stat for s in SPACES.values() if s.stat} <= set(STATS)


def test_diagonal_scaling_floor_and_errors() -> None:
    S = diagonal_scaling(torch.tensor([0.0, 2.0, 4.0]))
    assert torch.equal(S, torch.diag(S.diagonal())) and S.dtype == torch.float64
    assert float(S[0, 0]) == pytest.approx(2e-6) and float(S[1, 1]) == pytest.approx(2.0 + 2e-6)
    # a dead channel keeps the factor invertible: full rank still reproduces W
    W = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = truncate(W, 3, S)
    torch.testing.assert_close(f.A @ f.B, W, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="zero"):
        diagonal_scaling(torch.zeros(4), "layers.0.fc")
    with pytest.raises(ValueError, match="non-finite"):
        diagonal_scaling(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="negative"):
        diagonal_scaling(torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_bad_alpha_is_rejected_by_name(bad) -> None:
    with pytest.raises(ValueError, match="alpha"):
        ActScales({}, {}, {}, alpha=bad)
    with pytest.raises(ValueError, match="statistics.fisher.alpha"):
        FisherColumns({}, 1, 1, alpha=bad)


def test_bad_fisher_options_are_rejected_by_name() -> None:
    model = build("llama")
    with pytest.raises(ValueError, match="max_windows"):
        collect_fisher(model, windows(2, 8), 1, CPU, max_windows=0)
    with pytest.raises(ValueError, match="windows_per_backward"):
        collect_fisher(model, windows(2, 8), 1, CPU, windows_per_backward=0)


# ---- the catcher and the block finder on shapes no tiny HF config has ------------------------------------------


class _TupleBlock(nn.Module):
    """A transformers-4.x style decoder layer: returns a tuple, takes the mask by keyword."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, hidden_states, attention_mask=None, scale=None):
        h = torch.tanh(self.q(hidden_states)) * self.k(hidden_states) * scale  # scale: [batch, 1, 1]
        if attention_mask is not None:
            h = h * attention_mask
        return (hidden_states + self.out(h), None)


class _Config:
    use_return_dict = True


class _TupleLM(nn.Module):
    """Its loop indexes ``outputs[0]`` and passes per-layer arguments built from the running hidden states'
    shape, and the hidden states by keyword. A catcher returning a bare tensor would make ``outputs[0]`` the
    first sequence, and every later block's recorded ``scale`` would have the wrong batch size."""

    def __init__(self, d: int = 8, vocab: int = 20, n: int = 3) -> None:
        super().__init__()
        self.config = _Config()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([_TupleBlock(d) for _ in range(n)])
        self.head = nn.Linear(d, vocab, bias=False)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        mask = (input_ids > 0).float()[..., None]
        for i, layer in enumerate(self.layers):
            scale = torch.full((h.shape[0], 1, 1), 1.0 + i)
            h = layer(hidden_states=h, attention_mask=mask, scale=scale)[0]
        return self.head(h)


def test_catcher_handles_tuple_returning_blocks_and_keyword_hidden_states() -> None:
    torch.manual_seed(0)
    model = _TupleLM().eval()
    w = torch.randint(0, 20, (5, 7), generator=torch.Generator().manual_seed(2))
    w[0, :3] = 0  # the mask matters
    direct = target_inputs(model, w)
    grams = collect_input_grams(model, w, 2, CPU)
    assert len(grams.C) == 2 * 3  # q and k share an input
    for name, X in direct.items():
        C = X.T @ X / X.shape[0]
        # batches of 2 vs one batch of 5 run float32 kernels with other blockings: ~1e-7 relative
        assert float((grams.for_target(name) - C).abs().max()) <= 1e-6 * float(C.abs().max()), name
    # per-layer keyword arguments are recorded per block
    inputs = capture_block_inputs(model, w, 5, CPU)
    assert [tuple(c[1]["scale"].shape) for c in inputs.calls[0]] == [(5, 1, 1)] * 3
    assert [float(c[1]["scale"][0]) for c in inputs.calls[0]] == [1.0, 2.0, 3.0]
    assert all(not c[0] for c in inputs.calls[0])
    assert isinstance(model.layers[0], _TupleBlock)  # the originals are back


class _VisionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)


class _Text(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([_VisionBlock() for _ in range(2)])


class _Multimodal(nn.Module):
    """A vision encoder stack (4 blocks) longer than the text decoder (2), which sits beside the embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.vision = nn.Module()
        self.vision.layers = nn.ModuleList([_VisionBlock() for _ in range(4)])
        self.language_model = _Text()

    def get_input_embeddings(self):
        return self.language_model.embed_tokens


def test_decoder_stack_is_the_one_beside_the_input_embeddings() -> None:
    prefix, blocks = find_blocks(_Multimodal())
    assert prefix == "language_model.layers" and len(blocks) == 2


def test_a_local_hugging_face_folder_of_any_architecture_just_works(tmp_path) -> None:
    """The same `hf` source path serves every architecture: written once, referenced, loaded, discovered."""
    from lowrank.io import write_json
    from lowrank.model import load_model, materialize_source

    for key in ("phi3", "opt"):
        model = build(key)
        folder = tmp_path / key
        model.save_pretrained(str(folder))
        body = materialize_source({"source": "hf", "path": str(folder)}, tmp_path / "unused")
        assert body["path_relative"] is False and not (tmp_path / "unused").exists()  # referenced, never copied
        assert body["architecture"]["blocks_path"] == ARCHS[key][0]
        write_json(tmp_path / f"{key}.json", body)
        reloaded = load_model(tmp_path / f"{key}.json")
        assert [t.name for t in find_targets(reloaded)] == [t.name for t in find_targets(model)]

"""lowrank.quantization / quantized_linear: per-row int8, byte accounting == stored bytes, the three modes."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch

from lowrank.accounting import TargetShape
from lowrank.checkpoint import QUANTIZED_FORMAT, load_compressed, save_quantized
from lowrank.gradients import calibration_gradients
from lowrank.io import write_json
from lowrank.model import find_targets, linear_weight
from lowrank.quantization import (QUANTIZERS, allocate_bytes, byte_accounting, byte_budget, check_allocation,
                                  dequantize_rows, greedy_byte_ranks, hq_layout, layout_bytes, matrix_bytes,
                                  quantize_model, quantize_rows, remap_layout, row_scores, select_rows_loss_aware)
from lowrank.quantized_linear import PackedRows, QuantizedLinear
from lowrank.spaces import bind


def _matrix(r: int = 12, c: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(r, c, generator=g) * torch.logspace(-3, 2, r)[:, None]
    X[3] = 0.0  # a zero row
    X[5, 7] = -50.0  # an outlier
    return X


def test_int8_round_trip_error_is_at_most_half_a_step():
    X = _matrix()
    q, s = quantize_rows(X)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == X.shape
    assert int(q.abs().max()) == 127 and int(q[3].abs().max()) == 0 and float(s[3]) == 0.0
    err = (dequantize_rows(q, s, torch.float64) - X.double()).abs()
    # |x − s q| ≤ s/2 (+ float32 rounding of x/s: a relative 2^-23 of 127 steps)
    assert bool((err <= s.double()[:, None] * (0.5 + 1e-4)).all())
    assert float(err.max()) > 0  # not a trivially exact case
    # every row's max reaches ±127 (the scale is max|x|/127)
    nz = s > 0
    assert bool((q[nz].abs().amax(dim=1) == 127).all())


def test_packed_rows_bytes_and_values():
    X = _matrix()
    mask = torch.tensor([i % 3 == 0 for i in range(X.shape[0])])
    p = PackedRows.from_matrix(X, mask)
    assert p.stored_bytes() == matrix_bytes(12, 20, int(mask.sum())) == 12 + 4 * 24 + 8 * 40
    Y = p.dequantize(torch.float32)
    q, s = quantize_rows(X[mask])
    torch.testing.assert_close(Y[mask], dequantize_rows(q, s), rtol=0, atol=0)
    torch.testing.assert_close(Y[~mask], X[~mask].half().float(), rtol=0, atol=0)


@pytest.mark.parametrize("rank", [None, 5])
def test_quantized_linear_forward(rank):
    g = torch.Generator().manual_seed(1)
    m, n = 16, 24
    if rank is None:
        mats = {"weight": torch.randn(m, n, generator=g)}
    else:
        mats = {"down": torch.randn(rank, n, generator=g), "up": torch.randn(m, rank, generator=g)}
    masks = {k: torch.rand(v.shape[0], generator=g) > 0.5 for k, v in mats.items()}
    bias = torch.randn(m, generator=g)
    lin = QuantizedLinear.from_matrices(mats, masks, bias)
    x = torch.randn(3, 7, n, generator=g)
    ref = torch.nn.functional.linear(x, lin.dense_weight(), bias.half().float())
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
    shape = TargetShape(m, n, True)
    from lowrank.quantization import Layout
    lay = Layout(rank, {k: int(v.sum()) for k, v in masks.items()})
    assert lin.stored_bytes() == layout_bytes(shape, lay)


def test_layout_costs():
    # remap: rank k costs about 2 k max(m, n) bytes (+ masks and scales); hq about k (m + n)
    for m, n, k in [(64, 32, 10), (32, 64, 10), (48, 48, 7)]:
        s = TargetShape(m, n)
        r = layout_bytes(s, remap_layout(s, k))
        assert 2 * k * max(m, n) <= r <= 2 * k * max(m, n) + 6 * (m + n + k) + 2 * max(m, n)
        h = layout_bytes(s, hq_layout(s, k))
        assert h == k * n + 5 * k + m * k + 5 * m + 0
        assert layout_bytes(s, remap_layout(s, None)) == 2 * m * n + m


def test_greedy_byte_ranks_meet_the_budget_and_floor_error():
    shapes = {f"t{i}": TargetShape(32 + 8 * i, 24) for i in range(4)}
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.randn(s.full_rank, generator=g) * 1e-3 for n, s in shapes.items()}
    for rho in (0.8, 0.5, 0.3):
        budget, total = byte_budget(shapes, rho)
        for lay in (remap_layout, hq_layout):
            ranks = greedy_byte_ranks(shapes, budget, scores, lay, "zero_sum")
            used = sum(layout_bytes(s, lay(s, ranks[n])) for n, s in shapes.items())
            assert used <= budget
            # not wasteful: the greedy stops at the first removal that fits, so it overshoots by at most one
            # step (one component, or the switch from dense to factors); with nothing cut, all-dense fits
            if any(r is not None for r in ranks.values()):
                assert used >= budget - max(2 * s.m * s.n // s.full_rank + 2 * (s.m + s.n)
                                            for s in shapes.values())
            else:
                assert lay is hq_layout and used <= budget
    with pytest.raises(ValueError, match="below what must stay"):
        greedy_byte_ranks(shapes, 100, scores, remap_layout)
    with pytest.raises(ValueError, match="greedy allocator"):
        greedy_byte_ranks(shapes, 10**6, scores, remap_layout, "uniform")


def test_byte_allocation_is_the_one_quantize_stores(tiny_llama):
    """allocate_bytes = greedy_byte_ranks under the mode's layout; its JSON carries the parameter accounting of
    those ranks (what the summary reports) and the bytes; quantize_model stores exactly those ranks."""
    targets = find_targets(tiny_llama)
    shapes = {t.name: t.shape for t in targets}
    scores = _synthetic_scores(tiny_llama)
    for mode in QUANTIZERS:
        alloc = allocate_bytes(mode, shapes, 0.4, scores)
        layout = remap_layout if mode != "hq" else hq_layout
        budget, dense = byte_budget(shapes, 0.4)
        assert alloc.ranks == greedy_byte_ranks(shapes, budget, scores, layout, "zero_sum")
        body = alloc.to_json() | {"quantize": byte_accounting(mode, alloc)}
        q = body["quantize"]
        assert (q["mode"], q["budget_bytes"], q["dense_fp16_bytes"]) == (mode, budget, dense)
        assert q["layout_bytes"] == sum(layout_bytes(s, layout(s, alloc.ranks[n])) for n, s in shapes.items())
        assert q["layout_bytes"] <= budget
        # int8 rows cost about half a float16 parameter: the ranks keep more parameters than the ratio
        assert body["kept_fraction"] > 0.4 and body["n_factored"] == sum(r is not None for r in alloc.ranks.values())
        assert check_allocation(body, mode, 0.4) == alloc.ranks
        with pytest.raises(ValueError, match="rerun allocate"):
            check_allocation(body, mode, 0.5)
        with pytest.raises(ValueError, match="rerun allocate"):
            check_allocation(alloc.to_json(), mode, 0.4)  # a parameter allocation: no quantize entry
    model = copy.deepcopy(tiny_llama)
    res = quantize_model(model, targets, "remap", 0.4, allocate_bytes("remap", shapes, 0.4, scores).ranks,
                         bind("none"))
    assert {n: lay.rank for n, lay in res.layouts.items()} == allocate_bytes("remap", shapes, 0.4, scores).ranks
    assert res.accounted_bytes == byte_accounting("remap", allocate_bytes("remap", shapes, 0.4, scores))[
        "layout_bytes"]


def test_loss_aware_selection_is_a_prefix_of_ascending_impact():
    g = torch.Generator().manual_seed(3)
    shapes = {"a": TargetShape(40, 24), "b": TargetShape(24, 40), "c": TargetShape(16, 16)}
    ranks = {"a": 8, "b": 3, "c": None}
    deltas = {"a": {"down": torch.randn(8, generator=g), "up": torch.randn(40, generator=g)},
              "b": {"down": torch.randn(3, generator=g), "up": torch.randn(24, generator=g)},
              "c": {"weight": torch.randn(16, generator=g)}}
    deltas["a"]["up"][:5] = deltas["b"]["up"][0]  # ties
    full = sum(layout_bytes(s, hq_layout(s, ranks[n])) for n, s in shapes.items())
    fp16 = sum(layout_bytes(s, remap_layout(s, None) if ranks[n] is None else
                            type(remap_layout(s, 1))(ranks[n], {"down": 0, "up": 0})) for n, s in shapes.items())
    for budget in (fp16, (fp16 + full) // 2, full + 10):
        masks, used = select_rows_loss_aware(deltas, shapes, ranks, budget)
        assert used <= budget
        real = sum(matrix_bytes(len(m), (shapes[n].n if k != "up" else ranks[n]) if k != "weight" else shapes[n].n,
                                int(m.sum())) for n in masks for k, m in masks[n].items())
        assert real == used
        # cols ≤ 4 rows (b.up, rank 3) are never candidates
        assert not bool(masks["b"]["up"].any())
        picked = [abs(float(deltas[n][k][i])) for n in masks for k, m in masks[n].items() for i in range(len(m))
                  if m[i]]
        unpicked = [abs(float(deltas[n][k][i])) for n in masks for k, m in masks[n].items() for i in range(len(m))
                    if not m[i] and not (n == "b" and k == "up")]
        if picked and unpicked:
            assert max(picked) <= min(unpicked)
    with pytest.raises(ValueError, match="cannot be met"):
        select_rows_loss_aware(deltas, shapes, ranks, full - 1000)


def test_row_scores_are_first_order_inner_products():
    g = torch.Generator().manual_seed(2)
    A, B, G = torch.randn(10, 4, generator=g), torch.randn(4, 12, generator=g), torch.randn(10, 12, generator=g)
    d = row_scores(A, B, G)
    qa, sa = quantize_rows(A)
    dA = dequantize_rows(qa, sa, torch.float64) - A.double()
    # quantising row j of A alone changes W' by e_j δA_j B: ⟨G, that⟩ = ⟨(G Bᵀ)_j, δA_j⟩
    for j in (0, 7):
        dW = torch.zeros(10, 12, dtype=torch.float64)
        dW[j] = dA[j] @ B.double()
        assert float(d["up"][j]) == pytest.approx(float((G.double() * dW).sum()), rel=1e-9)


def _synthetic_scores(model):
    g = torch.Generator().manual_seed(0)
    return {t.name: torch.randn(t.shape.full_rank, generator=g, dtype=torch.float64) * 1e-4
            for t in find_targets(model)}


def _ranks(model, mode, kept_fraction):
    """The byte allocation the allocate stage writes for an int8 recipe (zero_sum on the synthetic scores)."""
    shapes = {t.name: t.shape for t in find_targets(model)}
    return allocate_bytes(mode, shapes, kept_fraction, _synthetic_scores(model)).ranks


def _base_manifest(tmp_path, spec):
    from lowrank.model import materialize_source
    body = materialize_source(spec, tmp_path / "hf")
    body["path"] = str(tmp_path / "hf") if body.get("path_relative") else body["path"]
    body["path_relative"] = False
    write_json(tmp_path / "manifest.json", body)
    return tmp_path / "manifest.json"


@pytest.mark.parametrize("mode", QUANTIZERS)
def test_quantize_save_load_round_trip_bytes_on_disk(tmp_path, tiny_llama_spec, mode, token_windows):
    manifest = _base_manifest(tmp_path, tiny_llama_spec)
    from lowrank.model import load_model
    model = load_model(manifest)
    targets = find_targets(model)
    grads_of = (lambda m: calibration_gradients(m, token_windows[:2], 2, "cpu", targets))
    res = quantize_model(model, targets, mode, 0.4, _ranks(model, mode, 0.4), bind("none"), grads_of)
    assert res.accounted_bytes <= res.budget_bytes == int(0.4 * res.dense_bytes)
    assert any(lay.rank is not None for lay in res.layouts.values())
    if mode == "hq":
        assert all(v == (lay.rank if k == "down" else t.shape.m)
                   for t in targets for lay in [res.layouts[t.name]] for k, v in lay.int8_rows.items())
    out = tmp_path / mode
    save_quantized(out, model, manifest, res.accounted_bytes, {"mode": mode})
    raw = (out / "model.safetensors").read_bytes()
    header = 8 + struct.unpack("<Q", raw[:8])[0]
    assert len(raw) - header == res.accounted_bytes  # stored bytes == accounted bytes, to the header
    meta = json.loads(raw[8:header])
    assert {v["dtype"] for k, v in meta.items() if k.endswith(".q")} == {"I8"}
    assert {v["dtype"] for k, v in meta.items() if k.endswith(".f")} == {"F16"}
    back = load_compressed(out)
    with torch.no_grad():
        a = model(input_ids=token_windows).logits
        b = back(input_ids=token_windows).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert json.loads((out / "manifest.json").read_text())["format"] == QUANTIZED_FORMAT


def test_bad_mode_and_budget_leave_the_model_untouched(tiny_llama):
    before = copy.deepcopy(tiny_llama.state_dict())
    targets = find_targets(tiny_llama)
    ranks = _ranks(tiny_llama, "remap", 0.5)
    with pytest.raises(ValueError, match="unknown quantization mode 'int4'"):
        quantize_model(tiny_llama, targets, "int4", 0.5, ranks, bind("none"))
    with pytest.raises(ValueError, match="below what must stay"):
        _ranks(tiny_llama, "remap", 0.005)
    # ranks of a larger budget (or of another layout) do not fit this one: refused before any change
    with pytest.raises(ValueError, match="over the byte budget"):
        quantize_model(tiny_llama, targets, "remap", 0.3, ranks, bind("none"))
    with pytest.raises(ValueError, match="no rank for 1 targets"):
        quantize_model(tiny_llama, targets, "remap", 0.5, {k: v for k, v in list(ranks.items())[1:]},
                       bind("none"))
    after = tiny_llama.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert isinstance(tiny_llama.get_submodule(targets[0].name), torch.nn.Linear)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantized_model_runs_on_cuda(tiny_llama, token_windows):
    targets = find_targets(tiny_llama)
    quantize_model(tiny_llama, targets, "remap", 0.5, _ranks(tiny_llama, "remap", 0.5), bind("none"))
    with torch.no_grad():
        cpu = tiny_llama(input_ids=token_windows).logits
        gpu = tiny_llama.to("cuda")(input_ids=token_windows.cuda()).logits.cpu()
    torch.testing.assert_close(cpu, gpu, rtol=1e-3, atol=1e-3)
    assert linear_weight is not None


def test_storage_bytes_and_bytes_pivot(tiny_llama):
    import pandas as pd

    from lowrank.evaluation import storage_bytes
    from lowrank.report import bytes_pivot, results_table

    targets = find_targets(tiny_llama)
    dense_params = sum(t.shape.m * t.shape.n for t in targets)
    manifest = {"base_architecture": {"target_params": dense_params}}
    assert storage_bytes(tiny_llama, manifest) == {"storage_bytes_fp16": 2 * dense_params,
                                                   "dense_target_bytes_fp16": 2 * dense_params,
                                                   "kept_bytes_fraction": 1.0}
    q = {"accounted_bytes": 300, "dense_fp16_bytes": 1000}
    assert storage_bytes(tiny_llama, q)["kept_bytes_fraction"] == 0.3
    rec = {"model": "m", "method": "x", "ratio": 0.6, "ppl": 10.0, "kept_bytes_fraction": 0.59}
    alloc = {"kept_fraction": 0.6, "removed_fraction": 0.4, "n_factored": 1, "n_dense": 0}
    table = results_table([{"model": "m", "ppl": 5.0}], [(rec, alloc)])
    piv = bytes_pivot(table)
    assert isinstance(piv, pd.DataFrame) and float(piv.loc[piv.method == "x", "kept 0.60"].iloc[0]) == 0.59


@pytest.mark.parametrize("mode", QUANTIZERS)
def test_lazy_model_quantizes_block_by_block_to_the_same_bytes(tmp_path, tiny_llama_spec, mode, token_windows):
    """A lazy model (blocks read from the shards one at a time; loss_aware's truncated products on disk and its
    rows scored as each block's gradients complete): the same layouts, diagnostics and stored bytes."""
    from lowrank.gradients import streamed_gradients
    from lowrank.model import load_model, model_path
    from lowrank.sharded import is_lazy, load_lazy_model

    manifest = _base_manifest(tmp_path, tiny_llama_spec)
    whole, lazy = load_model(manifest), load_lazy_model(model_path(manifest))
    assert is_lazy(lazy)
    targets = find_targets(whole)

    def grads_of(m, on_block=None):
        return streamed_gradients(m, token_windows[:2], 2, "cpu", targets, on_block=on_block, keep=on_block is None)

    ranks = _ranks(whole, mode, 0.4)
    ref = quantize_model(whole, targets, mode, 0.4, ranks, bind("none"), grads_of)
    got = quantize_model(lazy, targets, mode, 0.4, ranks, bind("none"), grads_of, workdir=tmp_path / "work")
    assert got.layouts == ref.layouts and got.accounted_bytes == ref.accounted_bytes
    assert got.diagnostics == ref.diagnostics
    for name, model in (("whole", whole), ("lazy", lazy)):
        save_quantized(tmp_path / name, model, manifest, ref.accounted_bytes, {"mode": mode})
    assert (tmp_path / "lazy" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_lazy_quantized_reload_streams_the_same_perplexity(tmp_path, tiny_llama_spec, token_windows):
    """A quantized model read back lazily: int8 rows on meta until their block is placed, read in their stored
    dtypes and dropped after it; the streamed perplexity and the sizes equal the whole-model ones."""
    from lowrank.evaluation import model_size, perplexity, storage_bytes
    from lowrank.io import read_json
    from lowrank.model import find_blocks, load_model
    from lowrank.sharded import is_lazy

    manifest = _base_manifest(tmp_path, tiny_llama_spec)
    model = load_model(manifest)
    targets = find_targets(model)
    res = quantize_model(model, targets, "remap", 0.4, _ranks(model, "remap", 0.4), bind("none"))
    save_quantized(tmp_path / "q", model, manifest, res.accounted_bytes, {"mode": "remap"})
    whole, lazy = load_compressed(tmp_path / "q"), load_compressed(tmp_path / "q", lazy=True)
    assert is_lazy(lazy) and not is_lazy(whole)
    _, blocks = find_blocks(lazy)
    assert all(t.is_meta for b in blocks for t in [*b.parameters(), *b.buffers()])
    ref, got = perplexity(whole, token_windows, 2), perplexity(lazy, token_windows, 2)
    assert got == ref  # the same kernels on the same tensors: bitwise here
    assert all(t.is_meta for b in blocks for t in [*b.parameters(), *b.buffers()])  # released, rows too
    body = read_json(tmp_path / "q" / "manifest.json")
    assert model_size(lazy) == model_size(whole) and storage_bytes(lazy, body) == storage_bytes(whole, body)

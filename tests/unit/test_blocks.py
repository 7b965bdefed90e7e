"""lowrank.blocks, the layer-wise engine: the output convention it records, place / release through `resident`
(also when the body raises), the block grouping of targets, and the boundary store."""

from __future__ import annotations

import pytest
import torch

from lowrank.blocks import (BoundaryStore, block_output, capture_block_inputs, for_each_block, resident,
                            targets_by_block)
from lowrank.model import find_blocks, find_targets


def test_capture_records_the_block_output_convention(tiny_llama, token_windows, cpu):
    inputs = capture_block_inputs(tiny_llama, token_windows, 3, cpu)
    block0 = find_blocks(tiny_llama)[1][0]
    out = block0(inputs.hidden[0], *inputs.calls[0][0][0], **inputs.calls[0][0][1])
    assert inputs.as_tuple == isinstance(out, (tuple, list))
    assert block_output(out).shape == inputs.hidden[0].shape
    assert block_output((inputs.hidden[0], None)) is inputs.hidden[0]


def test_resident_returns_the_block_home_even_when_the_body_raises(tiny_llama, cpu, monkeypatch):
    import lowrank.blocks as blocks

    calls = []
    monkeypatch.setattr(blocks, "place_block", lambda m, i, d: calls.append(("place", i, str(d))) or "home")
    monkeypatch.setattr(blocks, "release_block", lambda m, i, home: calls.append(("release", i, home)))
    with resident(tiny_llama, 1, cpu) as blk:
        assert blk is find_blocks(tiny_llama)[1][1]
        assert calls == [("place", 1, "cpu")]
    assert calls[-1] == ("release", 1, "home")
    with pytest.raises(RuntimeError, match="inside"):
        with resident(tiny_llama, 0, cpu):
            raise RuntimeError("inside")
    assert calls[-2:] == [("place", 0, "cpu"), ("release", 0, "home")]


def test_targets_by_block_and_for_each_block(tiny_llama, cpu):
    targets = find_targets(tiny_llama)
    by_block = targets_by_block(targets)
    assert sorted(by_block) == [0, 1]
    assert [t for i in sorted(by_block) for t in by_block[i]] == targets  # order kept
    seen = for_each_block(tiny_llama, targets, cpu, lambda i, tl: (i, len(tl)))
    assert seen == {i: (i, len(by_block[i])) for i in by_block}


def test_boundary_store_keeps_puts_and_drops():
    store = BoundaryStore(torch.device("cpu"), torch.device("cpu"))
    x = torch.arange(6.0).reshape(2, 3)
    store.put(2, 0, x)
    store.put(2, 0, x + 1)  # overwrite batch 0
    store.put(2, 1, x)
    assert torch.equal(store.get(2, 0), x + 1) and torch.equal(store.get(2, 1), x)
    store.drop(2)
    assert store.h[2] == [] and store.h[0] == [] and store.h[1] == []

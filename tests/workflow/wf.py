"""Helpers to run the Snakemake workflow on a tiny random model in a temporary folder."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "tiny.yaml"


def tiny_config() -> dict[str, Any]:
    return yaml.safe_load(TINY.read_text())


# The recipes the shared tiny DAG adds to tiny.yaml's svd / svd-llm / zs-svd (+1 correction): one of every other
# stage kind (two-sided whitening with its output_kl statistic, both int8 quantize modes, prehab with rehab).
SHARED_METHODS: dict[str, dict[str, Any]] = {
    "io-svd": {"whitening": "io_kl", "scorer": "first_order", "allocator": "zero_sum"},
    "zs-svd-remap": {"whitening": "input_gram", "scorer": "first_order", "allocator": "zero_sum",
                     "quantize": {"mode": "remap"}},
    "io-svd-plus": {"whitening": "io_kl", "scorer": "first_order", "allocator": "zero_sum",
                    "quantize": {"mode": "loss_aware", "gradient_windows": 2}},
    "prehab-svd-llm": {"whitening": "input_gram", "scorer": "sigma", "allocator": "uniform", "prehab": True,
                       "rehab": {"steps": 2, "lr": 1e-3, "batch_size": 4}},
}
PREHAB = {"steps": 3, "lambda0": 0.1, "lambda_max": 1.0, "warmup_steps": 2, "lr": 1e-3, "batch_size": 4,
          "checkpoint_every": 2}


def shared_config() -> dict[str, Any]:
    """The config of the shared tiny DAG (tests/workflow/conftest.py's ``tiny_dag``): tiny.yaml plus
    SHARED_METHODS at one kept fraction, 0.5 (every stage runs once per recipe; a second ratio would double the
    per-ratio jobs and test nothing new), with small output_kl and prehab settings."""
    cfg = tiny_config()
    cfg["ratios"] = [0.5]
    cfg["methods"].update(copy.deepcopy(SHARED_METHODS))  # a fresh dict: tests edit their config
    cfg["statistics"] = {"output_kl": {"top_k": 5, "max_windows": 4}}
    cfg["prehab"] = dict(PREHAB)
    return cfg


def write_workdir(path: Path, config: dict[str, Any] | None = None, vocab: int = 256) -> Path:
    """A run folder: config.yaml plus disjoint calibration / evaluation token files (random ids < vocab)."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for name in ("calibration_tokens", "evaluation_tokens"):
        save_file({"tokens": torch.randint(0, vocab, (4000,), generator=g)}, str(path / f"{name}.safetensors"))
    write_byte_tokenizer(path / "byte_tokenizer")
    (path / "heldout_text.txt").write_text(word_lines(600, seed=1))
    return write_config(path, config or tiny_config())


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


def offline_env(slurm: bool = False, **extra: str) -> dict[str, str]:
    """The environment of a Snakemake / ``lowrank`` call in the tests: offline, no progress bars and, unless
    ``slurm``, a PATH whose ``scontrol`` fails at once.

    Why the last: Snakemake imports every installed executor plugin when it starts, and the SLURM plugin then runs
    ``scontrol show config`` (10 s timeout) to read MinJobAge. On a machine with SLURM's client but no controller
    answering (e.g. after ``tools/local-slurm.sh stop``) every Snakemake call waits 9 s for it. Only
    tests/workflow/test_slurm.py talks to SLURM; the other tests never need the answer."""
    env = {**os.environ, "LOWRANK_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}
    if not slurm and shutil.which("scontrol") is not None:
        env["PATH"] = f"{_no_scontrol_dir()}{os.pathsep}{env.get('PATH', '')}"
    return env


def _no_scontrol_dir() -> Path:
    folder = Path(tempfile.gettempdir()) / f"lowrank-tests-no-scontrol-{os.getuid()}"
    shim = folder / "scontrol"
    if not shim.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".scontrol.{os.getpid()}"
        tmp.write_text("#!/bin/sh\necho 'scontrol: disabled in the lowrank tests (see tests/workflow/wf.py)' >&2\n"
                       "exit 1\n")
        tmp.chmod(0o755)
        tmp.replace(shim)
    return folder


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``snakemake -s <repo>/Snakefile --directory workdir --cores 2 --max-threads 1 ARGS`` (the default profile
    applies). One thread per job: a tiny job is its Python start-up, so two jobs side by side finish sooner than
    one job on two threads. A call with the SLURM profile or executor keeps the real ``scontrol``."""
    slurm = any("slurm" in a for a in args)
    env = offline_env(slurm=slurm)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "--max-threads", "1", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def copy_run(run: Path, dest: Path, config: dict[str, Any] | None = None) -> Path:
    """A private copy of a finished run folder (results, logs, Snakemake's metadata; mtimes kept) to edit or
    rerun, optionally with another config.yaml. Never change the shared ``tiny_dag`` folder itself."""
    shutil.copytree(run, dest, symlinks=True)
    return write_config(dest, config) if config is not None else dest


def write_config(workdir: Path, config: dict[str, Any]) -> Path:
    """Replace the config.yaml of a run folder."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


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

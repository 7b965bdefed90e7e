"""Device, dtype, seeding, threads, progress bars and logging: the run-time environment of one stage."""

from __future__ import annotations

import logging
import os
import random
import sys
from typing import Iterable, Iterator, TypeVar

import torch

__all__ = [
    "resolve_device",
    "parse_dtype",
    "seed_everything",
    "set_threads",
    "progress",
    "setup_logging",
    "DTYPES",
]

T = TypeVar("T")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` means CUDA when available, else CPU; any other string is passed to :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"runtime.device is {device!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return dev


def parse_dtype(name: str) -> torch.dtype:
    """Map a config dtype name (``float32``, ``bfloat16``, ...) to a torch dtype."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (if present) and torch; ask cuDNN for deterministic kernels."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        pass
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def set_threads(n: int | None) -> None:
    """Use exactly ``n`` intra-op threads (the rule's ``threads``): oversubscribed cores slow SVDs by 10-40x."""
    if n is not None and n > 0:
        torch.set_num_threads(int(n))


def progress(iterable: Iterable[T], desc: str, total: int | None = None, **kwargs) -> Iterator[T]:
    """A tqdm progress bar on stderr (shown in the rule's log and terminal); silent when LOWRANK_NO_PROGRESS=1."""
    from tqdm.auto import tqdm

    disable = os.environ.get("LOWRANK_NO_PROGRESS", "0") == "1"
    return iter(tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, mininterval=2.0,
                     **kwargs))


def setup_logging(log_file: str | None = None, level: int = logging.INFO) -> logging.Logger:
    """Log to stderr and, when given, to ``log_file`` (the rule's log); returns the package logger."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers,
                        force=True)
    return logging.getLogger("lowrank")

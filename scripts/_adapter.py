"""Shared set-up of every rule's script: logging to the rule's log, seed, threads, device, dtype."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from lowrank.runtime import parse_dtype, resolve_device, seed_everything, set_threads, setup_logging
from lowrank.sharded import lazy_setting
from lowrank.statistics import STAT_LOADERS, load_stat


@dataclass
class Stage:
    log: logging.Logger
    device: torch.device
    dtype: torch.dtype


def param(smk: Any, name: str, default: Any = None) -> Any:
    return getattr(smk.params, name, default) if hasattr(smk.params, name) else default


@contextlib.contextmanager
def stage(smk: Any) -> Iterator[Stage]:
    """Configure the process for one job and log any failure with its traceback before re-raising."""
    log = setup_logging(smk.log[0] if len(smk.log) else None)
    rt = dict(param(smk, "runtime", None) or {})
    seed_everything(int(rt.get("seed", 0)))
    set_threads(smk.threads)
    st = Stage(log=log, device=resolve_device(rt.get("device", "auto")), dtype=parse_dtype(rt.get("dtype", "float32")))
    log.info("rule %s: device=%s dtype=%s threads=%s", smk.rule, st.device, st.dtype, smk.threads)
    try:
        yield st
    except Exception:
        log.exception("rule %s failed", smk.rule)
        raise


def lazy_load(smk: Any) -> bool | None:
    """The rule's ``lazy_load`` param (config ``runtime.lazy_load``) as :func:`lowrank.sharded.load_model_streaming`
    takes it: True / False, or None = by size."""
    return lazy_setting(param(smk, "lazy_load", "auto"))


def load_stats(smk: Any) -> dict[str, Any]:
    """Every calibration statistic among the rule's named inputs, keyed by kind (``input_gram``, ...)."""
    return {k: load_stat(smk.input[k]) for k in smk.input.keys() if k in STAT_LOADERS}

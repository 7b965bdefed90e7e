"""A short, resumable fine-tune of selected parameters on calibration windows (prehab and rehab share it).

Step ``t`` minimises ``L_t = CE(batch_t) + P_t``: the token-mean next-token cross-entropy of a batch of
calibration windows plus an optional penalty ``P_t`` (prehab's ``λ(t)·R``). Only the parameters handed in train;
everything else is frozen. The batch of step ``t`` is a pure function of ``(seed, t)`` (a seeded permutation per
pass over the windows), so a run that is killed and resumed from a checkpoint draws exactly the batches an
uninterrupted run draws.

A checkpoint is ONE safetensors file written atomically (temporary file + rename): the trainable tensors, the
optimiser's tensor state, the torch RNG state and the penalty's state tensors (power-iteration vectors), with
the step, the optimiser's scalar state and param groups, the history and a fingerprint of the run's settings in
its JSON metadata. No pickles. A checkpoint whose fingerprint differs from the current run's is ignored.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from .gradients import causal_lm_loss
from .io import config_hash, load_tensors, save_tensors

__all__ = ["OPTIMIZERS", "make_optimizer", "batch_indices", "Penalty", "TrainResult", "save_train_checkpoint",
           "load_train_checkpoint", "train"]

log = logging.getLogger(__name__)


def _adam(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    # foreach=False: the same kernels whatever the parameter count, so resumed and uninterrupted runs agree bitwise
    return torch.optim.Adam(params, lr=lr, foreach=False)


def _adafactor(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    # fixed learning rate (no relative step / warm-up init), no first moment: factored second moments only
    return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)


def _sgd(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, foreach=False)


# name -> factory(params, lr). Memory per trained parameter beyond weight + gradient: adam 2 states in the
# parameter's dtype (8 B in fp32, 4 B in bf16); adafactor one row + one column vector per matrix (~0 B); sgd 0 B.
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], float], torch.optim.Optimizer]] = {
    "adam": _adam,
    "adafactor": _adafactor,
    "sgd": _sgd,
}


def make_optimizer(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    return OPTIMIZERS[name](params, lr)


def batch_indices(n_windows: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Window indices of step ``step``: pass ``p = step // (n_windows // batch_size)`` over a permutation seeded
    by ``seed + p``; a pure function of its arguments (resume-safe). Windows past the last full batch of a pass
    are skipped in that pass (a different permutation next pass)."""
    if batch_size > n_windows:
        raise ValueError(f"batch of {batch_size} windows but only {n_windows} calibration windows; lower the batch "
                         "or raise calibration.n_samples")
    per_pass = n_windows // batch_size
    p, j = divmod(step, per_pass)
    perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + p))
    return perm[j * batch_size : (j + 1) * batch_size]


class Penalty(Protocol):
    """A step-dependent term added to the loss, with state that a checkpoint must carry."""

    def __call__(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(term to add to the loss, scalars to log). Called after the gradients are zeroed and before the CE
        backward; a penalty may back-propagate itself into ``.grad`` and return a detached term."""

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


@dataclass
class TrainResult:
    """``history``: one record per logged step (step, ce, loss and the penalty's scalars); ``resumed_from``: the
    step a checkpoint supplied (0 = fresh start)."""

    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    steps: int = 0


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
                          ) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_train_checkpoint(path: str | os.PathLike, step: int, params: dict[str, nn.Parameter],
                          opt: torch.optim.Optimizer, penalty: Penalty | None, history: list[dict[str, float]],
                          fingerprint: str) -> None:
    """Everything a resumed run needs to continue bit-for-bit, in one atomically written safetensors file."""
    tensors = {f"param.{n}": p.detach() for n, p in params.items()}
    opt_tensors, opt_meta = _optimizer_state(opt)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if penalty is not None:
        tensors.update({f"penalty.{k}": v for k, v in penalty.state_tensors().items()})
    save_tensors(path, tensors, {"step": step, "fingerprint": fingerprint, "optimizer": opt_meta,
                                 "history": history})


def load_train_checkpoint(path: str | os.PathLike, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                          penalty: Penalty | None, fingerprint: str) -> tuple[int, list[dict[str, float]]] | None:
    """Restore a checkpoint into ``params`` / ``opt`` / ``penalty``; ``None`` (nothing restored) when the file is
    missing or belongs to a run with other settings."""
    path = Path(path)
    if not path.is_file():
        return None
    tensors, meta = load_tensors(path)
    if meta.get("fingerprint") != fingerprint:
        log.warning("checkpoint %s belongs to other settings (fingerprint %s, now %s): starting afresh", path,
                    meta.get("fingerprint"), fingerprint)
        return None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    _load_optimizer_state(opt, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    if penalty is not None:
        penalty.load_state_tensors({k[len("penalty."):]: v for k, v in tensors.items() if k.startswith("penalty.")})
    return int(meta["step"]), list(meta["history"])


def _bar(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=2.0,
                disable=os.environ.get("LOWRANK_NO_PROGRESS", "0") == "1")


def train(model: nn.Module, params: dict[str, nn.Parameter], windows: torch.Tensor, *, steps: int, batch_size: int,
          lr: float, optimizer: str = "adam", seed: int = 0, device: torch.device | str = "cpu",
          penalty: Penalty | None = None, checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 0,
          settings: dict[str, Any] | None = None, log_every: int = 1, desc: str = "fine-tune",
          stop_after: int | None = None) -> TrainResult:
    """Minimise ``CE + penalty(t)`` over ``params`` for ``steps`` optimiser steps (``t = 0 .. steps-1``).

    ``checkpoint``: a file to resume from (if it holds a run with the same ``settings``) and to write every
    ``checkpoint_every`` steps (0 = never). ``stop_after``: return after this many steps of *this call* (tests
    use it to simulate a killed run). Every other parameter of ``model`` is frozen for the duration.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(params.values())
    for p in trainable:
        p.requires_grad_(True)
    opt = make_optimizer(optimizer, trainable, lr)
    fingerprint = config_hash({"settings": settings or {}, "steps": steps, "batch_size": batch_size, "lr": lr,
                               "optimizer": optimizer, "seed": seed, "params": sorted(params),
                               "windows": list(windows.shape)})
    result = TrainResult()
    start = 0
    if checkpoint is not None:
        restored = load_train_checkpoint(checkpoint, params, opt, penalty, fingerprint)
        if restored is not None:
            start, result.history = restored
            result.resumed_from = start
            log.info("resumed from %s at step %d of %d", checkpoint, start, steps)
    if start == 0:
        torch.manual_seed(seed)
    was_training = model.training
    model.train()
    bar = _bar(steps, start, desc)
    done = 0
    try:
        for t in range(start, steps):
            batch = windows[batch_indices(windows.shape[0], batch_size, seed, t)].to(device)
            opt.zero_grad(set_to_none=True)
            logs: dict[str, float] = {}
            term = None
            if penalty is not None:  # may back-propagate its own terms into .grad (a detached term is returned)
                term, logs = penalty(t)
            ce, _ = causal_lm_loss(model, batch)
            loss = ce if term is None else ce + term.to(ce.device, ce.dtype)
            loss.backward()
            opt.step()
            rec = {"step": t, "ce": float(ce.detach()), "loss": float(loss.detach()), **logs}
            if t % max(1, log_every) == 0 or t == steps - 1:
                result.history.append(rec)
            if t % max(1, steps // 20) == 0 or t == steps - 1:
                log.info("%s step %d/%d: %s", desc, t + 1, steps,
                         ", ".join(f"{k} {v:.5g}" for k, v in rec.items() if k != "step"))
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k != "step"}, refresh=False)
            done += 1
            if checkpoint is not None and checkpoint_every > 0 and (t + 1) % checkpoint_every == 0 and t + 1 < steps:
                save_train_checkpoint(checkpoint, t + 1, params, opt, penalty, result.history, fingerprint)
            if stop_after is not None and done >= stop_after:
                break
    finally:
        bar.close()
        model.train(was_training)
        for p, f in flags.items():
            p.requires_grad_(f)
        opt.zero_grad(set_to_none=True)
    result.steps = start + done
    return result

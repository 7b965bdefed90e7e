"""The layer-wise engine: a model run one decoder block at a time.

Every stage that walks the decoder blocks (calibration statistics, streamed gradients and scores, sensitivity,
truncation with resume, refinement) goes through this module:

1. **Capture.** :func:`capture_block_inputs` runs the model's stem (embeddings, rotary tables, masks) on each
   batch with every block replaced by a pass-through catcher: the hidden states entering block 0 and the extra
   arguments each block is called with (:class:`BlockInputs`). The stem's own modules are moved to the compute
   device for it (:func:`move_stem`) and back to CPU after.
2. **The output convention.** A block returns a tensor or a tuple whose first item is the hidden states
   (transformers 4.x); :func:`block_output` takes the hidden states either way, and ``BlockInputs.as_tuple``
   records which (learned once, by running the real block 0 on the first batch).
3. **Boundaries.** The activations between blocks live on the device when they fit, else in (pinned) CPU
   memory: :func:`offload_block_inputs` for one boundary, :class:`BoundaryStore` for all ``L + 1`` of them.
4. **Place, run, release.** ``with resident(model, i, device) as block:`` puts block ``i`` on the device (read
   from the checkpoint shards when the model is lazy: :mod:`lowrank.sharded`) and returns it to its home (or to
   ``meta``) after, whatever happens in between. :func:`stream_blocks` runs every block over every batch in
   order through it, advancing the boundary in place; :func:`for_each_block` calls a function per block.
5. **Head.** ``with head_pass(model, device, as_tuple) as inject:`` the model's own forward runs only its stem
   and its head (final norm, LM head, any logit scaling): every block passes through and the last returns the
   hidden states given to ``inject``, so the logits of a streamed forward come from the model's own code.
   :func:`streamed_batches` chains the three for a forward-only pass (perplexity, a judged loss).

Only one block's weights and the boundary activations are resident at a time, never the whole model's
activations: peak memory is flat in depth.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .model import Target, find_blocks
from .runtime import progress
from .sharded import block_of, place_block, release_block

__all__ = ["BlockInputs", "capture_block_inputs", "block_output", "move_stem", "stem_homes", "targets_by_block",
           "resident", "for_each_block", "stream_blocks", "OFFLOAD_MODES", "boundary_bytes", "resolve_offload",
           "offload_block_inputs", "BoundaryStore", "head_pass", "frozen_walk", "streamed_batches"]


# ---- 1. capture of the block inputs ---------------------------------------------------------------------------


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a decoder block: records its call, passes the hidden states through unchanged.

    ``as_tuple`` makes it return ``(hidden_states,)``, for models whose blocks return tuples (transformers 4.x
    decoder layers) and whose loop then takes ``outputs[0]``: returning a bare tensor there would silently index
    the batch. ``stop`` raises after recording, so the stem runs no further than this block.
    """

    def __init__(self, stop: bool, record: list[tuple[torch.Tensor, tuple, dict]], as_tuple: bool) -> None:
        super().__init__()
        self.stop, self.record, self.as_tuple = stop, record, as_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden_states = args[0] if args else kwargs.pop("hidden_states")
        self.record.append((hidden_states, args[1:], kwargs))
        if self.stop:
            raise _StopForward
        return (hidden_states,) if self.as_tuple else hidden_states


@dataclass
class BlockInputs:
    """Per batch: the hidden states entering block 0, and the extra (args, kwargs) each block is called with.

    ``calls[b][i]`` holds block ``i``'s positional and keyword arguments for batch ``b`` after the hidden states
    (attention masks, rotary embeddings, ...); models whose blocks get different masks (sliding-window layers)
    or different rotary tables (local / global layers) are handled since each block's own call is recorded.
    ``as_tuple``: whether the blocks return tuples (transformers 4.x) rather than bare tensors.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    calls: list[list[tuple[tuple, dict]]] = field(default_factory=list)
    as_tuple: bool = False


def _run_stem(model: nn.Module, batch: torch.Tensor) -> None:
    try:
        model(input_ids=batch, use_cache=False)
    except _StopForward:
        pass


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returned: ``out`` itself, or its first item when it is a tuple / list."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device
                         ) -> BlockInputs:
    """Run the model's stem on each batch of ``windows`` with every block replaced by a pass-through catcher.

    The catchers must return what a real block returns (a tensor, or a tuple whose first item is the hidden
    states); that convention is learned first by running the real block 0 once on the first batch's inputs.
    """
    _, blocks = find_blocks(model)
    originals = list(blocks)
    n_blocks = len(blocks)
    record: list[tuple[torch.Tensor, tuple, dict]] = []
    out = BlockInputs()
    moved = move_stem(model, originals, device)  # embeddings, rotary tables, masks' buffers; blocks stay put
    try:
        # 1. the output convention of a block: catch block 0 on the first batch and run the real block once
        blocks[0] = _Catcher(True, record, as_tuple=False)
        _run_stem(model, windows[:batch_size].to(device))
        if len(record) != 1:
            raise RuntimeError(f"{type(model).__name__} did not call its first decoder block: cannot stream it")
        h0, args, kwargs = record[0]
        blocks[0] = originals[0]
        with resident(model, 0, device) as block0:  # a lazy (meta) model loads its block here
            as_tuple = isinstance(block0(h0, *args, **kwargs), (tuple, list))
        out.as_tuple = as_tuple
        # 2. every block's call, every batch
        for i in range(n_blocks):
            blocks[i] = _Catcher(i == n_blocks - 1, record, as_tuple)
        for start in range(0, windows.shape[0], batch_size):
            record.clear()
            _run_stem(model, windows[start : start + batch_size].to(device))
            if len(record) != n_blocks:
                raise RuntimeError(f"captured {len(record)} of {n_blocks} block calls: the model does not call "
                                   "its blocks in sequence")
            out.hidden.append(record[0][0])
            out.calls.append([(a, dict(k)) for _, a, k in record])
        record.clear()
    finally:
        for i, blk in enumerate(originals):
            blocks[i] = blk
        for mod in moved:
            mod.to("cpu")
    return out


def _stem_modules(model: nn.Module, blocks: list[nn.Module]) -> Iterator[tuple[nn.Module, list[torch.Tensor]]]:
    """Every module outside the blocks that holds parameters or buffers of its own, with those tensors."""
    block_ids = {id(m) for b in blocks for m in b.modules()}
    for mod in model.modules():
        if id(mod) in block_ids:
            continue
        own = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        if own:
            yield mod, own


def move_stem(model: nn.Module, blocks: list[nn.Module], device: torch.device) -> list[nn.Module]:
    """Move every parameter/buffer-holding module outside the blocks to ``device``; returns what was moved."""
    if device.type == "cpu":
        return []
    moved = []
    for mod, _ in _stem_modules(model, blocks):
        mod.to(device)
        moved.append(mod)
    return moved


def stem_homes(model: nn.Module, blocks: list[nn.Module]) -> list[tuple[nn.Module, torch.device]]:
    """Every parameter/buffer-holding module outside the blocks and the device it lives on now."""
    return [(mod, own[0].device) for mod, own in _stem_modules(model, blocks)]


@contextmanager
def frozen_walk(model: nn.Module) -> Iterator[None]:
    """A block walk's model state: eval mode and no parameter requiring grad inside; after, the flags, the mode
    and the stem's devices (the stem helpers park it on CPU) as they were."""
    _, blocks = find_blocks(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    homes = stem_homes(model, list(blocks))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for mod, dev in homes:
            mod.to(dev)
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)


def targets_by_block(targets: list[Target]) -> dict[int, list[Target]]:
    """``{block index: its targets}`` in the order given (blocks without targets are absent)."""
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)
    return by_block


# ---- 2. place / run / release ------------------------------------------------------------------------------


@contextmanager
def resident(model: nn.Module, i: int, device: torch.device | str) -> Iterator[nn.Module]:
    """``with resident(model, i, device) as block:`` block ``i`` on ``device``, back home (or ``meta``) after."""
    home = place_block(model, i, device)
    try:
        yield block_of(model, i)
    finally:
        release_block(model, i, home)


def for_each_block(model: nn.Module, targets: list[Target], device: torch.device | str,
                   fn: Callable[[int, list[Target]], Any]) -> dict[int, Any]:
    """Call ``fn(i, targets of block i)`` with block ``i`` resident on ``device``, for every block with targets."""
    by_block = targets_by_block(targets)
    out = {}
    for i in sorted(by_block):
        with resident(model, i, device):
            out[i] = fn(i, by_block[i])
    return out


@torch.no_grad()
def stream_blocks(model: nn.Module, inputs: BlockInputs, device: torch.device,
                  on_block: Callable[[int, nn.Module], Callable[[], None]] | None = None,
                  desc: str = "blocks") -> None:
    """Run every block over every batch in order, moving one block at a time to ``device``.

    ``on_block(i, block)`` is called before block ``i`` runs and returns a finaliser called after it (install
    hooks, then remove them and reduce). ``inputs.hidden`` is advanced in place to each block's outputs.
    """
    n_blocks = len(find_blocks(model)[1])
    for i in progress(range(n_blocks), desc=desc, total=n_blocks):
        with resident(model, i, device) as block:
            finish = on_block(i, block) if on_block else None
            for b in range(len(inputs.hidden)):
                args, kwargs = inputs.calls[b][i]
                x = inputs.hidden[b]  # on the device, or in CPU memory when offloaded
                inputs.hidden[b] = block_output(block(x.to(device), *args, **kwargs)).to(x.device)
            if finish:
                finish()


# ---- 3. where the boundary activations live -----------------------------------------------------------------

OFFLOAD_MODES = ("auto", "device", "cpu")


def boundary_bytes(windows: torch.Tensor, hidden: int, n_blocks: int, dtype: torch.dtype) -> int:
    """Bytes of the ``n_blocks + 1`` boundary activations of ``windows`` ([B, T]) of width ``hidden``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(windows.numel()) * hidden * (n_blocks + 1) * itemsize


def resolve_offload(offload: str, device: torch.device, need: int, fraction: float = 0.5) -> torch.device:
    """Where boundaries live: ``device``, ``cpu``, or ``auto`` = the device when ``need`` fits in ``fraction`` of
    its free memory (always the device on CPU)."""
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"boundary offload must be one of {OFFLOAD_MODES}, got {offload!r}")
    if offload == "cpu" or device.type == "cpu":
        return torch.device("cpu")
    if offload == "device":
        return device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return device if need <= fraction * free else torch.device("cpu")
    return torch.device("cpu")  # pragma: no cover - other accelerators: be safe


def offload_block_inputs(inputs: BlockInputs, device: torch.device | str, offload: str = "auto") -> torch.device:
    """Move the captured block inputs to where they should live while the blocks stream: the device when one
    boundary fits in half its free memory (``auto``), else CPU."""
    device = torch.device(device)
    if not inputs.hidden:
        return device
    need = sum(h.numel() * h.element_size() for h in inputs.hidden)
    home = resolve_offload(offload, device, need)
    if home != inputs.hidden[0].device:
        pin = home.type == "cpu" and device.type == "cuda"
        inputs.hidden = [h.to(home).pin_memory() if pin else h.to(home) for h in inputs.hidden]
    return home


class BoundaryStore:
    """``h[i][b]``: the input of block ``i`` (``i = L`` the last block's output) for batch ``b``, kept on ``home``
    (pinned when on CPU and the compute device is CUDA, for asynchronous copies)."""

    def __init__(self, home: torch.device, device: torch.device) -> None:
        self.home, self.device = home, device
        self.h: list[list[torch.Tensor]] = []
        self._pin = home.type == "cpu" and device.type == "cuda"

    def put(self, i: int, b: int, x: torch.Tensor) -> None:
        while len(self.h) <= i:
            self.h.append([])
        row = self.h[i]
        if self._pin:  # device -> pinned host copy, ordered on the stream before any later copy back
            y = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
            y.copy_(x.detach(), non_blocking=True)
        else:
            y = x.detach().to(self.home)
        if b == len(row):
            row.append(y)
        else:
            row[b] = y

    def get(self, i: int, b: int) -> torch.Tensor:
        return self.h[i][b].to(self.device, non_blocking=True)

    def drop(self, i: int) -> None:
        """Free block ``i``'s inputs once the backward has passed it."""
        if i < len(self.h):
            self.h[i] = []


# ---- 4. the head over the last boundary -----------------------------------------------------------------------


class _Emit(nn.Module):
    """Stand-in block for the head pass: the last one returns the injected hidden states, the others pass through."""

    def __init__(self, inject: list[torch.Tensor | None], as_tuple: bool) -> None:
        super().__init__()
        self.inject, self.as_tuple = inject, as_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        if self.inject[0] is not None:
            h = self.inject[0]
        return (h,) if self.as_tuple else h


@contextmanager
def head_pass(model: nn.Module, device: torch.device, as_tuple: bool
              ) -> Iterator[Callable[[torch.Tensor | None], None]]:
    """``with head_pass(model, device, as_tuple) as inject:`` ``inject(h_L)`` then ``model(input_ids=batch)``
    returns the head's output on ``h_L`` (the last block's output for that batch): the stem runs on ``device``,
    every block is a pass-through stand-in and the last one returns ``h_L``. Blocks and stem go back after."""
    _, blocks = find_blocks(model)
    originals = list(blocks)
    n_blocks = len(blocks)
    slot: list[torch.Tensor | None] = [None]

    def inject(h: torch.Tensor | None) -> None:
        slot[0] = h

    moved = move_stem(model, originals, device)
    try:
        for i in range(n_blocks):
            blocks[i] = _Emit(slot if i == n_blocks - 1 else [None], as_tuple)
        yield inject
    finally:
        slot[0] = None
        for i, blk in enumerate(originals):
            blocks[i] = blk
        for mod in moved:
            mod.to("cpu")


def streamed_batches(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device | str,
                     on_block: Callable[[int, nn.Module], Callable[[], None] | None] | None = None,
                     desc: str = "blocks") -> Iterator[torch.Tensor]:
    """A forward over ``windows`` with one decoder block resident at a time: captures the block inputs, runs
    every block (:func:`stream_blocks`, ``on_block`` as there), then yields each batch (on ``device``) while
    :func:`head_pass` holds that batch's last boundary, so ``model(input_ids=batch)`` returns its logits from
    the model's own head. Each batch's boundary is dropped once the next is asked for."""
    device = torch.device(device)
    inputs = capture_block_inputs(model, windows, batch_size, device)
    offload_block_inputs(inputs, device)
    stream_blocks(model, inputs, device, on_block=on_block, desc=desc)
    with head_pass(model, device, inputs.as_tuple) as inject:
        for b, s in enumerate(range(0, windows.shape[0], batch_size)):
            inject(inputs.hidden[b].to(device))
            yield windows[s : s + batch_size].to(device)
            inputs.hidden[b] = inputs.hidden[b][:0]

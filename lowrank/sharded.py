"""Models larger than memory: a meta-device skeleton whose decoder blocks are loaded from safetensors on demand.

:func:`load_lazy_model` builds the architecture on the ``meta`` device (no memory), loads everything outside the
decoder blocks (embeddings, final norm, LM head: a few percent of a 7B-70B model) and leaves every block on
``meta``. :func:`place_block` reads one block's tensors from the checkpoint's safetensors shards (only the shards
holding them, memory-mapped) straight onto the compute device; :func:`release_block` returns it to ``meta``.
The layer-wise engine (:func:`lowrank.blocks.resident`, used by every streamed stage) calls these two for every
block, so a lazy model and an ordinary one go through the same code: peak host memory is the stem plus one block,
whatever the depth.

A model is loaded lazily when its weights do not fit in a fraction of the available host memory
(:func:`load_model_streaming`), or always when asked.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .factorized import LowRankLinear
from .model import find_blocks, load_model, model_path

__all__ = ["lazy_setting", "ShardedCheckpoint", "load_lazy_model", "is_lazy", "block_of", "place_block",
           "release_block", "checkpoint_bytes", "load_model_streaming", "streams", "attach_factors"]

log = logging.getLogger(__name__)

_LAZY_ATTR = "_lowrank_lazy"


class ShardedCheckpoint:
    """Name → shard file of a Hugging Face safetensors checkpoint (``model.safetensors`` or an index)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.exists():
            self.weight_map: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
        elif single.exists():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.weight_map = {k: single.name for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.folder} holds no model.safetensors(.index.json): lazy loading needs a "
                                    "safetensors checkpoint (convert it with save_pretrained(safe_serialization=True))")
        self.raw: set[str] = set()  # keys read in their stored dtype

    def load(self, names: list[str], device: torch.device | str, dtype: torch.dtype | None
             ) -> dict[str, torch.Tensor]:
        """The named tensors, read shard by shard, cast to ``dtype`` (floating tensors only) on ``device``."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise KeyError(f"checkpoint {self.folder} lacks {len(missing)} tensors, e.g. {missing[:3]}")
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for fname, keys in by_file.items():
            with safe_open(str(self.folder / fname), framework="pt", device="cpu") as f:
                for k in keys:
                    t = f.get_tensor(k)
                    if dtype is not None and t.is_floating_point() and k not in self.raw:
                        t = t.to(dtype)
                    out[k] = t.to(device)
        return out

    def add_file(self, path: str | os.PathLike, cast: bool = True) -> list[str]:
        """Also read every tensor of the safetensors file ``path`` (e.g. a compressed model's factors) from it;
        ``cast=False``: its tensors keep their stored dtypes (int8 rows, float16, float32 scales). Returns its
        keys."""
        from safetensors import safe_open

        path = Path(path).resolve()
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        self.weight_map.update({k: str(path) for k in keys})  # absolute: folder / path is path
        if cast:
            self.raw.difference_update(keys)
        else:
            self.raw.update(keys)
        return keys

    def total_bytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.weight_map.values()))

    def total_numel(self) -> int:
        """Number of stored elements, read from the shard headers (no tensor is loaded)."""
        from safetensors import safe_open

        n = 0
        for fname in set(self.weight_map.values()):
            with safe_open(str(self.folder / fname), framework="pt") as f:
                for k in f.keys():
                    shape = f.get_slice(k).get_shape()
                    size = 1
                    for d in shape:
                        size *= int(d)
                    n += size
        return n


@dataclass
class _Lazy:
    checkpoint: ShardedCheckpoint
    prefix: str
    dtype: torch.dtype
    stored: set[int] = field(default_factory=set)  # ids of LowRankLinear modules read from a file (re-readable)


def is_lazy(model: nn.Module) -> bool:
    return getattr(model, _LAZY_ATTR, None) is not None


def load_lazy_model(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Skeleton on ``meta`` with the stem loaded on CPU; blocks stay on ``meta`` until :func:`place_block`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = ShardedCheckpoint(folder)
    cfg = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed, not stored
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    prefix, _ = find_blocks(model)
    stem = [k for k in model.state_dict() if not k.startswith(prefix + ".")]
    present = [k for k in stem if k in ckpt.weight_map]
    model.load_state_dict(ckpt.load(present, "cpu", dtype), strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a tied LM head is not stored: point it at the loaded embedding
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix + ".")]
    if still_meta:
        raise KeyError(f"checkpoint {folder} lacks stem tensors {still_meta[:3]}")
    setattr(model, _LAZY_ATTR, _Lazy(ckpt, prefix, dtype))
    return model.eval()


def _block_keys(model: nn.Module, i: int) -> tuple[str, nn.Module]:
    prefix, blocks = find_blocks(model)
    return f"{prefix}.{i}.", blocks[i]


def block_of(model: nn.Module, i: int) -> nn.Module:
    """Decoder block ``i`` of ``model``."""
    return _block_keys(model, i)[1]


def place_block(model: nn.Module, i: int, device: torch.device | str) -> torch.device:
    """Put block ``i`` on ``device`` (read from the checkpoint if the model is lazy); returns where it was."""
    key, block = _block_keys(model, i)
    lazy = getattr(model, _LAZY_ATTR, None)
    metas = [n for n, p in block.named_parameters() if p.is_meta]
    # a lazy block with any weight on meta goes back to meta, even when factors kept on CPU come first
    home = torch.device("meta") if metas else next(block.parameters()).device
    if lazy is not None and metas:
        names = [n for n, p in block.state_dict(keep_vars=True).items() if p.is_meta]
        tensors = lazy.checkpoint.load([key + n for n in names], device, lazy.dtype)
        block.load_state_dict({n: tensors[key + n] for n in names}, strict=False, assign=True)
    block.to(device)
    return home


def release_block(model: nn.Module, i: int, home: torch.device | str) -> None:
    """Return block ``i`` to ``home``; a lazy block goes back to ``meta``, except the ``LowRankLinear`` factors
    made since it was placed (the compressed result, kept on CPU); factors read from a file go back too."""
    _, block = _block_keys(model, i)
    if torch.device(home).type != "meta":
        block.to(home)
        return
    lazy = getattr(model, _LAZY_ATTR)
    results = [m for m in block.modules() if isinstance(m, LowRankLinear) and id(m) not in lazy.stored]
    for mod in results:
        mod.to("cpu")
    keep = {id(p) for m in results for p in m.parameters()}
    for mod in block.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if id(p) not in keep:
                setattr(mod, name, nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad))
        if id(mod) in lazy.stored:  # its buffers (int8 rows) were read from a file too
            for sub in mod.modules():
                for name, b in list(sub._buffers.items()):
                    if b is not None:
                        sub._buffers[name] = b.to("meta")


def attach_factors(model: nn.Module, path: str | os.PathLike, names: list[str], cast: bool = True,
                   keep: bool = False) -> list[str]:
    """Read the modules ``names`` of a lazy ``model`` (on ``meta``: ``LowRankLinear`` factors, ``QuantizedLinear``
    rows) from the safetensors file ``path`` with their block, and send them back to ``meta`` after it, like the
    dense weights (``cast``: to the model's dtype, as the dense weights; else as stored); returns the file's
    keys. ``keep``: the factors are the stage's result (refine changes them in place): read with their block,
    then kept on CPU like factors the stage made (so the model ends holding its factors, never the dense
    weights)."""
    lazy = getattr(model, _LAZY_ATTR)
    keys = lazy.checkpoint.add_file(path, cast)
    if not keep:
        lazy.stored.update(id(model.get_submodule(n)) for n in names)
    return keys


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    return ShardedCheckpoint(folder).total_bytes()


def _available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def lazy_setting(value: bool | str | None) -> bool | None:
    """The ``lazy`` argument of :func:`load_model_streaming` from the config's ``runtime.lazy_load``: ``true``
    always lazy, ``false`` never, ``auto`` (or ``None``) by size. The results are identical either way."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        return value
    raise ValueError(f"runtime.lazy_load must be true, false or auto, got {value!r}")


def load_model_streaming(manifest_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                         lazy: bool | None = None, fraction: float = 0.5,
                         device: torch.device | str | None = None) -> nn.Module:
    """The model for a streamed stage: lazy on CPU (:func:`load_lazy_model`) when :func:`streams` says so (``lazy``,
    or with ``lazy=None`` a checkpoint cast to ``dtype`` above ``fraction`` of the available host memory or, for a
    CUDA ``device``, of its free memory); else the whole model on ``device`` (CPU when ``None``)."""
    folder = model_path(manifest_path)
    if streams(folder, dtype, lazy, fraction, device=device):
        return load_lazy_model(folder, dtype)
    return load_model(manifest_path, dtype=dtype, device=device or "cpu")


def streams(folder: str | os.PathLike, dtype: torch.dtype, lazy: bool | None, fraction: float = 0.5,
            device: torch.device | str | None = None, device_free: int | None = None) -> bool:
    """Whether the model in ``folder`` is loaded lazily: ``lazy`` when given, else (``None``) when its
    checkpoint cast to ``dtype`` exceeds ``fraction`` of the available host memory (never without safetensors)
    or, for a stage whose in-memory path puts the whole model on a CUDA ``device`` (evaluation, correction,
    quantize), ``fraction`` of that device's free memory (``device_free``: those bytes, else asked of CUDA)."""
    if lazy is not None:
        return lazy
    try:
        ckpt = ShardedCheckpoint(folder)
    except FileNotFoundError:
        return False
    need = ckpt.total_numel() * torch.empty((), dtype=dtype).element_size()
    if device_free is None and device is not None and torch.device(device).type == "cuda":
        device_free = int(torch.cuda.mem_get_info(torch.device(device))[0])
    lazy = need > fraction * _available_bytes() or (device_free is not None and need > fraction * device_free)
    log.info("model %s: ~%.1f GB in %s, %s", folder, need / 1e9, dtype, "lazy (block by block)" if lazy
             else "fits in memory")
    return lazy

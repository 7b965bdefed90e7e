"""Artifact I/O: atomic writes, safetensors tensor dicts with JSON metadata, JSON manifests.

Every artifact is written to a temporary file in the destination folder and then renamed with
:func:`os.replace`, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "atomic_path",
    "write_json",
    "read_json",
    "save_tensors",
    "load_tensors",
    "read_tensor_metadata",
    "file_sha256",
    "config_hash",
    "check_finite",
]

log = logging.getLogger(__name__)


def _umask() -> int:
    """The process umask (read by setting and restoring it: there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_orphans(path: Path, suffix: str) -> None:
    """Remove the temp files an interrupted earlier write of ``path`` left beside it (named in the log)."""
    # mkstemp's names: ".<name>." + 8 random characters + suffix + ".tmp" (so never another target's temp file)
    for orphan in path.parent.glob(f".{glob.escape(path.name)}.{'?' * 8}{glob.escape(suffix)}.tmp"):
        try:
            size = orphan.stat().st_size
            orphan.unlink()
        except FileNotFoundError:  # pragma: no cover - removed meanwhile
            continue
        log.warning("removed %s (%d bytes), left by an interrupted write of %s", orphan, size, path.name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file gets the mode the umask gives a new file (not mkstemp's 0600), so a group can read shared results.
    Temp files of an earlier write of ``path`` that was killed (``.<name>.*.tmp``) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; an artifact gets the mode of any new file
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None
                 ) -> None:
    """Save a flat tensor dict to safetensors, atomically. ``metadata`` is stored as one JSON string.

    A tensor with a NaN or an infinity is refused (:func:`check_finite`): no artifact ever holds one.
    """
    meta = {"lowrank": json.dumps(metadata or {}, default=_json_default)}
    check_finite(tensors, str(path))
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=meta)


def read_tensor_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata stored by :func:`save_tensors` (without loading any tensor)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("lowrank", "{}"))


def load_tensors(path: str | os.PathLike, keys: list[str] | None = None, device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors (all, or only ``keys``) and the JSON metadata of a safetensors file."""
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        names = list(f.keys()) if keys is None else keys
        for k in names:
            out[k] = f.get_tensor(k)
        meta = f.metadata() or {}
    return out, json.loads(meta.get("lowrank", "{}"))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(obj: Any) -> str:
    """A short, order-independent hash of a JSON-able config slice (recorded in manifests)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` naming ``what`` (an artifact or a model), the first tensor holding NaN or infinite
    values and their count, and how many tensors are affected; integer tensors are always finite."""
    bad: list[tuple[str, int, int]] = []
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            finite = torch.isfinite(t.detach())
            if not bool(finite.all()):
                bad.append((name, int((~finite).sum()), t.numel()))
    if bad:
        name, count, numel = bad[0]
        raise ValueError(f"{what}: tensor {name!r} has {count} non-finite (NaN or inf) values of {numel}"
                         + (f", and {len(bad) - 1} more tensors have some" if len(bad) > 1 else "")
                         + "; nothing is written. Non-finite values come from the source model's weights or an "
                         "overflow upstream: check the source (models.<key>) and the earlier stage's log")

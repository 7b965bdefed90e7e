"""ZS-SVD on randomly initialised LLaMA-shaped models of any width and depth: per-stage time and peak memory
next to the hardware floor measured in the same run (no download; CPU or CUDA).

Stages (the pipeline's own functions, streamed block by block):

* ``input Grams``: :func:`lowrank.calibration.collect_input_grams` over ``--windows × --seq-len`` tokens;
  floor: the plain forward over the same tokens.
* ``gradients + scores``: :func:`lowrank.streaming.fused_scores` (streamed forward/backward, first-order scores of
  each block as soon as its gradients are complete) over ``--grad-windows``; floor: forward + backward over the
  same tokens plus one decomposition of every whitened target (and its Cholesky factor).
* ``allocation``: zero-sum allocation at ``--ratio``.
* ``truncation``: :func:`lowrank.resume.truncate_blocks` (per-block factor files); floor: the decompositions.

``--every-stage`` (with ``--lazy``) adds the later stages as their scripts run them on a lazy model
(``runtime.lazy_load: true``), each streamed one block at a time: ``evaluation``
(:func:`lowrank.evaluation.perplexity` of the truncated model read back with
:func:`lowrank.checkpoint.load_compressed` ``lazy``), ``correction`` (:func:`lowrank.correction.correct_streamed`,
one backtrack, judged on other windows), ``output_kl`` (:func:`lowrank.output_metric.collect_output_kl` over
``--kl-windows``), ``quantize`` (:func:`lowrank.quantization.quantize_model`, ``loss_aware``) and ``refine``
(:func:`lowrank.refine.refine_model`, closed form with the ``B`` refit, over ``--grad-windows``: the dense and the
compressed model one block each, the factors kept as refined); ``--later`` picks some of them. For each stage
the table gives its peak host RSS minus the results it holds by nature (the Grams, alive throughout; its
factors, int8 rows or metrics; its offloaded boundary activations), which must stay flat in depth.

Host RSS is the allocator's view: with glibc's default dynamic mmap threshold, freed buffers of up to 32 MB stay
in the heap, so a process that frees more, larger buffers (a deeper model) shows a higher RSS without holding
anything (the +28 % "growth" of the streamed stages at width 256, 4 → 32 blocks). The sweep therefore runs each
point with ``MALLOC_MMAP_THRESHOLD_=131072`` (buffers above 128 KiB always mmapped, returned when freed) and
trims the heap between stages; ``--default-malloc`` keeps glibc's defaults.

The floors run with the model resident on the device when it fits there (else block by block, as the stages),
in the same process, so ratios are meaningful on any machine. Peak memory: host RSS (sampled every 5 ms) and, on
CUDA, ``torch.cuda.max_memory_allocated`` per stage. ``--lazy`` saves the random model as safetensors shards and
reloads it on the meta device (:mod:`lowrank.sharded`), so host memory does not hold the weights.

One configuration::

    python bench/scale.py --hidden 256 --mlp 688 --layers 8 --windows 16 --seq-len 256 --grad-windows 8

A sweep (each point in a fresh process, a markdown table on stdout)::

    python bench/scale.py --sweep-layers 4,8,16,32 --hidden 256 --mlp 688 --windows 16 --seq-len 256 --lazy
    python bench/scale.py --sweep-windows 8,16,32 --layers 8 --hidden 256 --mlp 688 --seq-len 256 --lazy

The LLaMA-7B shape on one GPU (bench/README.md)::

    python bench/scale.py --hidden 4096 --mlp 11008 --layers 32 --heads 32 --kv-heads 32 --vocab 32000 \\
        --windows 256 --seq-len 2048 --grad-windows 256 --grad-batch 4 --batch 8 --dtype bfloat16 --device cuda --lazy
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import torch

os.environ.setdefault("LOWRANK_NO_PROGRESS", "1")

from lowrank.allocation import allocate  # noqa: E402
from lowrank.blocks import boundary_bytes, for_each_block  # noqa: E402
from lowrank.calibration import collect_input_grams  # noqa: E402
from lowrank.decompose import thin_svd_many  # noqa: E402
from lowrank.factorized import LowRankLinear  # noqa: E402
from lowrank.gradients import causal_lm_loss  # noqa: E402
from lowrank.model import find_targets, linear_weight  # noqa: E402
from lowrank.resume import truncate_blocks  # noqa: E402
from lowrank.runtime import DTYPES  # noqa: E402
from lowrank.sharded import load_lazy_model  # noqa: E402
from lowrank.spaces import input_factor  # noqa: E402
from lowrank.streaming import fused_scores  # noqa: E402
from lowrank.whitening import whiten  # noqa: E402


class Peak:
    """Peak host RSS (a sampling thread) and CUDA allocated memory over a ``with`` block, in GB."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.rss, self.cuda, self._stop = device, 0.0, 0.0, threading.Event()

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while True:  # at least one sample, and one after the stage ended
            self.rss = max(self.rss, proc.memory_info().rss / 1e9)
            if self._stop.is_set():
                return
            time.sleep(0.005)

    def __enter__(self) -> "Peak":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.cuda = torch.cuda.max_memory_allocated(self.device) / 1e9
        self.seconds = time.perf_counter() - self.start
        self._stop.set()
        self._t.join()


def build(a: argparse.Namespace) -> torch.nn.Module:
    """A random LLaMA of the requested shape in ``--dtype`` on CPU (meta skeleton filled in place: fast)."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.mlp, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                      max_position_embeddings=max(a.seq_len, 128), tie_word_embeddings=False)
    dtype = DTYPES[a.dtype]
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(cfg).to(dtype)
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # real (rotary inv_freq): to_empty would drop them
    model.to_empty(device="cpu")
    with torch.no_grad():
        for n, b in buffers.items():
            model.get_buffer(n).copy_(b)
    g = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # RMSNorm gains
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))
    model.eval()
    return model


def _save_random(a: argparse.Namespace, folder: str) -> None:
    build(a).save_pretrained(folder, safe_serialization=True, max_shard_size="2GB")


def build_lazy(a: argparse.Namespace, folder: str) -> torch.nn.Module:
    """The random model saved as safetensors shards by a child process, reloaded lazily here: building and
    serialising the whole model in this process would leave its freed pages in the allocator's heap, and the
    measured peak RSS would grow with depth for a reason no stage has."""
    import multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=_save_random, args=(a, folder))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"writing the random checkpoint failed ({proc.exitcode})")
    return load_lazy_model(folder, DTYPES[a.dtype])


def _batches(windows: torch.Tensor, b: int) -> list[torch.Tensor]:
    return [windows[s : s + b] for s in range(0, windows.shape[0], b)]


def floors(model: torch.nn.Module, a: argparse.Namespace, windows: torch.Tensor, gwin: torch.Tensor,
           device: torch.device, lazy: bool) -> dict[str, float]:
    """Forward, forward+backward (target weights only) with the model resident, when it fits."""
    out: dict[str, float] = {}
    if lazy:  # the floors run the resident model: read every block in (7B in bf16 fits one GPU)
        from lowrank.sharded import place_block

        for i in range(a.layers):
            place_block(model, i, device)
    model.to(device)
    weights = [linear_weight(model.get_submodule(t.name)) for t in find_targets(model)]
    with Peak(device) as p, torch.no_grad():
        for batch in _batches(windows, a.batch):
            model(input_ids=batch.to(device), use_cache=False)
    out["forward"] = p.seconds
    for w in weights:
        w.requires_grad_(True)
    with Peak(device) as p:
        for batch in _batches(gwin, a.grad_batch):
            loss, _ = causal_lm_loss(model, batch.to(device))
            torch.autograd.grad(loss, weights)
    out["forward_backward"] = p.seconds
    for w in weights:
        w.requires_grad_(False)
    return out


def _trim() -> None:
    """Hand the allocator's free heap back to the OS between stages (glibc), so a stage's RSS samples are its own
    and not what an earlier stage freed."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _factor_bytes(model: torch.nn.Module) -> int:
    return _tensor_bytes(q for m in model.modules() if isinstance(m, LowRankLinear) for q in m.parameters())


LATER = ("evaluation", "correction", "output_kl", "quantize", "refine")


def later_stages(a: argparse.Namespace, folder: str, compressed: str, stats: dict[str, Any], windows: torch.Tensor,
                 gwin: torch.Tensor, device: torch.device, shapes: dict[str, Any], scores: dict[str, Any],
                 held_before: int) -> dict[str, dict[str, float]]:
    """Evaluation, correction, output_kl, quantize (loss_aware) and refine (``a.later``: which), each as its
    script runs it on a lazy model
    (runtime.lazy_load true): the compressed model read back lazily from ``compressed`` (its factors with their
    block), the dense teacher / source from the shards in ``folder``. Each in its own peak window; ``held_gb``:
    what the stage holds by nature (``held_before``: the Grams, alive throughout, plus its own results)."""
    from lowrank.checkpoint import load_compressed
    from lowrank.correction import correct_streamed
    from lowrank.evaluation import perplexity
    from lowrank.gradients import streamed_gradients
    from lowrank.output_metric import collect_output_kl
    from lowrank.quantization import allocate_bytes, quantize_model
    from lowrank.quantized_linear import QuantizedLinear
    from lowrank.refine import RefineConfig, refine_model
    from lowrank.spaces import bind

    dtype = DTYPES[a.dtype]
    bound = (lambda w: boundary_bytes(w, a.hidden, a.layers, dtype)) if (a.offload == "cpu" or
                                                                        device.type == "cpu") else (lambda w: 0)
    out: dict[str, dict[str, float]] = {}

    def record(name: str, p: Peak, held: int) -> None:
        out[name] = {"s": p.seconds, "rss_gb": p.rss, "cuda_gb": p.cuda, "held_gb": (held_before + held) / 1e9}

    want = a.later.split(",")
    space = bind("input_gram", stats, 1e-6, "svd", device)
    if "evaluation" in want:
        _trim()
        with Peak(device) as p:
            model = load_compressed(compressed, dtype, lazy=True)
            perplexity(model, windows, a.batch, device)
        record("evaluation", p, 0)
        del model
    if "correction" in want:
        _trim()
        judge = windows.roll(-gwin.shape[0], dims=0)[: gwin.shape[0]]
        with tempfile.TemporaryDirectory(prefix="lowrank-correct-") as work, Peak(device) as p:
            model = load_compressed(compressed, dtype, lazy=True)
            teacher = load_lazy_model(folder, dtype)
            correct_streamed(model, teacher, find_targets(teacher), gwin, a.grad_batch, space, device, work,
                             backtrack=1, judge=judge)
        record("correction", p, _factor_bytes(model) + bound(gwin))
        del model, teacher
    if "output_kl" in want:
        _trim()
        kl_windows = windows[: a.kl_windows]
        with Peak(device) as p:
            model = load_lazy_model(folder, dtype)
            metric = collect_output_kl(model, kl_windows, a.batch, device, top_k=a.kl_top_k, max_windows=None)
        record("output_kl", p, _tensor_bytes(metric.C.values()) + bound(kl_windows))
        del model, metric
    if "quantize" in want:
        _trim()
        ranks = allocate_bytes("loss_aware", shapes, a.ratio, scores).ranks
        with tempfile.TemporaryDirectory(prefix="lowrank-quantize-") as work, Peak(device) as p:
            model = load_lazy_model(folder, dtype)
            targets = find_targets(model)
            quantize_model(model, targets, "loss_aware", a.ratio, ranks, space,
                           lambda m, on_block=None: streamed_gradients(m, gwin, a.grad_batch, device, targets,
                                                                       on_block=on_block, keep=on_block is None),
                           device, workdir=work)
        mats = sum(4 * (s.m * s.n if ranks[n] is None else ranks[n] * (s.m + s.n)) for n, s in shapes.items())
        quantized = _tensor_bytes(b for m in model.modules() if isinstance(m, QuantizedLinear) for b in m.buffers())
        record("quantize", p, mats + quantized + bound(gwin))
        del model
    if "refine" in want:
        _trim()
        with Peak(device) as p:  # as scripts/refine.py: the factors kept on CPU once read (the result)
            model = load_compressed(compressed, dtype, lazy=True, keep=True)
            refine_model(model, load_lazy_model(folder, dtype), gwin, RefineConfig(
                windows=gwin.shape[0], batch_size=a.grad_batch, refit_b=True, b_anchor=1.0), device)
        record("refine", p, _factor_bytes(model))
        del model
    return out


def run_one(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    g = torch.Generator().manual_seed(a.seed + 1)
    windows = torch.randint(0, a.vocab, (a.windows, a.seq_len), generator=g)
    gwin = windows[: a.grad_windows]
    tmp = tempfile.TemporaryDirectory(prefix="lowrank-bench-") if a.lazy else None
    t0 = time.perf_counter()
    model = build_lazy(a, tmp.name) if tmp else build(a)
    t_build = time.perf_counter() - t0
    targets = find_targets(model)
    res: dict[str, Any] = {"layers": a.layers, "hidden": a.hidden, "mlp": a.mlp, "tokens": windows.numel(),
                           "grad_tokens": gwin.numel(), "targets": len(targets), "build_s": t_build,
                           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "dtype": a.dtype, "decomposition": a.decomposition, "lazy": bool(a.lazy)}
    stages: dict[str, Peak] = {}
    _trim()
    with Peak(device) as p:
        grams = collect_input_grams(model, windows, a.batch, device, targets)
    stages["input Grams"] = p
    stats = {"input_gram": grams}
    _trim()
    with Peak(device) as p:
        scores, grads = fused_scores(model, gwin, a.grad_batch, device, targets, "first_order", "input_gram", stats,
                                     1e-6, a.decomposition, a.offload)
    stages["gradients + scores"] = p
    shapes = {t.name: t.shape for t in targets}
    _trim()
    with Peak(device) as p:
        alloc = allocate("zero_sum", shapes, a.ratio, {n: d["score"] for n, d in scores.items()})
    stages["allocation"] = p
    _trim()
    with tempfile.TemporaryDirectory(prefix="lowrank-parts-") as parts, Peak(device) as p:
        truncate_blocks(model, targets, alloc.ranks, "input_gram", stats, 1e-6, device, parts,
                        decomposition=a.decomposition)
    stages["truncation"] = p
    total = sum(s.seconds for s in stages.values())
    # results that grow with depth by nature (held on the host until written): fp64 Grams, the factors, and the
    # streamed gradients' boundary activations (offloaded: one per block + 1)
    grams_b = _tensor_bytes(grams.C.values())
    factors_b = _factor_bytes(model)
    bound_b = (boundary_bytes(gwin, a.hidden, a.layers, DTYPES[a.dtype]) if a.offload == "cpu" or
               device.type == "cpu" else 0)
    res["held_gb"] = (grams_b + factors_b + bound_b) / 1e9
    stage_held = {"input Grams": grams_b, "gradients + scores": grams_b + bound_b, "allocation": grams_b,
                  "truncation": grams_b + factors_b}
    res["stages"] = {k: {"s": v.seconds, "rss_gb": v.rss, "cuda_gb": v.cuda, "held_gb": stage_held[k] / 1e9}
                     for k, v in stages.items()}

    # floor: one decomposition (and Cholesky) of every whitened target, batched per block as the fast path can
    def decompositions(i: int, tl: list) -> None:
        Bs = [whiten(linear_weight(fresh.get_submodule(t.name)).detach().to(device, torch.float64),
                     input_factor("input_gram", t.name, stats, 1e-6, device)) for t in tl]
        thin_svd_many(Bs, a.decomposition)

    if a.every_stage:  # the later stages read the truncated model back lazily, as their scripts do
        from lowrank.checkpoint import save_compressed
        from lowrank.io import write_json

        write_json(os.path.join(tmp.name, "pretrained.json"), {"path": tmp.name, "path_relative": False})
        compressed = os.path.join(tmp.name, "compressed")
        save_compressed(compressed, model, os.path.join(tmp.name, "pretrained.json"), {})
        del model
        res["later"] = later_stages(a, tmp.name, compressed, stats, windows, gwin, device, shapes,
                                    {n: d["score"] for n, d in scores.items()}, grams_b)
    else:
        del model  # truncated in place; the floors start from the original weights
    fresh = load_lazy_model(tmp.name, DTYPES[a.dtype]) if tmp else build(a)
    with Peak(device) as p:
        for_each_block(fresh, find_targets(fresh), device, decompositions)
    t_dec = p.seconds
    fl = floors(fresh, a, windows, gwin, device, bool(a.lazy)) if not a.skip_floor_passes else {
        "forward": float("nan"), "forward_backward": float("nan")}
    res["floors"] = {"forward": fl["forward"], "forward_backward": fl["forward_backward"], "decompositions": t_dec}
    res["total_s"] = total
    res["floor_total_s"] = fl["forward"] + fl["forward_backward"] + 2 * t_dec
    res["loss"] = grads.loss
    if tmp:
        tmp.cleanup()
    return res


def table(results: list[dict[str, Any]], out=sys.stdout) -> None:
    r0 = results[0]
    print(f"random LLaMA, hidden {r0['hidden']}, MLP {r0['mlp']}, {r0['dtype']}, device {r0['device']}, "
          f"torch {torch.__version__}, decomposition {r0['decomposition']}, lazy load {r0['lazy']}\n", file=out)
    print("| blocks | tokens | grad tokens | Grams s (fwd floor) | grads+scores s (fwd+bwd+dec floor) | alloc s | "
          "trunc s (dec floor) | total s | floor s | total/floor | peak RSS GB | held results GB | "
          "RSS − held GB | peak CUDA GB |", file=out)
    print("|---:|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|", file=out)
    for r in results:
        s, f = r["stages"], r["floors"]
        rss = max(v["rss_gb"] for v in s.values())
        cuda = max(v["cuda_gb"] for v in s.values())
        print(f"| {r['layers']} | {r['tokens']} | {r['grad_tokens']} | {s['input Grams']['s']:.2f} "
              f"({f['forward']:.2f}) | {s['gradients + scores']['s']:.2f} "
              f"({f['forward_backward'] + f['decompositions']:.2f}) | {s['allocation']['s']:.2f} | "
              f"{s['truncation']['s']:.2f} ({f['decompositions']:.2f}) | {r['total_s']:.2f} | "
              f"{r['floor_total_s']:.2f} | {r['total_s'] / r['floor_total_s']:.2f} | {rss:.2f} | "
              f"{r['held_gb']:.2f} | {rss - r['held_gb']:.2f} | {cuda:.2f} |",
              file=out)
    if all("later" in r for r in results):
        names = list(results[0]["stages"]) + list(results[0]["later"])
        every = [{**r["stages"], **r["later"]} for r in results]
        print("\nEvery stage, lazy load: seconds, and peak host RSS minus the results the stage holds by nature "
              "(GB; held in parentheses):\n", file=out)
        print("| blocks | " + " | ".join(names) + " |", file=out)
        print("|---:|" + "---|" * len(names), file=out)
        for r, e in zip(results, every):
            print(f"| {r['layers']} | " + " | ".join(
                f"{e[n]['s']:.1f} s, {e[n]['rss_gb'] - e[n]['held_gb']:.3f} ({e[n]['held_gb']:.3f})" for n in names)
                + " |", file=out)
        print("\nFlatness of RSS − held over depth (max / min over the depths − 1; the issue asks for at most 20 %):"
              "\n", file=out)
        for n in names:
            v = [e[n]["rss_gb"] - e[n]["held_gb"] for e in every]
            print(f"* {n}: {min(v):.3f} … {max(v):.3f} GB, {100 * (max(v) / min(v) - 1):+.1f} %", file=out)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--mlp", type=int, default=688)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=16, help="calibration windows (input Grams)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="windows per forward (Grams)")
    ap.add_argument("--grad-windows", type=int, default=8, help="windows for the gradients (first ones)")
    ap.add_argument("--grad-batch", type=int, default=2, help="windows per backward")
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--decomposition", default="eigh", choices=["svd", "eigh"])
    ap.add_argument("--offload", default="auto", choices=["auto", "device", "cpu"])
    ap.add_argument("--lazy", action="store_true", help="weights from safetensors shards, one block at a time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-floor-passes", action="store_true", help="no resident forward/backward floors")
    ap.add_argument("--every-stage", action="store_true",
                    help="also evaluation, correction, output_kl and quantize, streamed (needs --lazy)")
    ap.add_argument("--later", default=",".join(LATER), help="the --every-stage stages to run (comma list)")
    ap.add_argument("--kl-windows", type=int, default=4, help="output_kl windows (K backward passes each)")
    ap.add_argument("--kl-top-k", type=int, default=5)
    ap.add_argument("--default-malloc", action="store_true",
                    help="sweep points with glibc's default (dynamic) mmap threshold")
    ap.add_argument("--json", action="store_true", help="print one JSON result instead of a table")
    ap.add_argument("--sweep-layers", default=None, help="comma list of depths, each in a fresh process")
    ap.add_argument("--sweep-windows", default=None, help="comma list of window counts (grad windows = half)")
    return ap


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    if a.every_stage and not a.lazy:
        raise SystemExit("--every-stage measures the streamed stages of a lazy model: add --lazy")
    argv = list(sys.argv[1:] if argv is None else argv)
    if a.sweep_layers or a.sweep_windows:
        base = [x for i, x in enumerate(argv) if not x.startswith("--sweep") and
                not (i > 0 and argv[i - 1].startswith("--sweep"))]
        points: list[list[str]] = []
        if a.sweep_layers:
            points += [["--layers", v] for v in a.sweep_layers.split(",")]
        if a.sweep_windows:
            points += [["--windows", v, "--grad-windows", str(max(1, int(v) // 2))] for v in a.sweep_windows.split(",")]
        results = []
        for extra in points:
            env = dict(os.environ) if a.default_malloc else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            proc = subprocess.run([sys.executable, __file__, *base, *extra, "--json"], capture_output=True,
                                  text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"point {extra} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"done {extra}: total {results[-1]['total_s']:.2f} s", file=sys.stderr)
        table(results)
        return
    r = run_one(a)
    print(json.dumps(r)) if a.json else table([r])


if __name__ == "__main__":
    main()

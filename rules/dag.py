"""The helpers of the rule files (rules/*.smk): config checks that need Python, config slices, input paths,
targets and resources. Plain Python, so the rule files hold rules only (``snakemake --lint``).

Snakemake puts rules/ on ``sys.path`` when it includes rules/common.smk, which imports this module and calls
:func:`setup` with the workflow's (validated) ``config`` and ``workflow`` objects once; every helper reads those
two module globals when a rule calls it. The numerics stay in ``lowrank`` (which never imports Snakemake).
"""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.io import expand
from snakemake.logging import logger
from snakemake.resources import Resource

import lowrank.codegraph
import lowrank.data
import lowrank.io
import lowrank.model
from lowrank.accounting import TargetShape
from lowrank.allocation import ALLOCATOR_STATS, check_recipes_reachable
from lowrank.prehab import PrehabConfig
from lowrank.recipes import Recipe
from lowrank.scoring import SCORERS, stage_fractions
from lowrank.spaces import SPACES
from lowrank.zeroshot import NEXT_LINE_TASK

config: dict[str, Any] = {}  # the workflow's config (setup)
workflow: Any = None  # the Snakemake workflow object (setup)
REPO = Path(__file__).resolve().parents[1]  # the workflow's folder (setup: workflow.basedir)
RESERVED = {"pretrained", "prehab", "prehab-control", "data", "summary", "dense"}  # method names that are results folders
RESERVED_TOP = {"summary", "tasks"}  # model names that are results folders
_FINGERPRINTS: dict[str, str] = {}  # models.<key> -> content fingerprint of its local files, computed once
MODELS: list[str] = []
METHODS: list[str] = []
RATIOS: list[str] = []  # two-decimal labels, the {ratio} folders
PREHAB_METHODS: list[str] = []
RECIPES: dict[str, Recipe] = {}  # methods.<name> as typed recipes, built once (setup) with their cross-field rules


def setup(cfg: dict[str, Any], wf: Any) -> None:
    """Bind the workflow's config and workflow object, check the config (a ``ValueError`` naming the bad value and
    its fix) and list its models, methods and ratios. Called once, by rules/common.smk."""
    global config, workflow, REPO
    config, workflow, REPO = cfg, wf, Path(wf.basedir)
    RECIPES.clear()  # a second workflow in the same process (the `lowrank` CLI) starts afresh
    code_fingerprint.cache_clear()
    _import_graph.cache_clear()
    _check_config()
    _check_dvc_deps()
    MODELS[:] = list(config["models"])
    METHODS[:] = list(config["methods"])
    RATIOS[:] = [ratio_label(r) for r in config["ratios"]]
    PREHAB_METHODS[:] = [m for m in METHODS if source_of(m) == "prehab"]
    _check_prehab_config()
    _check_zeroshot_config()


# ---- config checks that need Python --------------------------------------------------------------------------------


def _check_config():
    """Checks that need Python: each raises ValueError naming the bad value and the fix."""
    for name, m in config["methods"].items():
        if name in RESERVED:
            raise ValueError(f"method name {name!r} is reserved for a results folder; rename it")
        RECIPES[name] = Recipe.from_dict(name, m)  # the rules between a recipe's fields (lowrank.recipes)
    for r in config["ratios"]:  # the {ratio} folder must say the kept fraction the allocation uses
        if abs(float(r) * 100 - round(float(r) * 100)) > 1e-9:
            raise ValueError(f"ratio {r} has more than two decimals: its folder would be {ratio_label(r)} but the "
                             f"kept fraction {r}; use a ratio with two decimals (e.g. "
                             f"{ratio_label(math.ceil(float(r) * 100) / 100)})")
    labels = [ratio_label(r) for r in config["ratios"]]
    if len(set(labels)) != len(labels):
        raise ValueError(f"ratios {config['ratios']} collide at two decimals ({labels}); use distinct values")
    folded = {}  # model folders must differ on a case-insensitive file system too (method names are lower case)
    for name in config["models"]:
        if name.lower() in folded:
            raise ValueError(f"models {folded[name.lower()]!r} and {name!r} differ only in case: their results "
                             "folders collide on a case-insensitive file system; rename one")
        folded[name.lower()] = name
    for name, spec in config["models"].items():
        try:  # resolves the source (missing folders, config typos) and reads its files (truncated weights)
            _FINGERPRINTS[name] = lowrank.model.source_fingerprint(spec)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise ValueError(f"models.{name}: {e}") from None
        manifest = Path(f"results/{name}/pretrained/manifest.json")  # known shapes: refuse unreachable ratios now
        if manifest.is_file():
            body = lowrank.io.read_json(manifest)
            shapes = body["architecture"].get("target_shapes")
            if shapes and body.get("source_fingerprint") == _FINGERPRINTS[name] and body.get("config") == spec:
                check_recipes_reachable([TargetShape(*t) for t in shapes], config["ratios"], config["methods"], name)
    lowrank.data.check_disjoint(config["calibration"]["corpus"], config["evaluation"]["corpus"])


def _check_dvc_deps():
    """Local model files are inputs of the results: warn when the run folder's dvc.yaml does not list them as deps
    of its stage (DVC would call results up to date after the weights change), with the lines to add."""
    dvc = Path("dvc.yaml")
    if not dvc.is_file():
        return
    stages = (yaml.safe_load(dvc.read_text()) or {}).get("stages", {})
    deps = [Path(d).resolve() for st in stages.values() for d in (st.get("deps") or [])]
    for name, spec in config["models"].items():
        for p in lowrank.model.source_paths(spec):
            if not any(Path(p) == d or d in Path(p).parents for d in deps):
                logger.warning(f"models.{name}: {p} is not a dependency in dvc.yaml, so `dvc repro` would not see a "
                               f"change of it; add `- {p}` to the deps of its stage")


def ratio_label(r):
    return f"{float(r):.2f}"


# ---- config slices: each rule's params hold only what can change its output ----------------------------------------


@functools.cache
def _import_graph():
    return lowrank.codegraph.import_graph(REPO / "lowrank")[0]


@functools.cache
def code_fingerprint(script: str) -> str:
    """Short sha256 of every lowrank module scripts/<script>.py can run (its import closure, read from the source:
    lowrank.codegraph): editing a module reruns exactly the rules whose scripts reach it."""
    return lowrank.codegraph.code_fingerprint(REPO / "scripts" / f"{script}.py", REPO / "lowrank", _import_graph())


def model_spec(wc):
    return config["models"][wc.model]


def source_fingerprint_of(wc):
    """Content fingerprint of the model's local files (computed once, when the config is checked)."""
    return _FINGERPRINTS[wc.model]


def method_spec(wc):
    return config["methods"][wc.method]


def split_spec(wc):
    return config[wc.split]


def runtime_spec(wc=None):
    """device, dtype, seed: what every model-loading rule's output depends on (lazy_load changes no result)."""
    return {k: v for k, v in config["runtime"].items() if k != "lazy_load"}


def calibration_slice(wc):
    c = config["calibration"]
    return {k: c[k] for k in ("n_samples", "seq_len", "seed", "batch_size", "bos", "corpus")}


def ratio_value(wc):
    return float(wc.ratio)


# ---- what each method needs ----------------------------------------------------------------------------------------


def whitening_stats(whitening, model, source="pretrained"):
    """{stat kind: path} of the statistics a whitening space reads."""
    spaces = (SPACES[whitening].stat, SPACES[whitening].output_stat)  # output_stat: two-sided spaces (IO-SVD)
    return {stat: f"results/{model}/{stats_source(source)}/stats/{stat}.safetensors" for stat in spaces if stat}


def stats_for_method(wc):
    return whitening_stats(method_spec(wc)["whitening"], wc.model, source_of(wc.method))


def allocator_stats(wc):
    """The statistic an allocator reads besides the scores (ASVD's sensitivity table), if any."""
    stat = ALLOCATOR_STATS.get(method_spec(wc)["allocator"])
    return {stat: f"results/{wc.model}/{source_of(wc.method)}/stats/{stat}.safetensors"} if stat else {}


def scores_for(wc):
    m = method_spec(wc)
    return f"results/{wc.model}/{source_of(wc.method)}/scores/{m['whitening']}/{m['scorer']}.safetensors"


def allocation_owner(method):
    """The recipe whose allocate job serves `method`: the first in config order with the same
    :attr:`lowrank.recipes.Recipe.allocation_key` (zs-svd-refine and zs-svd-corr read zs-svd's ranks: one staged
    re-scoring instead of three). `method` itself when no earlier recipe shares its key."""
    key = RECIPES[method].allocation_key
    return next(m for m in METHODS if RECIPES[m].allocation_key == key)


def methods_pattern(allocating):
    """Wildcard pattern of the recipes that run their own allocate job (`allocating`) or copy their owner's."""
    names = [m for m in METHODS if (allocation_owner(m) == m) == allocating]
    return "|".join(map(re.escape, names)) or r"(?!)"  # (?!): matches no name


def owner_allocation(wc):
    return f"results/{wc.model}/{allocation_owner(wc.method)}/{wc.ratio}/allocation.json"


def progressive_stages(wc):
    """The intermediate kept fractions of a recipe's progressive allocation at this ratio ([] = one-shot)."""
    return stage_fractions(float(wc.ratio), RECIPES[wc.method].allocation_stages)


def progressive_inputs(wc):
    """What a progressive allocation re-scores with: the model, its whitening statistics, the gradient windows."""
    if not progressive_stages(wc):
        return {}
    return {"manifest": source_manifest(wc), "windows": f"results/{wc.model}/data/calibration.safetensors",
            **stats_for_method(wc)}


def progressive_options(wc):
    """Its options ({} for a one-shot allocation, so those jobs never rerun for them)."""
    stages = progressive_stages(wc)
    if not stages:
        return {}
    s = config["scoring"]
    return {"stages": stages, "gradient_windows": s["gradient_windows"],
            "gradient_batch_size": s["gradient_batch_size"], "damping": config["whitening"]["damping"],
            "decomposition": config["decomposition"]["method"], "streamed": gradients_streamed(wc)}


def progressive_runtime(wc):
    """device, dtype, seed of a progressive allocation (it runs the model); {} for a one-shot one."""
    return runtime_spec(wc) if progressive_stages(wc) else {}


def gradients_streamed(wc):
    """`scoring.streamed`, with `auto` resolved by the model's size: whole-model passes below GPU_MIN_SIZE_B."""
    streamed = config["scoring"].get("streamed", "auto")
    return config["models"][wc.model]["size_b"] >= GPU_MIN_SIZE_B if streamed == "auto" else streamed


def scoring_inputs(wc):
    """Statistics of the whitening space, and the calibration windows when the scorer needs gradients."""
    inputs = whitening_stats(wc.whitening, wc.model, wc.source)
    if SCORERS[wc.scorer].needs_gradients:
        inputs["windows"] = f"results/{wc.model}/data/calibration.safetensors"
    return inputs


def scoring_options(wc):
    """The gradient options, only for scorers that take gradients (so sigma scores never rerun for them), with
    `streamed: auto` resolved by the model's size (whole-model passes below GPU_MIN_SIZE_B)."""
    if not SCORERS[wc.scorer].needs_gradients:
        return {}
    return {**config["scoring"], "streamed": gradients_streamed(wc)}


def stages_of(method):
    return RECIPES[method].correction.stages


def final_compressed(wc):
    """The last stage of a method: stage0 (truncation) unless the recipe asks for projected corrections; the
    quantize stage's final/ when the recipe asks for int8 storage, the rehab folder when it fine-tunes its
    factors, or the refine folder when it refines them block by block (the three exclude each other:
    lowrank.recipes)."""
    if RECIPES[wc.method].quantize.mode != "none":
        return f"results/{wc.model}/{wc.method}/{wc.ratio}/final/manifest.json"
    if rehab_steps(wc.method) > 0:
        return f"results/{wc.model}/{wc.method}/{wc.ratio}/rehab/manifest.json"
    if refine_mode(wc.method) != "none":
        return f"results/{wc.model}/{wc.method}/{wc.ratio}/refine/manifest.json"
    return f"results/{wc.model}/{wc.method}/{wc.ratio}/stage{stages_of(wc.method)}/manifest.json"


def previous_stage(wc):
    return f"results/{wc.model}/{wc.method}/{wc.ratio}/stage{int(wc.stage) - 1}/manifest.json"


# ---- resources (cluster profiles read these; a laptop ignores them) ------------------------------------------------


def mem_mb_for(wc, attempt, rulename="", factor=1):
    size_b = config["models"][wc.model]["size_b"]
    base = factor * max(4000, size_b * 1000 * 4 * 3)  # fp32 weights x3 headroom
    return fit_partition(rulename, wc, "mem_mb", base, attempt)


def runtime_min_for(wc, attempt, rulename="", factor=1):
    size_b = config["models"][wc.model]["size_b"]
    return fit_partition(rulename, wc, "runtime", factor * max(30, 30 * size_b), attempt)


GPU_MIN_SIZE_B = 1.0  # below a billion parameters a CPU job is as fast as the GPU queue wait


def gpus_for(wc):
    """GPUs a model-loading job asks for: 0 on `runtime.device: cpu` or for models under GPU_MIN_SIZE_B, else 1.

    A local run ignores it unless `--resources gpu=N` caps it (profiles/gpu-workstation); the SLURM plugin turns
    it into `--gpus` (with the profile's gpu_model) and the profile routes such jobs to a GPU partition.
    """
    if config["runtime"]["device"] == "cpu":
        return 0
    return int(config["models"][wc.model]["size_b"] >= GPU_MIN_SIZE_B)


def light_threads(wc):
    """Threads of a job that is not worth more than one core on a model under GPU_MIN_SIZE_B: perplexity, the
    truncation cut from stored directions, quantize, decompose, σ scores. Their CPU time on SmolLM2 is 1.0-1.2x
    their wall time with 2 threads (bench/run_times.py on the default run), so one thread each lets two such jobs
    (there is one per method x ratio) run side by side instead of one after the other. Larger models keep 8
    (capped by --cores), where the matrix products do use them."""
    return 1 if config["models"][wc.model]["size_b"] < GPU_MIN_SIZE_B else 8


# ---- cluster: requests that fit the partitions, GPU-only resources, the node's log in the rule log -----------------
# The SLURM profile describes the cluster (profiles/slurm: partitions.yaml, set-resources); nothing here names a
# partition. These helpers only read what the profile gave the plugin.

GPU_ONLY_RESOURCES = ("gpu_model", "cpus_per_gpu", "gres")


def slurm_partitions():
    """{name: limits} of the SLURM plugin's partition file when this run submits to SLURM with one
    (`slurm-partition-config` or $SNAKEMAKE_SLURM_PARTITIONS), else None (local runs, dry runs, jobs on a node)."""
    plugin = getattr(workflow, "executor_plugin", None)
    if getattr(plugin, "name", None) != "slurm":
        return None
    path = getattr(workflow.executor_settings, "partition_config", None) or os.environ.get(
        "SNAKEMAKE_SLURM_PARTITIONS")
    return _read_partitions(str(path)) if path else None


@functools.cache
def _read_partitions(path):
    return {name: dict(limits or {}) for name, limits in yaml.safe_load(Path(path).read_text())["partitions"].items()}


_PARTITION_LIMIT = {"mem_mb": "max_mem_mb", "runtime": "max_runtime"}


def fit_partition(rulename, wc, resource, base, attempt):
    """`base * attempt` (retries ask for more), capped at the largest limit among the partitions that can take the
    job (a GPU job only fits partitions with max_gpu); an error naming the rule, its request and the limit when
    even the first attempt does not fit, instead of an sbatch refusal ("Memory specification can not be
    satisfied") or a job that waits forever."""
    request = int(base * attempt)
    parts = slurm_partitions()
    if not parts or not rulename:
        return request
    gpus = gpus_for(wc) if "gpu" in workflow.get_rule(rulename).resources else 0
    eligible = {n: p for n, p in parts.items() if not gpus or int(p.get("max_gpu", 0)) >= gpus}
    key = _PARTITION_LIMIT[resource]
    where = f"rule {rulename} (model {wc.model}{', gpu=%d' % gpus if gpus else ''})"
    if not eligible:
        raise WorkflowError(f"{where}: no partition of the SLURM partition file has max_gpu >= {gpus}; "
                            f"partitions: {sorted(parts)}. Add a GPU partition or set runtime.device: cpu")
    limits = {n: _limit(p, key) for n, p in eligible.items()}
    best = max(limits, key=limits.get)
    if int(base) > limits[best]:
        raise WorkflowError(f"{where} requests {resource}={int(base)} but the largest partition that can take it, "
                            f"{best!r}, allows {key}={int(limits[best])}: raise the limit in the partition file if "
                            f"the cluster has bigger nodes, or use a partition that does")
    return int(min(request, limits[best]))


def _limit(partition, key):
    value = partition.get(key, math.inf)
    if isinstance(value, str):  # "2-00:00:00" and the like, read as the plugin reads them
        from snakemake_executor_plugin_slurm.utils import parse_time_to_minutes

        value = parse_time_to_minutes(value)
    return float(value)


def gpu_only_resources():
    """Keep GPU-only resources (the profile's gpu_model, cpus_per_gpu, gres) only on jobs whose `gpu` is > 0.

    The profile sets them per rule, but whether a job of that rule asks for a GPU depends on the model size
    (gpus_for): on a CPU job, `gpu_model` would become `--gpus=<model>:0` and the job step dies with "Invalid
    generic resource (gres) specification". Called once, after every rule is defined."""
    for r in workflow.rules:
        gpu = r.resources.get("gpu")
        for key in GPU_ONLY_RESOURCES:
            if key in r.resources and r.resources[key] is not None:
                r.resources[key] = Resource(key, _when_gpu(gpu, r.resources[key]))


def _when_gpu(gpu, res):
    def value(wildcards, **aux):
        wanted = gpu.evaluate(wildcards, **aux).value if gpu is not None else 0
        return res.evaluate(wildcards, **aux).value if wanted else None

    return value


def slurm_logs_into_rule_logs():
    """On a failed SLURM run, append each failed job's SLURM log (srun's refusal, the node's kill message, the
    job step's traceback) to the job's rule log, which is empty when the job died before its script started."""
    if getattr(getattr(workflow, "executor_plugin", None), "name", None) != "slurm":
        return
    from snakemake_executor_plugin_slurm.utils import get_job_wildcards

    logdir = Path(getattr(workflow.executor_settings, "logdir", None) or ".snakemake/slurm_logs")
    for job in getattr(getattr(workflow, "scheduler", None), "failed", ()):
        folder = logdir / f"rule_{job.rule.name}" / get_job_wildcards(job)
        slurm_logs = sorted(folder.glob("*.log"), key=lambda f: f.stat().st_mtime)
        if not slurm_logs:
            continue
        for log in job.log:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as fh:
                fh.write(f"\n---- SLURM log of the failed job ({slurm_logs[-1]}) ----\n")
                fh.write(slurm_logs[-1].read_text(errors="replace"))


# ---- targets -------------------------------------------------------------------------------------------------------


def final_targets():
    return prehab_targets() + ["results/summary/table.csv", "results/summary/table.md", "results/summary/metrics.json",
            "results/summary/plots/ppl_vs_ratio.png", "results/summary/ranks.csv",
            "results/summary/plots/ranks.png",
            "results/summary/plots/accuracy_vs_ratio.png", "results/summary/speed.md"]


# ---- resources of the streamed stages (one block on the device at a time) ------------------------------------------

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _size_b(wc):
    return float(config["models"][wc.model]["size_b"])


def mem_mb_streamed_for(wc, attempt, rulename=""):
    """Host memory of a streamed stage: the model once in runtime.dtype, plus 1.5x for the per-block float64
    statistics / gradients / factors and the CPU-offloaded boundary activations, at least 8 GB."""
    weights_mb = _size_b(wc) * 1000 * _DTYPE_BYTES[config["runtime"]["dtype"]]
    return fit_partition(rulename, wc, "mem_mb", max(8000, 2.5 * weights_mb + 8000), attempt)


def gpu_mem_mb_for(wc, attempt):
    """Device memory a streamed stage needs, for profiles that place by GPU size: about 1/20 of the model
    (one of >= 20 blocks, its gradients and activations) plus 24 GB for boundary activations and decompositions."""
    weights_mb = _size_b(wc) * 1000 * _DTYPE_BYTES[config["runtime"]["dtype"]]
    return int((weights_mb / 20 * 4 + 24000) * attempt) if gpus_for(wc) else 0


# ---- prehab / rehab: which model a recipe compresses ---------------------------------------------------------------


def source_of(method):
    """The model a recipe compresses, and whose statistics / scores / truncation it uses: prehab or pretrained."""
    return RECIPES[method].source


def stats_source(source):
    """Whose calibration statistics whiten a source: its own, except prehab with reuse_prehab_whitening."""
    if source in PREHAB_SOURCES and config["prehab"]["reuse_prehab_whitening"]:
        return "pretrained"
    return source


def source_manifest(wc):
    return f"results/{wc.model}/{source_of(wc.method)}/manifest.json"


def shares_decomposition(model):
    """decomposition.share: true / false, or auto = models below GPU_MIN_SIZE_B (CPU-sized: decomposing a weight
    costs a CPU far more than reading it back, and the file stays small)."""
    share = config["decomposition"]["share"]
    return config["models"][model]["size_b"] < GPU_MIN_SIZE_B if share == "auto" else bool(share)


def shared_decomposition(wc):
    """The stored component directions a truncation / quantize job cuts its ranks from (rule decompose), or none.

    A kept artifact, not a temp() one: a remade temporary file would be newer than every finished truncation of
    its space, and Snakemake would redo them all whenever one recipe or ratio is added."""
    if not shares_decomposition(wc.model):
        return []
    return f"results/{wc.model}/{source_of(wc.method)}/decomposition/{method_spec(wc)['whitening']}.safetensors"


def rehab_steps(method):
    return RECIPES[method].rehab.steps


def refine_mode(method):
    refine = RECIPES[method].refine
    return "none" if refine is None else refine.mode


def prehab_targets():
    """The prehab report, only when some recipe uses prehab (no recipe without prehab ever plans it)."""
    if not PREHAB_METHODS:
        return []
    return ["results/summary/prehab.md", "results/summary/prehab.json", "results/summary/plots/prehab_spectra.png",
            "results/summary/plots/prehab_history.png"]


PREHAB_SOURCES = ("prehab", "prehab-control")  # the prehab model and its lambda = 0 control


def _check_prehab_config():
    """Bad prehab settings, named with their fix."""
    settings = {k: v for k, v in config["prehab"].items() if k != "reuse_prehab_whitening"}
    PrehabConfig.from_dict(settings)  # raises ValueError naming the bad value (a recipe's own rules: Recipe)
    plan = settings.get("plan")
    if plan:
        method = plan["method"]
        if method not in config["methods"]:
            raise ValueError(f"prehab.plan.method {method!r} is not a recipe of `methods`; name the recipe whose "
                             f"allocation prehab should aim at, one of {sorted(config['methods'])}")
        if source_of(method) != "pretrained":
            raise ValueError(f"prehab.plan.method {method!r} compresses the {source_of(method)} model, which "
                             "prehab itself makes; plan with a recipe that compresses the pretrained model")


# ---- calibration statistics ----------------------------------------------------------------------------------------


def stat_options(wc):
    """The statistic's own config slice; ASVD's sensitivity also reads the act_scale exponent it truncates with."""
    options = dict(config["statistics"].get(wc.stat, {}))
    if wc.stat == "asvd_sensitivity":
        options["alpha"] = config["statistics"]["act_scale"]["alpha"]
    return options


# ---- quantize stage ------------------------------------------------------------------------------------------------


# ---- zero-shot accuracy (lm-eval) ----------------------------------------------------------------------------------


def zeroshot_spec():
    return config["evaluation"]["zeroshot"]


def next_line_corpus():
    """The text of lowrank_next_line: its own corpus, else the evaluation corpus (held out from calibration)."""
    return zeroshot_spec()["next_line"].get("corpus") or config["evaluation"]["corpus"]


def has_tokenizer(model):
    """lm-eval needs a tokenizer: a random-init model without `tokenizer` (or a weights-only folder) has none."""
    spec = config["models"][model]
    if spec["source"] == "random_init":
        return bool(spec.get("tokenizer"))
    if spec["source"] == "hf" and Path(spec["path"]).is_dir():
        return any((Path(spec["path"]) / f).exists() for f in lowrank.model._TOKENIZER_FILES)
    return True


def zeroshot_models():
    return [m for m in MODELS if has_tokenizer(m)] if zeroshot_spec()["tasks"] else []


def _check_zeroshot_config():
    for name in MODELS:
        if name in RESERVED_TOP:
            raise ValueError(f"model name {name!r} is reserved for a results folder (results/{name}); rename it")
    if NEXT_LINE_TASK in zeroshot_spec()["tasks"]:
        corpus = next_line_corpus()
        if corpus.get("kind") in ("tokens", "windows"):
            raise ValueError(f"task {NEXT_LINE_TASK!r} needs text, but its corpus (evaluation.zeroshot.next_line."
                             f"corpus, else evaluation.corpus) is of kind {corpus['kind']!r}; set evaluation.zeroshot."
                             "next_line.corpus to held-out text, or remove the task from evaluation.zeroshot.tasks")
        try:
            lowrank.data.check_disjoint(config["calibration"]["corpus"], corpus)
        except ValueError as e:
            raise ValueError(f"evaluation.zeroshot.next_line.corpus: {e}") from None


def zeroshot_params(wc=None):
    z = zeroshot_spec()
    return {k: z[k] for k in ("tasks", "num_fewshot", "batch_size", "max_length", "limit")}


def zeroshot_task_files(wc=None):
    """The local data of the project's tasks among the configured ones (built-in tasks need no input)."""
    return {NEXT_LINE_TASK: f"results/tasks/{NEXT_LINE_TASK}.jsonl"} if NEXT_LINE_TASK in zeroshot_spec()["tasks"] else {}


# ---- speed ---------------------------------------------------------------------------------------------------------


def speed_models():
    return MODELS if config["evaluation"]["speed"]["enabled"] else []


def speed_spec(wc=None):
    s = config["evaluation"]["speed"]
    return {k: v for k, v in s.items() if k != "enabled"}


# ---- prehab and rehab: the prehab report, the rehab stage ----------------------------------------------------------


def prehab_settings(wc=None):
    """The prehab run's config slice (reuse_prehab_whitening only changes which statistics later stages read);
    the control run (source prehab-control) is the same with lambda0 = lambda_max = 0: CE only."""
    settings = {k: v for k, v in config["prehab"].items() if k != "reuse_prehab_whitening"}
    if wc is not None and getattr(wc, "source", "prehab") == "prehab-control":
        settings.update(lambda0=0.0, lambda_max=0.0)
    return settings


def prehab_plan_input(wc):
    """The planned allocation (prehab.plan) on the pretrained model, when there is a plan."""
    plan = config["prehab"].get("plan")
    if not plan:
        return {}
    return {"plan": f"results/{wc.model}/{plan['method']}/{ratio_label(plan['ratio'])}/allocation.json"}


def rehab_spec(wc):
    return config["methods"][wc.method]["rehab"]


def last_stage(wc):
    return f"results/{wc.model}/{wc.method}/{wc.ratio}/stage{stages_of(wc.method)}/manifest.json"


def prehab_partner(method, source="pretrained"):
    """The same recipe without prehab / rehab (``source`` pretrained: the 'without prehab' column) or with
    ``prehab: control`` (``source`` prehab-control: the 'control' column), when the config has one."""
    spec = {k: v for k, v in config["methods"][method].items() if k not in ("prehab", "rehab")}
    for other in METHODS:
        o = config["methods"][other]
        if source_of(other) == source and {k: v for k, v in o.items() if k not in ("prehab", "rehab")} == spec:
            return other
    return None


def prehab_pairs(wc=None):
    """Per prehab recipe: its recipe without prehab and its control recipe (None where the config has none)."""
    return {m: {"without": prehab_partner(m), "control": prehab_partner(m, "prehab-control")}
            for m in PREHAB_METHODS}


def prehab_report_inputs(wc=None):
    pairs = prehab_pairs()
    with_ = [f"results/{mo}/{m}/{r}/eval/ppl.json" for mo in MODELS for m in pairs for r in RATIOS]
    without = [f"results/{mo}/{p[k]}/{r}/eval/ppl.json" for mo in MODELS for p in pairs.values()
               for k in ("without", "control") if p[k] for r in RATIOS]
    controlled = any(p["control"] for p in pairs.values())
    return {
        "dense_before": expand("results/{model}/pretrained/eval/ppl.json", model=MODELS),
        "dense_after": expand("results/{model}/prehab/eval/ppl.json", model=MODELS),
        "dense_control": expand("results/{model}/prehab-control/eval/ppl.json", model=MODELS) if controlled else [],
        "prehab": expand("results/{model}/prehab/manifest.json", model=MODELS),
        "control": expand("results/{model}/prehab-control/manifest.json", model=MODELS) if controlled else [],
        "spectra": expand("results/{model}/prehab/spectra.safetensors", model=MODELS),
        "with_prehab": with_,
        "without_prehab": without,
    }


# ---- refinement ----------------------------------------------------------------------------------------------------


def refine_spec(wc):
    return method_spec(wc)["refine"]


# ---- Hugging Face folders ------------------------------------------------------------------------------------------


def hf_folder_targets():
    if not config["export"]["hf_folder"]:
        return []
    return expand("results/{model}/{method}/{ratio}/hf", model=MODELS, method=METHODS, ratio=RATIOS)

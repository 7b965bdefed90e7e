# Validation, wildcard constraints and the helpers every rule uses. No rules here.

import hashlib
import re
from pathlib import Path

from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

import lowrank.data
import lowrank.model
from lowrank.allocation import ALLOCATOR_STATS
from lowrank.scoring import SCORERS
from lowrank.spaces import SPACES

RESERVED = {"pretrained", "prehab", "data", "summary", "dense"}
REPO = Path(workflow.basedir)


def _check_config():
    """Checks that need Python: each raises ValueError naming the bad value and the fix."""
    for name, m in config["methods"].items():
        if name in RESERVED:
            raise ValueError(f"method name {name!r} is reserved for a results folder; rename it")
        if m["allocator"] in ("zero_sum", "min_abs") and m["scorer"] == "sigma":
            raise ValueError(f"method {name!r}: allocator {m['allocator']!r} ranks components across matrices by "
                             "their predicted loss change; use scorer first_order (sigma values of different "
                             "matrices are not comparable)")
    labels = [ratio_label(r) for r in config["ratios"]]
    if len(set(labels)) != len(labels):
        raise ValueError(f"ratios {config['ratios']} collide at two decimals ({labels}); use distinct values")
    for name, spec in config["models"].items():
        try:
            lowrank.model.resolve_source(spec)
        except (FileNotFoundError, KeyError) as e:
            raise ValueError(f"models.{name}: {e}") from None
    lowrank.data.check_disjoint(config["calibration"]["corpus"], config["evaluation"]["corpus"])


def ratio_label(r):
    return f"{float(r):.2f}"


_check_config()

MODELS = list(config["models"])
METHODS = list(config["methods"])
RATIOS = [ratio_label(r) for r in config["ratios"]]


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    method="|".join(map(re.escape, METHODS)),
    ratio=r"[01]\.\d\d",
    source="pretrained|prehab",
    split="calibration|evaluation",
    stage=r"\d+",


# ---- config slices: each rule's params hold only what can change its output -------------------------------


def core_fingerprint(*modules):
    """Short sha256 of the lowrank modules a rule runs: editing one reruns exactly the rules that use it."""
    h = hashlib.sha256()
    for m in sorted(set(modules) | {"runtime", "io"}):
        h.update((REPO / "lowrank" / f"{m}.py").read_bytes())
    return h.hexdigest()[:12]


def model_spec(wc):
    return config["models"][wc.model]


def method_spec(wc):
    return config["methods"][wc.method]


def split_spec(wc):
    return config[wc.split]


def runtime_spec(wc=None):
    return config["runtime"]


def calibration_slice(wc):
    c = config["calibration"]
    return {k: c[k] for k in ("n_samples", "seq_len", "seed", "batch_size", "bos", "corpus")}


def ratio_value(wc):
    return float(wc.ratio)


# ---- what each method needs -----------------------------------------------------------------------------


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


def scoring_inputs(wc):
    """Statistics of the whitening space, and the calibration windows when the scorer needs gradients."""
    inputs = whitening_stats(wc.whitening, wc.model, wc.source)
    if SCORERS[wc.scorer].needs_gradients:
        inputs["windows"] = f"results/{wc.model}/data/calibration.safetensors"
    return inputs


def scoring_options(wc):
    """The gradient options, only for scorers that take gradients (so sigma scores never rerun for them)."""
    return config["scoring"] if SCORERS[wc.scorer].needs_gradients else {}


def stages_of(method):
    return config["methods"][method]["correction"]["stages"]


def final_compressed(wc):
    """The last stage of a method: stage0 (truncation) unless the recipe asks for projected corrections; the
    quantize stage's final/ when the recipe asks for int8 storage, the rehab folder when it fine-tunes its
    factors, or the refine folder when it refines them block by block (the three exclude each other:
    _check_refine_config)."""
    if method_spec(wc).get("quantize", {}).get("mode", "none") != "none":
        return f"results/{wc.model}/{wc.method}/{wc.ratio}/final/manifest.json"
    if rehab_steps(wc.method) > 0:
        return f"results/{wc.model}/{wc.method}/{wc.ratio}/rehab/manifest.json"
    if refine_mode(wc.method) != "none":
        return f"results/{wc.model}/{wc.method}/{wc.ratio}/refine/manifest.json"
    return f"results/{wc.model}/{wc.method}/{wc.ratio}/stage{stages_of(wc.method)}/manifest.json"


def previous_stage(wc):
    return f"results/{wc.model}/{wc.method}/{wc.ratio}/stage{int(wc.stage) - 1}/manifest.json"


# ---- resources (cluster profiles read these; a laptop ignores them) ---------------------------------------


def mem_mb_for(wc, attempt):
    size_b = config["models"][wc.model]["size_b"]
    return int(max(4000, size_b * 1000 * 4 * 3) * attempt)  # fp32 weights x3 headroom


def runtime_min_for(wc, attempt):
    size_b = config["models"][wc.model]["size_b"]
    return int(max(30, 30 * size_b) * attempt)


GPU_MIN_SIZE_B = 1.0  # below a billion parameters a CPU job is as fast as the GPU queue wait


def gpus_for(wc):
    """GPUs a model-loading job asks for: 0 on `runtime.device: cpu` or for models under GPU_MIN_SIZE_B, else 1.

    A local run ignores it unless `--resources gpu=N` caps it (profiles/gpu-workstation); the SLURM plugin turns
    it into `--gpus` (with the profile's gpu_model) and the profile routes such jobs to a GPU partition.
    """
    if config["runtime"]["device"] == "cpu":
        return 0
    return int(config["models"][wc.model]["size_b"] >= GPU_MIN_SIZE_B)


# ---- targets ------------------------------------------------------------------------------------------------


def final_targets():
    return prehab_targets() + ["results/summary/table.csv", "results/summary/table.md", "results/summary/metrics.json",
            "results/summary/plots/ppl_vs_ratio.png", "results/summary/ranks.csv",
            "results/summary/plots/ranks.png",
            "results/summary/plots/accuracy_vs_ratio.png", "results/summary/speed.md"]


# ---- resources of the streamed stages (one block on the device at a time) ----------------------------------

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _size_b(wc):
    return float(config["models"][wc.model]["size_b"])


def mem_mb_streamed_for(wc, attempt):
    """Host memory of a streamed stage: the model once in runtime.dtype, plus 1.5x for the per-block float64
    statistics / gradients / factors and the CPU-offloaded boundary activations, at least 8 GB."""
    weights_mb = _size_b(wc) * 1000 * _DTYPE_BYTES[config["runtime"]["dtype"]]
    return int(max(8000, 2.5 * weights_mb + 8000) * attempt)


def gpu_mem_mb_for(wc, attempt):
    """Device memory a streamed stage needs, for profiles that place by GPU size: about 1/20 of the model
    (one of >= 20 blocks, its gradients and activations) plus 24 GB for boundary activations and decompositions."""
    weights_mb = _size_b(wc) * 1000 * _DTYPE_BYTES[config["runtime"]["dtype"]]
    return int((weights_mb / 20 * 4 + 24000) * attempt) if gpus_for(wc) else 0


# ---- prehab / rehab: which model a recipe compresses ---------------------------------------------------------


def source_of(method):
    """The model a recipe compresses, and whose statistics / scores / truncation it uses: prehab or pretrained."""
    return "prehab" if config["methods"][method].get("prehab", False) else "pretrained"


def stats_source(source):
    """Whose calibration statistics whiten a source: its own, except prehab with reuse_prehab_whitening."""
    if source == "prehab" and config["prehab"]["reuse_prehab_whitening"]:
        return "pretrained"
    return source


def source_manifest(wc):
    return f"results/{wc.model}/{source_of(wc.method)}/manifest.json"


def rehab_steps(method):
    return config["methods"][method].get("rehab", {}).get("steps", 0)


def refine_mode(method):
    return config["methods"][method].get("refine", {}).get("mode", "none")


def _check_refine_config():
    """A refine section that cannot run, named with its fix (lowrank.refine.check_recipe)."""
    from lowrank.refine import check_recipe

    for name, m in config["methods"].items():
        check_recipe(name, m)


_check_refine_config()


PREHAB_METHODS = [m for m in METHODS if source_of(m) == "prehab"]


def prehab_targets():
    """The prehab report, only when some recipe uses prehab (no recipe without prehab ever plans it)."""
    if not PREHAB_METHODS:
        return []
    return ["results/summary/prehab.md", "results/summary/prehab.json", "results/summary/plots/prehab_spectra.png"]


def _check_prehab_config():
    """Bad prehab input, named with its fix: settings out of range, a prehab recipe without statistics."""
    from lowrank.prehab import PrehabConfig

    settings = {k: v for k, v in config["prehab"].items() if k != "reuse_prehab_whitening"}
    PrehabConfig.from_dict(settings)  # raises ValueError naming the bad value
    for name, m in config["methods"].items():
        if m.get("prehab") and SPACES[m["whitening"]].stat is None:
            raise ValueError(f"method {name!r} has prehab: true but whitening {m['whitening']!r}, which reads no "
                             "calibration statistics: prehab shapes the spectrum of W S in the input_gram space, "
                             "so compress it there. Set whitening: input_gram (or drop prehab from the recipe)")


_check_prehab_config()

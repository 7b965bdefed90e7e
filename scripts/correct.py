"""Rule correct: one projected correction of stage s-1's factors toward the teacher, re-truncated (stage s)."""

import tempfile
from pathlib import Path

from _adapter import lazy_load, load_stats, stage

from lowrank.checkpoint import load_compressed, save_compressed
from lowrank.correction import CorrectionConfig, correct_model, correct_streamed
from lowrank.io import load_tensors, read_json
from lowrank.model import find_targets, linear_weight, load_model, model_path
from lowrank.sharded import load_lazy_model, streams
from lowrank.spaces import bind


def run(smk) -> None:
    with stage(smk) as st:
        method, s = dict(smk.params.method), int(smk.wildcards.stage)
        corr = CorrectionConfig(**method["correction"])
        # lazy (runtime.lazy_load, or a base larger than host or device memory): teacher and model one block at a time
        lazy = streams(model_path(smk.input.manifest), st.dtype, lazy_load(smk), device=st.device)
        if lazy:
            teacher_model = load_lazy_model(model_path(smk.input.manifest), st.dtype)
            model = load_compressed(Path(smk.input.previous).parent, dtype=st.dtype, lazy=True)
            targets = find_targets(teacher_model)
        else:
            teacher_model = load_model(smk.input.manifest, dtype=st.dtype)
            targets = find_targets(teacher_model)
            teacher = {t.name: linear_weight(teacher_model.get_submodule(t.name)).detach() for t in targets}
            del teacher_model
            model = load_compressed(Path(smk.input.previous).parent, dtype=st.dtype, device=st.device)
        # each stage draws the next slice of the calibration windows (cycling), as the reference draws afresh
        all_windows = load_tensors(smk.input.windows)[0]["tokens"]
        w = min(corr.windows, len(all_windows))
        start = ((s - 1) * w) % len(all_windows)
        windows = all_windows.roll(-start, dims=0)[:w]
        # the step is judged on the next w windows, never on its own gradient windows (when the file has them)
        judge = all_windows.roll(-start - w, dims=0)[:w] if len(all_windows) >= 2 * w else None
        stats = load_stats(smk)
        # the re-truncation decomposes with LAPACK's SVD (the rule has no decomposition.method param)
        space = bind(method["whitening"], stats, smk.params.damping, "svd", st.device)
        if lazy:  # the densified weights and the steps go to disk next to the output, removed after
            with tempfile.TemporaryDirectory(dir=Path(smk.output.manifest).parent, prefix=".correct-") as work:
                res = correct_streamed(model, teacher_model, targets, windows, corr.batch_size, space, st.device,
                                       work, backtrack=corr.backtrack, judge=judge)
        else:
            res = correct_model(model, teacher, targets, windows, corr.batch_size, space, st.device,
                                backtrack=corr.backtrack, judge=judge)
        st.log.info("stage %d: calibration loss on %d %s windows %.4f -> %.4f (step scale %g; tried %s)", s, w,
                    "other" if judge is not None else "its own gradient", res.loss_before, res.loss_after,
                    res.scale, res.trials)
        previous = read_json(smk.input.previous)
        save_compressed(Path(smk.output.manifest).parent, model, smk.input.manifest, {
            "method": smk.wildcards.method, "ratio": float(smk.wildcards.ratio), "stage": s, "recipe": method,
            "damping": smk.params.damping, "seed": previous.get("seed"),
            "calibration_loss_before": res.loss_before, "calibration_loss_after": res.loss_after,
            "step_scale": res.scale, "step_trials": res.trials, "targets": res.targets})


if "snakemake" in globals():
    run(snakemake)

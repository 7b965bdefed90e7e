"""Issue 17 in the workflow: bad config refused when the workflow is parsed, bad data in the first job that sees it,
and a rewritten source reruns what depends on it.

The parse-time cases run in-process through Snakemake's API (a fraction of a second each after the first); the
data cases share one tiny run (module-scoped) that stops at the token windows.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from wf import REPO, planned_jobs, snakemake, tiny_config, write_workdir


def parse_error(workdir: Path) -> str:
    """Parse the workflow on ``workdir``'s config and build its DAG in-process; the error text ('' if none)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

    cwd, env = os.getcwd(), dict(os.environ)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LOWRANK_NO_PROGRESS="1")
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out), SnakemakeApi(OutputSettings()) as api:
            wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                              config_settings=ConfigSettings(configfiles=[workdir / "config.yaml"]),
                              snakefile=REPO / "Snakefile", workdir=workdir)
            wf.dag(dag_settings=DAGSettings())
        return ""
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        return f"{e}\n{out.getvalue()}"
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)


def _float_tokens(wd: Path) -> None:
    save_file({"tokens": torch.rand(4000) * 255}, str(wd / "float_tokens.safetensors"))


def _truncated_model(wd: Path) -> None:
    from lowrank.model import load_source, resolve_source

    spec = tiny_config()["models"]["tiny-llama"]
    model, _ = load_source(resolve_source({k: v for k, v in spec.items() if k not in ("tokenizer", "size_b")}))
    model.save_pretrained(str(wd / "model"), safe_serialization=True)
    weights = wd / "model" / "model.safetensors"
    with open(weights, "r+b") as f:  # an interrupted copy
        f.truncate(weights.stat().st_size - 100)


CASES = {
    # case: (mutate the config, prepare the run folder, words the error must hold)
    "ratio with three decimals": (lambda c: c.update(ratios=[0.8, 0.555]), None,
                                  ["ratio 0.555 has more than two decimals", "folder would be 0.56", "e.g. 0.56"]),
    "ratio 0.001": (lambda c: c.update(ratios=[0.001]), None, ["ratio 0.001 has more than two decimals",
                                                                "folder would be 0.00", "e.g. 0.01"]),
    "typo inside a random_init config": (lambda c: c["models"]["tiny-llama"]["config"].update(hiden_size=64), None,
                                         ["models.tiny-llama", "'hiden_size'", "hidden_size"]),
    "missing tokenizer folder": (lambda c: c["models"]["tiny-llama"].update(tokenizer="no_such_tok"), None,
                                 ["models.tiny-llama", "tokenizer folder 'no_such_tok' does not exist"]),
    "empty text file": (lambda c: c["evaluation"].update(corpus={"kind": "text_files", "paths": ["empty.txt"]}),
                        lambda wd: (wd / "empty.txt").write_text(""), ["empty.txt' is empty"]),
    "float token ids": (lambda c: c["calibration"].update(corpus={"kind": "tokens",
                                                                  "path": "float_tokens.safetensors"}),
                        _float_tokens, ["dtype F32", "must be integers"]),
    "truncated safetensors weights": (lambda c: c.update(models={"local": {"source": "hf", "path": "model"}}),
                                      _truncated_model, ["models.local", "model.safetensors is truncated"]),
    "model names differing in case": (lambda c: c["models"].update({"Tiny-Llama": dict(c["models"]["tiny-llama"])}),
                                      None, ["'tiny-llama' and 'Tiny-Llama' differ only in case"]),
    "method names differing in case (the schema: lower case only)": (
        lambda c: c["methods"].update({"SVD": dict(c["methods"]["svd"])}), None, ["'SVD' does not match"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_is_refused_at_parse_time(tmp_path, case) -> None:
    mutate, prepare, words = CASES[case]
    cfg = tiny_config()
    mutate(cfg)
    wd = write_workdir(tmp_path / "run", cfg)
    if prepare:
        prepare(wd)
    err = parse_error(wd)
    assert all(w in err for w in words), err[-3000:]
    assert not (wd / "results").exists()


def test_the_tiny_config_parses() -> None:
    """The control of the cases above: the unmodified config parses without error."""
    wd = write_workdir(Path(os.environ.get("TMPDIR", "/tmp")) / f"lowrank-parse-{os.getpid()}")
    assert parse_error(wd) == ""


# ---- data cases: one run that stops before any statistic ---------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> tuple[Path, str]:
    """The tiny config with an unreachable ratio and evaluation windows longer than the model's 128 positions:
    pretrained runs, both token-window jobs refuse, no statistic is computed."""
    cfg = tiny_config()
    cfg["ratios"] = [0.5, 0.02]  # rank 1 everywhere keeps 0.0278 of the tiny model
    cfg["evaluation"]["seq_len"] = 256
    wd = write_workdir(tmp_path_factory.mktemp("reliability") / "run", cfg)
    proc = snakemake(wd, "--keep-going", "results/tiny-llama/data/calibration.safetensors",
                     "results/tiny-llama/data/evaluation.safetensors", check=False)
    assert proc.returncode != 0
    logs = "".join(p.read_text() for p in (wd / "logs" / "token_windows").rglob("*.log"))
    return wd, logs


def test_unreachable_ratio_fails_before_any_statistic_with_the_bound(stopped_run) -> None:
    wd, logs = stopped_run
    assert "method 'svd': ratio 0.02 is below 0.0278" in logs and "use ratios >= 0.03" in logs
    assert not (wd / "results/tiny-llama/data/calibration.safetensors").exists()
    assert not (wd / "results/tiny-llama/pretrained/stats").exists()
    # once the model's shapes are known, the next invocation refuses at parse time
    out = snakemake(wd, "-n", check=False)
    assert out.returncode != 0 and "ratio 0.02 is below" in out.stdout + out.stderr


def test_evaluation_windows_beyond_the_positions_are_refused(stopped_run) -> None:
    wd, logs = stopped_run
    assert "evaluation.seq_len 256 exceeds the model's max_position_embeddings 128" in logs
    assert not (wd / "results/tiny-llama/data/evaluation.safetensors").exists()


def test_rewritten_source_files_rerun_the_pretrained_stage(stopped_run) -> None:
    wd, _ = stopped_run
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    cfg["ratios"], cfg["evaluation"]["seq_len"] = [0.5], 32
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert "pretrained" not in planned_jobs(snakemake(wd, "-n"))
    tok = wd / "byte_tokenizer" / "tokenizer_config.json"
    folder_mtime = tok.parent.stat().st_mtime_ns
    tok.write_text(tok.read_text() + " ")  # same tokenizer, other bytes: in-place edits are seen
    os.utime(tok.parent, ns=(folder_mtime, folder_mtime))
    assert planned_jobs(snakemake(wd, "-n"))["pretrained"] == 1


def test_local_model_files_missing_from_dvc_deps_are_named(tmp_path, caplog) -> None:
    wd = write_workdir(tmp_path / "run")
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    (wd / "dvc.yaml").write_text(yaml.safe_dump(dvc))
    tok = str((wd / "byte_tokenizer").resolve())
    with caplog.at_level("WARNING"):
        assert parse_error(wd) == ""
    assert f"models.tiny-llama: {tok} is not a dependency in dvc.yaml" in caplog.text
    caplog.clear()
    dvc["stages"]["pipeline"]["deps"].append(tok)
    (wd / "dvc.yaml").write_text(yaml.safe_dump(dvc))
    with caplog.at_level("WARNING"):
        assert parse_error(wd) == ""
    assert "is not a dependency in dvc.yaml" not in caplog.text

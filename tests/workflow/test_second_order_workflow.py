"""The second_order scorer in both spaces it supports, on calibration / evaluation windows given as 2-D
``windows`` files (taken as they are): one tiny-DAG run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wf import snakemake, tiny_config, write_workdir

# its own tiny-DAG run with the output_kl statistic (minutes): `python3 -m pytest -m slow`
# (.ci/run) runs it; the scorer itself is unit-tested in tests/unit/test_second_order.py
pytestmark = pytest.mark.slow

METHODS = {
    "zs-svd": {"whitening": "input_gram", "scorer": "first_order", "allocator": "zero_sum"},
    "zs-svd2": {"whitening": "input_gram", "scorer": "second_order", "allocator": "zero_sum",
                "correction": {"stages": 1, "windows": 4}},
    "io-svd2": {"whitening": "io_kl", "scorer": "second_order", "allocator": "zero_sum"},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    cfg = tiny_config()
    cfg["methods"] = dict(METHODS)
    cfg["ratios"] = [0.5]
    cfg["statistics"] = {"output_kl": {"top_k": 5, "max_windows": 2}}
    cfg["calibration"]["corpus"] = {"kind": "windows", "path": "calibration_windows.safetensors"}
    cfg["evaluation"]["corpus"] = {"kind": "windows", "path": "evaluation_windows.safetensors"}
    cfg["evaluation"]["zeroshot"] = {"tasks": []}
    cfg["evaluation"]["speed"] = {"enabled": False}
    wd = write_workdir(tmp_path_factory.mktemp("so") / "run", cfg)
    g = torch.Generator().manual_seed(5)
    save_file({"tokens": torch.randint(0, 256, (20, 32), generator=g)}, str(wd / "calibration_windows.safetensors"))
    save_file({"tokens": torch.randint(0, 256, (10, 32), generator=g)}, str(wd / "evaluation_windows.safetensors"))
    snakemake(wd)
    return wd


def test_windows_files_are_used_as_they_are(run: Path) -> None:
    data = run / "results" / "tiny-llama" / "data"
    calib = load_file(str(data / "calibration.safetensors"))["tokens"]
    given = load_file(str(run / "calibration_windows.safetensors"))["tokens"]
    assert torch.equal(calib, given[:16])  # n_samples 16 of the 20 rows, in order
    ev = load_file(str(data / "evaluation.safetensors"))["tokens"]
    assert torch.equal(ev, load_file(str(run / "evaluation_windows.safetensors"))["tokens"][:8])  # max_windows 8


def test_second_order_scores_add_a_nonnegative_curvature_to_first_order(run: Path) -> None:
    scores = run / "results" / "tiny-llama" / "pretrained" / "scores" / "input_gram"
    fo, so = load_file(str(scores / "first_order.safetensors")), load_file(str(scores / "second_order.safetensors"))
    assert set(fo) == set(so)
    for k in fo:
        if k.startswith("score."):
            assert bool((so[k] - fo[k] >= -1e-6 * fo[k].abs().max()).all()), k
    res = run / "results" / "tiny-llama"
    for method in METHODS:
        ev = json.loads((res / method / "0.50" / "eval" / "ppl.json").read_text())
        assert 1 < ev["ppl"] < 1e4
        alloc = json.loads((res / method / "0.50" / "allocation.json").read_text())
        assert alloc["scorer"] == METHODS[method]["scorer"] and alloc["kept_fraction"] <= 0.5 + 1e-9
    assert (res / "pretrained" / "scores" / "io_kl" / "second_order.safetensors").exists()

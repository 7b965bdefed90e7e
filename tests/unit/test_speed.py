"""lowrank.speed: throughput bookkeeping, peak memory and bytes on disk (no timing targets here: see bench/)."""

from __future__ import annotations

import pytest
import torch

from lowrank.speed import files_bytes, measure_generation, peak_rss_mb, rss_mb


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_measure_generation_reports_consistent_throughputs(arch, request) -> None:
    model = request.getfixturevalue(arch)
    r = measure_generation(model, prefill_tokens=16, decode_tokens=4, batch_size=2, warmup=1, repeats=3)
    assert r["prefill_tok_s"] == pytest.approx(2 * 16 / r["prefill_s"])
    assert r["decode_tok_s"] == pytest.approx(2 * 4 / r["decode_s"])
    assert r["prefill_s"] > 0 and r["decode_s"] > 0
    assert r["device"] == "cpu" and r["repeats"] == 3 and "peak_cuda_mb" not in r
    assert r["peak_rss_mb"] >= (rss_mb() or 0) * 0.5 > 0


def test_too_long_a_round_is_refused_naming_the_keys(tiny_llama) -> None:
    with pytest.raises(ValueError, match="prefill_tokens"):
        measure_generation(tiny_llama, prefill_tokens=120, decode_tokens=16)  # 128 positions


def test_peak_rss_covers_a_new_allocation() -> None:
    before = peak_rss_mb()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert peak_rss_mb() >= before
    assert peak_rss_mb() >= (rss_mb() or 0) - 1
    del x


def test_files_bytes_counts_files_and_folders(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"x" * 10)
    (tmp_path / "b").write_bytes(b"y" * 5)
    assert files_bytes([tmp_path / "d", tmp_path / "b"]) == 15

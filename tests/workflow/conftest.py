"""Fixtures of the workflow tests (helpers live in wf.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from wf import write_workdir


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return write_workdir(tmp_path / "run")

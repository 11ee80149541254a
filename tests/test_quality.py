"""Lint and types are part of the build: ruff and mypy, as configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "ruff", "check", "autocoder", "tests", "bench"],
        [sys.executable, "-m", "ruff", "format", "--check", "autocoder", "tests", "bench"],
        [sys.executable, "-m", "mypy", "autocoder"],
    ],
    ids=["ruff", "ruff-format", "mypy"],
)
def test_the_code_is_clean(command: list[str]) -> None:
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr

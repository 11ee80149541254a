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


def test_what_runs_inside_the_sandbox_imports_nothing_of_autocoder() -> None:
    """The sandbox does not see the package: inside/ is sent as source, standard library only."""
    import ast

    for path in sorted((ROOT / "autocoder" / "inside").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if isinstance(node, ast.ImportFrom) and node.level:
                names = ["autocoder (relative)"]
            assert not [n for n in names if n.split(".")[0] == "autocoder" or "relative" in n], (
                f"{path.name} imports {names}"
            )

"""What a benchmark task is, and what its checker is shown of a run."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

CATEGORIES = ("data", "files", "programming", "care")


@dataclass(frozen=True)
class Answer:
    """What a run left for the user to read: the text it printed and the files it wrote.

    The same whether the code ran under `autocoder run --json` (its `output`, and `files`
    inside its `workdir`) or directly under python (its stdout and the files it made), so a
    checker is validated on exactly what it later judges.
    """

    output: str
    files: Mapping[str, Path] = field(default_factory=dict)

    def file(self, name: str) -> Path | None:
        """A written file by its name, wherever under the working directory the code put it."""
        if name in self.files:
            return self.files[name]
        for rel, path in self.files.items():
            if rel.rsplit("/", 1)[-1] == name:
                return path
        return None


@dataclass(frozen=True)
class Verdict:
    ok: bool
    why: str = ""

    def __bool__(self) -> bool:
        return self.ok


PASS = Verdict(True)


def fail(why: str) -> Verdict:
    return Verdict(False, why)


Checker = Callable[[Answer], Verdict]
Inputs = Callable[[], Mapping[str, bytes]]


def _no_inputs() -> Mapping[str, bytes]:
    return {}


@dataclass(frozen=True)
class Task:
    """One question a user might ask, with everything needed to judge an answer to it.

    `inputs` makes the files given with `--file` (deterministic: seeded, no downloads).
    `check` decides from an Answer whether the answer is right. `reference` answers the task
    correctly and `wrong` makes a plausible mistake: tests/test_bench_tasks.py runs both
    directly with python and requires the checker to accept the first and reject the second,
    so a checker is known to be able to tell before any model is judged by it.
    """

    name: str
    category: str
    prompt: str
    check: Checker
    reference: str
    wrong: str
    inputs: Inputs = _no_inputs

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"{self.name}: unknown category {self.category!r}")
        object.__setattr__(self, "prompt", " ".join(self.prompt.split()))
        object.__setattr__(self, "reference", textwrap.dedent(self.reference).strip() + "\n")
        object.__setattr__(self, "wrong", textwrap.dedent(self.wrong).strip() + "\n")

"""The tasks of `bench/tasks.py`: realistic code-interpreter questions, each with the files it
is given, a checker written before any model ran, and reference solutions that keep the
checker honest (tests/test_bench_tasks.py).

The catalog is this package; `bench/tasks.py` is the script that runs it through the CLI.
"""

from __future__ import annotations

from . import care, data, outputs, programming
from .base import CATEGORIES, Answer, Task, Verdict

TASKS: tuple[Task, ...] = (*data.TASKS, *outputs.TASKS, *programming.TASKS, *care.TASKS)

_names = [t.name for t in TASKS]
assert len(set(_names)) == len(_names), "task names must be unique"

__all__ = ["CATEGORIES", "TASKS", "Answer", "Task", "Verdict"]

"""Running a task's reference code directly with python, no model and no kernel involved.

Each program runs in its own process, in its own directory holding the task's input files
(read-only, as autocoder places them), and its Answer is what it printed and the files it
left. To keep this quick, one interpreter imports the data stack once and forks a child per
program; a child that runs too long is ended by its own alarm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .base import Answer

DRIVER = r"""
import json, os, signal, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot, numpy, pandas

jobs = json.load(open(sys.argv[1]))
results = []
for job in jobs:
    pid = os.fork()
    if pid == 0:
        signal.alarm(job["timeout"])
        os.chdir(job["dir"])
        out = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        try:
            exec(compile(job["code"], "<reference>", "exec"), {"__name__": "__main__"})
        except BaseException:
            import traceback
            traceback.print_exc()
            sys.stdout.flush()
            os._exit(1)
        sys.stdout.flush()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    results.append(os.waitstatus_to_exitcode(status))
print(json.dumps(results))
"""


def run_directly(
    programs: Sequence[tuple[str, Mapping[str, bytes]]], root: Path, *, timeout: int = 60
) -> list[tuple[Answer, int]]:
    """Run each (code, input files) in a fresh process under `root`; its Answer and exit code."""
    jobs: list[dict[str, str | int]] = []
    dirs: list[tuple[Path, Path]] = []
    for i, (code, inputs) in enumerate(programs):
        workdir, stdout = root / f"job{i}" / "files", root / f"job{i}" / "stdout.txt"
        workdir.mkdir(parents=True)
        for name, data in inputs.items():
            (workdir / name).write_bytes(data)
            (workdir / name).chmod(0o444)
        jobs.append({"dir": str(workdir), "code": code, "stdout": str(stdout), "timeout": timeout})
        dirs.append((workdir, stdout))
    jobs_file = root / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    env = dict(os.environ, MPLBACKEND="Agg", OPENBLAS_NUM_THREADS="1", PYTHONHASHSEED="0")
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(jobs_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout * len(jobs) + 60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the reference driver failed: {proc.stderr[-2000:]}")
    exit_codes: list[int] = json.loads(proc.stdout.splitlines()[-1])
    answers = []
    for (workdir, stdout), (_, inputs), exit_code in zip(dirs, programs, exit_codes, strict=True):
        written = {
            p.relative_to(workdir).as_posix(): p
            for p in sorted(workdir.rglob("*"))
            if p.is_file() and p.relative_to(workdir).as_posix() not in inputs
        }
        answers.append((Answer(stdout.read_text(errors="replace"), written), exit_code))
    return answers

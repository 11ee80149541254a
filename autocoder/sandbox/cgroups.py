"""cgroups (v1) for a kernel's whole process tree, where they are writable: memory and tasks in
total, a watcher that removes them when the kernel is gone, and a sweep of those whose
kernel died unseen. Best effort: rlimits hold where cgroups cannot be had."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


def cgroup_limits(memory_mb: int, max_tasks: int) -> dict[str, dict[str, int]]:
    """What a kernel's cgroups hold it to, by controller: its memory (swap included), its tasks."""
    mib = 2**20
    return {
        "memory": {
            "memory.limit_in_bytes": memory_mb * mib,
            "memory.memsw.limit_in_bytes": memory_mb * mib,
        },
        "pids": {"pids.max": max_tasks},
    }


def make_cgroups(name: str, wanted: Mapping[str, Mapping[str, int]]) -> list[Path]:
    """Best effort: `<own cgroup>/autocoder/<name>` under each controller of `wanted` that is
    mounted and writable, holding its values (a file this kernel lacks is left out). Dirs of
    kernels that are gone are swept first. Returns the dirs made; nothing has joined them yet."""
    made: list[Path] = []
    for controller, files in wanted.items():
        base = cgroup_dir(controller)
        if base is None or not os.access(base, os.W_OK):
            continue
        mine = base / "autocoder" / name
        try:
            if mine.parent.is_dir():
                _sweep(mine.parent)
            mine.mkdir(parents=True, exist_ok=True)
            made.append(mine)
            for file, value in files.items():
                if (mine / file).exists():
                    (mine / file).write_text(str(value))
        except OSError:
            continue
    return made


_REMOVE_WHEN_GONE = """import os, select, signal, sys, time
select.select([int(sys.argv[1])], [], [])
left = sys.argv[2:]
for _ in range(100):
    for d in list(left):
        # What outlived bwrap in its cgroups: its child, when bwrap was killed between the
        # clone and the child's parent-death signal, waits on bwrap for ever. Killed here.
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids = f.read().split()
        except OSError:
            pids = []
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError:
            continue
        left.remove(d)
        try:
            os.rmdir(os.path.dirname(d))
        except OSError:
            pass
    if not left:
        break
    time.sleep(0.1)
"""


def remove_when_gone(dirs: list[Path]) -> None:
    """Start a small watcher, in its own session, that waits on a pidfd of this process (bwrap
    soon). It outlives a killed server on purpose: it ends once the dirs are gone."""
    pidfd = os.pidfd_open(os.getpid())
    subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _REMOVE_WHEN_GONE, str(pidfd), *map(str, dirs)],
        pass_fds=[pidfd],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(pidfd)


def cgroup_dir(controller: str) -> Path | None:
    """This process's cgroup in the v1 hierarchy holding `controller`, if it is mounted."""
    mounts = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if tail and tail[0] == "cgroup" and controller in tail[-1].split(","):
            mounts[fields[3]] = Path(fields[4])
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            for root, mount in mounts.items():
                if path.startswith(root):
                    return mount / path[len(root) :].lstrip("/")
    return None


# A forked kernel's cgroup (`f<uid>`) is joined within its start; one still empty after this
# long belongs to a kernel whose server was killed before it could remove it.
STALE_AFTER = 600.0


def _sweep(parent: Path, now: float | None = None) -> None:
    """Remove the dirs of kernels that are gone: an exec'd kernel's (`k<pid>`) once its
    launcher has exited, a forked kernel's (`f<uid>`) once it is empty and stale."""
    now = time.time() if now is None else now
    for child in parent.glob("k[0-9]*"):
        if child.name[1:].isdigit() and not Path("/proc", child.name[1:]).exists():
            with contextlib.suppress(OSError):
                child.rmdir()
    for child in parent.glob("f[0-9]*"):
        with contextlib.suppress(OSError):
            if (
                child.name[1:].isdigit()
                and now - child.stat().st_mtime > STALE_AFTER
                and not (child / "cgroup.procs").read_text().strip()
            ):
                child.rmdir()

"""Forked against exec'd kernel starts, side by side in one run: wall, CPU and unique memory.

Both through Kernel under the same sandbox and limits, interleaved so that both see the
same machine load:
- request → ready: wall time of `Kernel.start()` until the kernel answers on shell and
  iopub, and the CPU that took, everywhere: this process, the zygote, the launcher and bwrap,
  the kernel (a cpuacct cgroup of this bench holds them all; forked kernels stay in it).
- a whole cycle: start → `print(1)` → shutdown, wall and CPU.
- unique set size (USS: private pages, not the shared copy-on-write ones) of an idle kernel's
  process tree (forked: init and kernel; exec'd: bwrap's two processes and the kernel),
  and of the kernel process alone.

    python bench/fork_start.py [--repeat 20]

Needs a root server (forked kernels take a throwaway uid each) and bubblewrap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from autocoder import sandbox
from autocoder.config import Settings, load_settings
from autocoder.kernel import fork as forkserver
from autocoder.kernel.pool import new_kernel

CPUACCT = Path("/sys/fs/cgroup/cpuacct")


class CpuMeter:
    """CPU seconds used by this process and everything it starts, from a cgroup of our own."""

    def __init__(self) -> None:
        self.group: Path | None = None
        if CPUACCT.is_dir() and os.access(CPUACCT, os.W_OK):
            group = CPUACCT / f"autocoder-bench-{os.getpid()}"
            group.mkdir(exist_ok=True)
            (group / "cgroup.procs").write_text(str(os.getpid()))
            self.group = group

    def now(self) -> float:
        if self.group is None:  # children's CPU only once they are reaped: a lower bound
            t = os.times()
            return t.user + t.system + t.children_user + t.children_system
        return int((self.group / "cpuacct.usage").read_text()) / 1e9

    def close(self) -> None:
        if self.group is not None:
            parent = self.group.parent
            (parent / "cgroup.procs").write_text(str(os.getpid()))
            time.sleep(0.2)
            with contextlib.suppress(OSError):
                self.group.rmdir()


def tree(root: int) -> list[int]:
    """`root` and its descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def kernel_tree(provisioner: Any) -> list[int]:
    """A kernel's processes: a forked kernel's cgroups hold its init, the kernel (the zygote's
    child, in the init's namespaces) and what it started; an exec'd kernel's are its tree."""
    members = forkserver._members(getattr(provisioner, "_cgroups", []))
    return members or tree(int(provisioner.pid or 0))


def uss(pid: int) -> int:
    """Private bytes of `pid` (smaps_rollup's Private_Clean + Private_Dirty)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


def kernel_pid(pids: list[int]) -> int:
    """The kernel in a tree: the python naming ipykernel_launcher (retitled when forked)."""
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0] == sys.executable.encode() and b"ipykernel_launcher" in argv[:4]:
            return pid
    return pids[-1]


async def cycle(settings: Settings, meter: CpuMeter, memory: bool) -> dict[str, float]:
    t, c = time.perf_counter(), meter.now()
    session = new_kernel(settings)
    await session.start()
    ready_wall, ready_cpu = time.perf_counter() - t, meter.now() - c
    out: dict[str, float] = {"ready_wall": ready_wall, "ready_cpu": ready_cpu}
    try:
        result = await session.execute("print(1)", timeout=30)
        assert result.stdout == "1\n", result
        if memory:
            await asyncio.sleep(1.0)  # idle
            manager = session.km.manager  # type: ignore[union-attr]
            assert manager is not None and manager.provisioner is not None
            pids = kernel_tree(manager.provisioner)
            out["uss_tree"] = sum(uss(p) for p in pids)
            out["uss_kernel"] = uss(kernel_pid(pids))
    finally:
        await session.shutdown()
    out["cycle_wall"], out["cycle_cpu"] = time.perf_counter() - t, meter.now() - c
    if memory:
        out["cycle_wall"] -= 1.0
    return out


def med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows if key in r)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--memory-every", type=int, default=4, help="measure USS every n-th")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="autocoder-bench-"))
    base = load_settings(sandbox="bwrap", autofile_dir=work)
    settings = {
        "exec": base.model_copy(update={"kernel_start": "exec"}),
        "fork": base.model_copy(update={"kernel_start": "fork"}),
    }
    reason = forkserver.why_not(settings["fork"])
    if reason is not None:
        sys.exit(f"bench/fork_start.py: kernels cannot be forked here: {reason}")
    sandbox.check_available(base)
    meter = CpuMeter()
    try:
        await forkserver.zygote_for(settings["fork"]).ready()
        for s in settings.values():  # the sandbox probe, disk caches: untimed
            await cycle(s, meter, memory=False)
        rows: dict[str, list[dict[str, float]]] = {"exec": [], "fork": []}
        for i in range(args.repeat):
            for name, s in settings.items():
                rows[name].append(await cycle(s, meter, memory=i % args.memory_every == 0))
    finally:
        forkserver.close_all()
        meter.close()
        shutil.rmtree(work, ignore_errors=True)

    cpu_source = "cgroup cpuacct" if meter.group is not None else "os.times (lower bound)"
    print(
        f"bwrap sandbox, repeat={args.repeat}, {os.cpu_count()} CPUs, python "
        f"{sys.version.split()[0]}, CPU from {cpu_source} (this process, zygote, kernels)"
    )
    print(f"{'median':<34}{'exec':>10}{'fork':>10}{'fork/exec':>11}")
    for key, label, scale, unit in (
        ("ready_wall", "request -> ready, wall", 1000, "ms"),
        ("ready_cpu", "request -> ready, CPU", 1000, "ms"),
        ("cycle_wall", "start, print(1), shutdown: wall", 1000, "ms"),
        ("cycle_cpu", "start, print(1), shutdown: CPU", 1000, "ms"),
        ("uss_tree", "USS, idle kernel's process tree", 2**-20, "MiB"),
        ("uss_kernel", "USS, the kernel process alone", 2**-20, "MiB"),
    ):
        e, f = med(rows["exec"], key) * scale, med(rows["fork"], key) * scale
        print(f"{label + ' (' + unit + ')':<34}{e:>10.1f}{f:>10.1f}{f / e:>10.2f}x")


if __name__ == "__main__":
    asyncio.run(main())

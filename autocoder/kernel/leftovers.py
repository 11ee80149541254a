"""What a killed autocoder leaves behind, and how a later one finds it and removes it.

Every runtime dir, working dir and zygote dir a process makes begins with its `owner_tag`
(`<pid>.<start time>`), so that a later process can tell which ones a dead server left behind;
`sweep_leftovers` removes those, and the kernel processes that still name them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from autocoder import disk, sandbox
from autocoder.config import Settings

log = logging.getLogger(__name__)

RUNTIME_PREFIX = "ac-"
ZYGOTE_PREFIX = "acz-"
LEFTOVER_GRACE = 5.0


def workdirs_root(settings: Settings) -> Path:
    """Where kernels' working directories are made, one per session."""
    return settings.autofile_dir / ".work"


def owner_tag(pid: int | None = None) -> str:
    """`<pid>.<start time>` of a process (this one by default): a pid alone gets reused.

    It begins the names of the runtime dirs and workdirs a process makes, so that a later
    process can tell which ones a dead server left behind.
    """
    pid = os.getpid() if pid is None else pid
    return f"{pid}.{_start_time(pid) or 0}"


def _start_time(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[19])


def _owner_gone(name: str, prefix: str = "") -> bool:
    """Whether `name` (`<prefix><pid>.<start>-...`) was made by a process that has ended."""
    m = re.fullmatch(re.escape(prefix) + r"(\d+)\.(\d+)-[\w-]+", name)
    if m is None:
        return False
    return _start_time(int(m[1])) != int(m[2])


@dataclass
class Swept:
    """What `sweep_leftovers` removed."""

    processes: int = 0
    dirs: int = 0


def sweep_leftovers(work_root: Path | None = None) -> Swept:
    """Remove what an earlier autocoder, killed before it could clean up, left behind.

    Only its own things, where this process would make them: processes naming a connection
    file in a runtime dir (in the temp dir) whose maker is gone, or whose launcher environment
    names a parent that is no longer theirs (a bwrap that lost its server); then their runtime
    dirs (connection files hold HMAC keys) and the workdirs under `work_root` that a dead
    process made.
    """
    swept = Swept()
    if not Path("/proc/self/stat").exists():
        return swept
    tmp = Path(tempfile.gettempdir())
    stale = {d for d in _runtime_dirs(tmp) if _owner_gone(d.name, RUNTIME_PREFIX)}
    zygote_dirs = _runtime_dirs(tmp, ZYGOTE_PREFIX)
    stale_zygotes = {d for d in zygote_dirs if _owner_gone(d.name, ZYGOTE_PREFIX)}
    orphans = {
        pid: d for pid, d in _autocoder_processes() if d.parent == tmp and _is_orphan(pid, d, stale)
    }
    for pid in orphans:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + LEFTOVER_GRACE
    while any(_running(pid) for pid in orphans) and time.monotonic() < deadline:
        time.sleep(0.05)
    swept.processes = len(orphans)
    dirs = stale | stale_zygotes | {d for d in orphans.values() if _ours(d)}
    if work_root is not None and work_root.is_dir():
        dirs |= {d for d in work_root.iterdir() if _owner_gone(d.name) and _ours(d)}
    for d in dirs:
        disk.remove(d)  # a budget is unmounted first: its files go with it
        swept.dirs += not d.exists()
    if swept.processes or swept.dirs:
        log.warning(
            "removed what an earlier autocoder left: %d process(es), %d dir(s)",
            swept.processes,
            swept.dirs,
        )
    return swept


def _runtime_dirs(tmp: Path, prefix: str = RUNTIME_PREFIX) -> Iterator[Path]:
    with contextlib.suppress(OSError):
        for d in tmp.iterdir():
            if d.name.startswith(prefix) and _ours(d):
                yield d


def _ours(d: Path) -> bool:
    """A real directory of this user (or, for root, of a kernel's throwaway uid)."""
    try:
        st = d.lstat()
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    uid = os.geteuid()
    return st.st_uid == uid or (uid == 0 and st.st_uid >= sandbox.UID_BASE)


def _autocoder_processes() -> Iterator[tuple[int, Path]]:
    """(pid, runtime dir) of every other process that names an autocoder connection file."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        for arg in argv:
            if _CONNECTION_FILE.search(arg) and int(proc.name) != os.getpid():
                yield int(proc.name), Path(arg).parent
                break


_CONNECTION_FILE = re.compile("/" + re.escape(RUNTIME_PREFIX) + r"[^/]+/kernel\.json$")


def _is_orphan(pid: int, runtime_dir: Path, stale: set[Path]) -> bool:
    if runtime_dir in stale:
        return True
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return False
    env = dict(v.decode("utf-8", "replace").partition("=")[::2] for v in environ if b"=" in v)
    if sandbox.RUNTIME_DIR_VAR not in env:
        return False  # not a launcher (or bwrap) started with kernel_env
    if _names_runtime_dir(ppid, runtime_dir):
        return False  # bwrap's own child, or a resident launcher's bwrap: its parent decides
    parent = env.get(sandbox.PARENT_PID_VAR)
    if parent is None:
        return ppid == 1  # started by an autocoder from before the parent was named
    return parent != str(ppid)


def _names_runtime_dir(pid: int, runtime_dir: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return False
    return any(_CONNECTION_FILE.search(a) and Path(a).parent == runtime_dir for a in argv)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

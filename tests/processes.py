"""What the tests ask of /proc: is a process alive, and which live ones name a path."""

from __future__ import annotations

import os
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_naming(text: str) -> list[int]:
    """Live (non-zombie) processes with `text` in their command line."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode("utf-8", "replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in argv and state != "Z" and int(proc.name) != os.getpid():
            pids.append(int(proc.name))
    return pids


def gone_within(text: str, timeout: float = 15) -> list[int]:
    """Wait (bounded) for every process naming `text` to end; return those that did not."""
    deadline = time.monotonic() + timeout
    while (left := processes_naming(text)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left

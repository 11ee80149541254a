"""Launch a kernel confined (bubblewrap + rlimits) or plain. Runs as `python -m autocoder.sandbox`.

STUB: the sandbox issue fills this in. Contract used by kernel.py:
- `kernel_env(settings, workdir, runtime_dir) -> dict[str, str]`: the whole environment the
  launcher is started with (no secrets).
- `check_available(settings) -> None`: raises SandboxUnavailable with one clear line.
- `main(argv)`: the launcher; execs ipykernel (under bwrap when --sandbox bwrap).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from autocoder.config import Settings

KERNEL_ARGS = ["--HistoryManager.hist_file=:memory:", "--IPKernelApp.parent_handle=0"]


def kernel_env(settings: Settings, workdir: Path, runtime_dir: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ") if k in os.environ}
    env["HOME"] = str(workdir)
    env["AUTOCODER_SANDBOX_WORKDIR"] = str(workdir)
    env["AUTOCODER_SANDBOX_RUNTIME_DIR"] = str(runtime_dir)
    env["PYTHONUNBUFFERED"] = "1"
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    return env


def check_available(settings: Settings) -> None:
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m autocoder.sandbox")
    p.add_argument("--sandbox", choices=["bwrap", "none"], default="bwrap")
    p.add_argument("-f", dest="connection_file", required=True)
    args = p.parse_args(argv)
    cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", args.connection_file, *KERNEL_ARGS]
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()

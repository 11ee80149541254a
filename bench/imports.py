"""What each door costs to start: fresh-interpreter wall time, against `import IPython`.

Each target runs in a new interpreter (`python -c "import X"`, or the `autocoder` command
itself), N rounds interleaved so that every target sees the same machine load. Printed: the
p50 and p90 wall time of each, and its ratio to `import IPython` (what a notebook user waits
for anyway) and to `python -c pass` (the interpreter alone).

    python bench/imports.py [--rounds 10]
    python bench/imports.py --importtime autocoder.magic [--top 15]

`--importtime MODULE` prints the modules that cost most to import (cumulative, from
`python -X importtime`), to see what to import later.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path


def targets() -> dict[str, list[str]]:
    """Name → command line. `autocoder --help` is the installed command (else `-m autocoder`)."""
    py = sys.executable
    command = shutil.which("autocoder", path=str(Path(py).parent)) or ""
    found: dict[str, list[str]] = {
        "python -c pass": [py, "-c", "pass"],
        "import IPython": [py, "-c", "import IPython"],
        "import autocoder.magic": [py, "-c", "import autocoder.magic"],
        "autocoder --help": [command, "--help"] if command else [py, "-m", "autocoder", "--help"],
        "import autocoder.cli": [py, "-c", "import autocoder.cli"],
    }
    if find_spec("autocoder.client") is not None:
        found["import autocoder.client"] = [py, "-c", "import autocoder.client"]
    return found


def once(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120
    )
    return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def importtime(module: str, top: int) -> None:
    """The `top` costliest imports of `module` in a fresh interpreter, cumulative µs."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cumulative, name = line.removeprefix("import time:").split("|", 2)
        rows.append((int(cumulative), int(self_us), name.rstrip()))
    total = max((c for c, _, n in rows if n.strip() == module), default=0)
    print(f"python -X importtime -c 'import {module}': {total / 1e6:.2f} s in all\n")
    print(f"{'cumulative':>11} {'self':>9}  module")
    for cumulative, self_us, name in sorted(rows, reverse=True)[:top]:
        print(f"{cumulative / 1e6:>9.3f} s {self_us / 1e6:>7.3f} s  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--importtime", metavar="MODULE", help="the top offenders of one import")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    if args.importtime:
        importtime(args.importtime, args.top)
        return

    cmds = targets()
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for cmd in cmds.values():  # one unmeasured round: the page cache, .pyc files
        once(cmd)
    for _ in range(args.rounds):
        for name, cmd in cmds.items():
            times[name].append(once(cmd))
    load = os.getloadavg()[0]
    print(
        f"rounds={args.rounds} python={sys.version.split()[0]} cpus={os.cpu_count()} "
        f"load={load:.2f} (1-min, at the end)\n"
    )
    ipython = statistics.median(times["import IPython"])
    bare = statistics.median(times["python -c pass"])
    print("| fresh interpreter | p50 | p90 | / import IPython | / python -c pass |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        p50 = statistics.median(values)
        print(
            f"| `{name}` | {p50:.3f} s | {pct(values, 0.9):.3f} s | {p50 / ipython:.2f}x "
            f"| {p50 / bare:.1f}x |"
        )


if __name__ == "__main__":
    main()

"""Kernel start and a warm execute round trip per language, side by side with Python, in one run.

For each language this installation runs (`autocoder kernels list`), under the configured
sandbox: the time from asking for a kernel to its first answer (Kernel.start: the
launcher, the sandbox, the kernel's own start, and for Deno the TCP relay), and the round
trip of a trivial execute on a started kernel (what prints one line: the kernel's floor,
plus the relay where there is one). Languages are interleaved round by round, so each sees
the same machine load; medians, and ratios to Python, are printed.

    python bench/languages.py [--repeat 5] [--executes 20] [--sandbox bwrap|none]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from autocoder import languages
from autocoder.config import Settings, load_settings
from autocoder.kernel.pool import new_kernel

TRIVIAL = {
    "python": "print(1)",
    "bash": "echo 1",
    "javascript": "console.log(1)",
    "typescript": "console.log(1 as number)",
    "r": "cat(1, '\\n')",
}


async def one_round(settings: Settings, language: str, executes: int) -> tuple[float, float]:
    """(seconds to start, median seconds of a warm execute) for one fresh kernel."""
    session = new_kernel(settings, language=language)
    t = time.perf_counter()
    await session.start()
    started = time.perf_counter() - t
    try:
        await session.execute(TRIVIAL[language], timeout=30)  # warm up
        trips = []
        for _ in range(executes):
            t = time.perf_counter()
            result = await session.execute(TRIVIAL[language], timeout=30)
            trips.append(time.perf_counter() - t)
            assert result.ok and "1" in result.text, (language, result)
    finally:
        await session.shutdown()
    return started, statistics.median(trips)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5, help="kernel starts per language")
    p.add_argument("--executes", type=int, default=20, help="warm executes per kernel")
    p.add_argument("--sandbox", choices=["bwrap", "none"], default="bwrap")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="autocoder-bench-lang-"))
    settings = load_settings(sandbox=args.sandbox, autofile_dir=root, notebooks_dir=root)
    names = languages.installed(settings)
    # JavaScript and TypeScript share Deno's kernel: its start is measured once, as typescript.
    measured = [n for n in names if n != "javascript"]
    starts: dict[str, list[float]] = {n: [] for n in measured}
    trips: dict[str, list[float]] = {n: [] for n in measured}
    for _ in range(args.repeat):
        for name in measured:
            start, trip = await one_round(settings, name, args.executes)
            starts[name].append(start)
            trips[name].append(trip)
    missing = [a for a in languages.availability(settings) if not a.available]
    base_start = statistics.median(starts["python"])
    base_trip = statistics.median(trips["python"])
    print(f"sandbox={args.sandbox} repeat={args.repeat} executes={args.executes}")
    print(f"{'language':<12}{'start (s)':>10}{'x python':>10}{'execute (ms)':>14}{'x python':>10}")
    for name in measured:
        s, e = statistics.median(starts[name]), statistics.median(trips[name])
        print(f"{name:<12}{s:>10.2f}{s / base_start:>10.2f}{e * 1000:>14.1f}{e / base_trip:>10.2f}")
    for a in missing:
        print(f"{a.language:<12}not measured: {a.reason}")


if __name__ == "__main__":
    asyncio.run(main())

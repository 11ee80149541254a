"""What one output flood costs the calling process, with and without the kernel's own cap.

The generated code is `print('x' * 10**8)`, run through the whole engine (a Runner, the scripted
model on 127.0.0.1, a real kernel). Each configuration runs in a fresh process: a warm-up run
first, then the peak RSS is reset (/proc/self/clear_refs) and the flood runs; the growth is the
new peak minus the RSS before it. "without" starts kernels whose launcher is not given the limit
(AUTOCODER_MAX_OUTPUT_BYTES), so only the server cuts, as before the in-kernel cap.

    python bench/flood.py [--sandbox bwrap|none] [--repeat 3]

docs/security.md quotes its table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from autocoder import sandbox
from autocoder.config import load_settings
from autocoder.inside import output_cap
from autocoder.runner import Runner
from autocoder.testing import ScriptedLLM, fenced

FLOOD = "print('x' * 10**8)"


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    """Make VmHWM the current RSS again (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


async def one(sandbox_mode: str, capped: bool, repeat: int) -> dict[str, Any]:
    if not capped:
        plain = sandbox.kernel_env

        def uncapped(*args: Any) -> dict[str, str]:
            env = plain(*args)
            env.pop(output_cap.LIMIT_VAR, None)
            return env

        sandbox.kernel_env = uncapped  # type: ignore[assignment]
    root = Path(tempfile.mkdtemp(prefix="autocoder-flood-"))
    llm = ScriptedLLM().start()
    settings = load_settings(
        sandbox=sandbox_mode,
        llm_retries=0,
        max_attempts=1,
        timeout=30,
        openai_base_url=llm.base_url,
        openai_api_key="sk-bench",
        notebooks_dir=root / "notebooks",
        autofile_dir=root / "autofile",
    )
    runner = Runner(settings)
    growth, seconds, kinds, kept = [], [], set(), 0
    try:
        llm.script(fenced("print('ok')"))
        await runner.run("warm up")
        for _ in range(repeat):
            llm.script(fenced(FLOOD))
            reset_peak()
            before = status_kb("VmRSS")
            start = time.monotonic()
            result = await runner.run("flood")
            seconds.append(time.monotonic() - start)
            growth.append((status_kb("VmHWM") - before) / 1024)
            first = result.attempts[0]
            kinds.add(first.error_kind.value if first.error_kind else "success")
            kept = len(first.output)
    finally:
        await runner.close()
        llm.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "growth_mb": statistics.median(growth),
        "max_growth_mb": max(growth),
        "seconds": statistics.median(seconds),
        "kinds": sorted(kinds),
        "kept": kept,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sandbox", default=os.environ.get("AUTOCODER_SANDBOX", "bwrap"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--one", choices=["with", "without"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(one(args.sandbox, args.one == "with", args.repeat))))
        return

    rows = {}
    for mode in ("without", "with"):
        out = subprocess.run(
            [sys.executable, __file__, "--one", mode, "--sandbox", args.sandbox]
            + ["--repeat", str(args.repeat)],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    limit = load_settings().max_output_bytes
    print(
        f"sandbox={args.sandbox} code={FLOOD!r} max_output_bytes={limit} repeat={args.repeat} "
        f"python={sys.version.split()[0]} cpus={os.cpu_count()}\n"
    )
    print("| in-kernel cap | caller peak RSS growth (median / max) | run took | attempt 1 | kept |")
    print("|---|---|---|---|---|")
    for mode, r in rows.items():
        print(
            f"| {mode} | {r['growth_mb']:.1f} / {r['max_growth_mb']:.1f} MB | {r['seconds']:.2f} s "
            f"| {', '.join(r['kinds'])} | {r['kept']:,} chars |"
        )
    ratio = rows["without"]["growth_mb"] / max(rows["with"]["growth_mb"], 0.1)
    print(f"\nwithout / with: {ratio:.0f}x the caller's peak RSS growth")


if __name__ == "__main__":
    main()

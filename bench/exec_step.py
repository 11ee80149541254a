"""The execution step: autocoder's kernel against a plain subprocess per attempt (the original design).

Both run the same snippets side by side in one process, N times each, and the medians and
their ratio are printed. The kernel is started once per run (a pool hides even that in the
server), so its start-up cost is reported on its own line.

    python bench/exec_step.py [--repeat 30] [--sandbox bwrap|none]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autocoder.config import load_settings
from autocoder.kernel.pool import new_kernel

SNIPPETS = {
    "trivial print": "print('hello')",
    "numeric loop": "total = 0\nfor i in range(200_000):\n    total += i * i\nprint(total)",
    "import json, decimal": "import json, decimal\nprint(json.dumps(str(decimal.Decimal('1.1') * 3)))",
}


def run_subprocess(code: str, workdir: str) -> float:
    """What the original AutoCoder did: write the file, run `python file.py`, read stdout."""
    start = time.perf_counter()
    path = os.path.join(workdir, "generated_code.py")
    with open(path, "w") as f:
        f.write(code)
    proc = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--sandbox", default=os.environ.get("AUTOCODER_SANDBOX", "bwrap"))
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="autocoder-bench-")
    settings = load_settings(sandbox=args.sandbox, autofile_dir=Path(work))
    starts = []
    for _ in range(3):
        t = time.perf_counter()
        async with new_kernel(settings):
            starts.append(time.perf_counter() - t)

    print(f"sandbox={args.sandbox} repeat={args.repeat} python={sys.version.split()[0]}")
    print(
        f"kernel start (once per run; pre-started by the server's pool): "
        f"median {statistics.median(starts) * 1000:.0f} ms"
    )
    print(f"{'snippet':<22}{'kernel ms':>11}{'subprocess ms':>15}{'ratio':>9}")
    async with new_kernel(settings) as kernel:
        for name, code in SNIPPETS.items():
            k_times, s_times = [], []
            for _ in range(args.repeat):
                # Interleaved, so both sides see the same machine load.
                t = time.perf_counter()
                result = await kernel.execute(code, timeout=30)
                k_times.append(time.perf_counter() - t)
                assert result.ok, result.error
                await kernel.reset()
                s_times.append(run_subprocess(code, work))
            k, s = statistics.median(k_times), statistics.median(s_times)
            print(f"{name:<22}{k * 1000:>11.1f}{s * 1000:>15.1f}{s / k:>8.1f}x")


if __name__ == "__main__":
    asyncio.run(main())

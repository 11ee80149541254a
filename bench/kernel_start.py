"""Kernel start and the reset between attempts, against their floors, side by side in one run.

Start: a kernel through autocoder's provider (`Kernel`: the launcher, its limits, the
sandbox) against a raw jupyter_client start of plain `ipykernel_launcher` over IPC, which is
the least any Jupyter kernel costs here; and what the launcher's own imports cost against a
bare interpreter, with and without the pydantic-settings it used to import. Reset: what `Kernel.reset()` costs between
attempts against a trivial execute (`pass`), and against IPython's own `reset()`, which it
replaced. Interleaved, so both sides see the same machine load; medians and ratios printed.

    python bench/kernel_start.py [--repeat 20] [--sandbox bwrap|none]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

from autocoder.config import Settings, load_settings
from autocoder.kernel.pool import KernelSource, new_kernel
from autocoder.sandbox import KERNEL_ARGS

IPYTHON_RESET = "get_ipython().reset(new_session=False)"


async def raw_start() -> float:
    """jupyter_client's own start of `python -m ipykernel_launcher`, as kernel.py configures it."""
    runtime = Path(tempfile.mkdtemp(prefix="autocoder-bench-raw-"))
    km = AsyncKernelManager(
        transport="ipc", ip=str(runtime / "k"), connection_file=str(runtime / "kernel.json")
    )
    t = time.perf_counter()
    # The stock python3 kernelspec, with the in-memory history autocoder's kernels have.
    await km.start_kernel(cwd=str(runtime), extra_arguments=KERNEL_ARGS)
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    took = time.perf_counter() - t
    kc.stop_channels()
    await km.shutdown_kernel(now=True)
    shutil.rmtree(runtime, ignore_errors=True)
    return took


async def autocoder_start(settings: Settings) -> float:
    """A kernel as a run gets one: the provider starts a confined Kernel."""
    provider = KernelSource(settings)
    t = time.perf_counter()
    session = await provider.acquire()
    took = time.perf_counter() - t
    await provider.release(session)
    return took


def interpreter(code: str) -> float:
    """A fresh interpreter running `code`, as the kernelspec starts the launcher."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - t


LAUNCHER_IMPORTS = {
    "python -c pass (floor)": "pass",
    "launcher's imports": "import autocoder.sandbox",
    "  + pydantic-settings (before)": "import autocoder.sandbox, autocoder.config",
}


def ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--sandbox", default=os.environ.get("AUTOCODER_SANDBOX", "bwrap"))
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="autocoder-bench-")
    settings = load_settings(sandbox=args.sandbox, autofile_dir=Path(work))
    await autocoder_start(settings)  # the sandbox probe and disk caches, once, untimed
    await raw_start()
    raw, ours = [], []
    for _ in range(args.repeat):
        raw.append(await raw_start())
        ours.append(await autocoder_start(settings))

    print(f"sandbox={args.sandbox} repeat={args.repeat} python={sys.version.split()[0]}")
    print(f"{'kernel start':<34}{'median ms':>10}{'ratio':>8}")
    print(f"{'raw jupyter_client (floor)':<34}{ms(raw):>10.0f}{1:>7.2f}x")
    print(f"{'autocoder KernelSource.acquire()':<34}{ms(ours):>10.0f}{ms(ours) / ms(raw):>7.2f}x")

    imports: dict[str, list[float]] = {name: [] for name in LAUNCHER_IMPORTS}
    for _ in range(args.repeat):
        for name, code in LAUNCHER_IMPORTS.items():
            imports[name].append(interpreter(code))
    floor = ms(imports["python -c pass (floor)"])
    for name, times in imports.items():
        print(f"{name:<34}{ms(times):>10.0f}{ms(times) / floor:>7.2f}x")

    trivial, reset, ipython = [], [], []
    async with new_kernel(settings) as kernel:
        for _ in range(args.repeat):
            t = time.perf_counter()
            result = await kernel.execute("pass", timeout=30)
            trivial.append(time.perf_counter() - t)
            assert result.ok, result.error
            t = time.perf_counter()
            await kernel.reset()
            reset.append(time.perf_counter() - t)
            t = time.perf_counter()
            result = await kernel.execute(IPYTHON_RESET, timeout=30)
            ipython.append(time.perf_counter() - t)
            assert result.ok, result.error
    print(f"{'between attempts':<34}{'median ms':>10}{'ratio':>8}")
    print(f"{'trivial execute (pass)':<34}{ms(trivial):>10.1f}{1:>7.2f}x")
    print(f"{'autocoder reset()':<34}{ms(reset):>10.1f}{ms(reset) / ms(trivial):>7.2f}x")
    print(f"{'IPython reset() (before)':<34}{ms(ipython):>10.1f}{ms(ipython) / ms(trivial):>7.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())

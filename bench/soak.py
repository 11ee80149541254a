"""Soak: many runs, good and hostile mixed, through the engine as the server drives it.

The runs share one `Runner` over a `KernelPool` (the server's pool size) with as many at once
as the server allows (AUTOCODER_MAX_CONCURRENT_RUNS). The scripted model on 127.0.0.1 answers
each run from its prompt: good code that works at once, code that fails once and is then
fixed, or one of the hostile programs of bench/hostile.py followed by `print('ok')`.

    python bench/soak.py [--runs 1000] [--hostile 0.2] [--concurrency N] [--pool-size N]
                         [--sandbox bwrap|none] [--timeout 3] [--seed 0]

It reports runs/s, this process's resident memory (VmRSS) at the start and the end, the
kernels alive at the end (beyond the pool's ready ones there must be none), processes the
hostile programs left, and any run whose notebook is missing or invalid. Exit status 1 when
any of those checks fails. Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import re
import shutil
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from autocoder.config import Settings, load_settings
from autocoder.kernel.pool import KernelPool
from autocoder.records import ErrorKind, RunResult
from autocoder.runner import Runner
from autocoder.testing import ScriptedLLM, fenced
from bench.hostile import (
    CASES,
    HARMLESS,
    HOSTILE,
    REPO,
    Case,
    Target,
    bench_settings,
    listener,
    processes,
    scratch_root,
    was_contacted,
)

# (first reply, reply to a retry, the run's expected output)
GOOD = [
    ("print(sum(range(10)))", HARMLESS, "45\n"),
    ("import math\nprint(math.factorial(20))", HARMLESS, "2432902008176640000\n"),
    (
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\nprint(fib(20))",
        HARMLESS,
        "6765\n",
    ),
    ("import json\nprint(json.dumps({'a': [1, 2, 3]}))", HARMLESS, '{"a": [1, 2, 3]}\n'),
    (
        "with open('out.txt', 'w') as f:\n    f.write('kept')\nprint(open('out.txt').read())",
        HARMLESS,
        "kept\n",
    ),
    ("total = sum(i * i for i in range(100_000))\nprint(total)", HARMLESS, "333328333350000\n"),
    # Fails once, then fixed: an exception, then a syntax error.
    ("print(1 / 0)", "print(1 / 1)", "1.0\n"),
    ("print('unclosed'", "print('closed')", "closed\n"),
]


@dataclass(frozen=True)
class Plan:
    """What the model says in run `index`, and what the run must end with."""

    index: int
    first: str
    retry: str
    expected: str | None  # the run's output; None for hostile runs (then attempt 1's kind)
    case: Case | None = None


def plans(
    runs: int, hostile_share: float, cases: list[Case], target: Target, seed: int
) -> list[Plan]:
    rng = random.Random(seed)
    out: list[Plan] = []
    hostile = 0
    for i in range(runs):
        if cases and rng.random() < hostile_share:
            case = cases[hostile % len(cases)]  # each case in turn
            hostile += 1
            out.append(Plan(i, case.program(target), HARMLESS, None, case))
        else:
            first, retry, expected = GOOD[rng.randrange(len(GOOD))]
            out.append(Plan(i, first, retry, expected))
    return out


def responder(by_index: dict[int, Plan]) -> Any:
    """Answer from the run's prompt ('soak <index>: ...') and how many replies it already had."""

    def reply(body: dict[str, Any]) -> str:
        messages = body.get("messages", [])
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        match = re.match(r"soak (\d+):", prompt)
        plan = by_index[int(match.group(1))] if match else None
        if plan is None:
            return fenced(HARMLESS)
        answered = sum(1 for m in messages if m["role"] == "assistant")
        return fenced(plan.first if answered == 0 else plan.retry)

    return reply


def vm(field: str) -> int:
    """A field of /proc/self/status in MiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    return 0


def threads() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def kernels_alive(root: str) -> int:
    """Kernels started under `root`: distinct connection files among live processes."""
    files = set()
    for _, args in processes():
        if root in args and "ipykernel_launcher" in args:
            parts = args.split()
            if "-f" in parts:
                files.add(parts[parts.index("-f") + 1])
    return len(files)


def notebook_problem(result: RunResult) -> str | None:
    if not result.notebook or not Path(result.notebook).is_file():
        return "no notebook"
    try:
        nbformat.validate(nbformat.read(result.notebook, as_version=4))
    except Exception as e:  # any failure to read or validate is what we are counting
        return f"invalid notebook: {type(e).__name__}: {e}"[:200]
    return None


@dataclass
class Tally:
    """What the runs did, added up as they finish."""

    seconds: list[float] = field(default_factory=list)
    good: int = 0
    good_ok: int = 0
    hostile: int = 0
    first_kinds: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)  # notebooks missing or invalid
    wrong: list[str] = field(default_factory=list)  # runs that did not end as planned
    raised: list[str] = field(default_factory=list)  # autocoder's own failures


@dataclass
class Figures:
    wall: float
    rss_start: int
    rss_end: int
    rss_peak: int
    threads: tuple[int, int]  # at the start and the end, like the two below
    fds: tuple[int, int]
    objects: tuple[int, int]  # objects the garbage collector tracks
    pool_ready: int
    kernels_open: int  # kernels alive after the last run, the pool's ready ones included
    kernels_closed: int  # kernels alive after the pool was closed


async def soak(
    settings: Settings, runs: list[Plan], concurrency: int, root: str, llm: ScriptedLLM
) -> tuple[Tally, Figures]:
    """The runs, `concurrency` at a time, on one Runner over a KernelPool, as the server does."""
    pool = KernelPool(settings)
    runner = Runner(settings, kernels=pool)
    tally = Tally()
    todo: Iterator[Plan] = iter(runs)
    pool.start()
    try:
        deadline = time.monotonic() + 120
        while pool.ready < pool.size and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        rss_start, threads_start, fds_start = vm("VmRSS"), threads(), fds()
        objects_start = len(gc.get_objects())
        start = time.monotonic()

        async def worker() -> None:
            for plan in todo:
                await one(runner, plan, tally)
                llm.requests.clear()  # the scripted model's log is not the server's memory
                done = len(tally.seconds) + len(tally.raised)
                if done % 50 == 0:
                    print(
                        f"  {done} runs, {done / (time.monotonic() - start):.2f} runs/s, "
                        f"RSS {vm('VmRSS')} MiB",
                        file=sys.stderr,
                    )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.monotonic() - start
        rss_end, threads_end, fds_end = vm("VmRSS"), threads(), fds()
        objects_end = len(gc.get_objects())
        # Let the pool finish refilling, so that every kernel it owns is a ready one.
        deadline = time.monotonic() + 60
        while pool.ready < pool.size and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        ready = pool.ready
        kernels_open = await asyncio.to_thread(_settled_kernels, root, ready)
    finally:
        await runner.close()
    kernels_closed = await asyncio.to_thread(_settled_kernels, root, 0)
    figures = Figures(
        wall,
        rss_start,
        rss_end,
        vm("VmHWM"),
        (threads_start, threads_end),
        (fds_start, fds_end),
        (objects_start, objects_end),
        ready,
        kernels_open,
        kernels_closed,
    )
    return tally, figures


def _settled_kernels(root: str, expected: int, wait: float = 15.0) -> int:
    """Kernels alive, given a moment for the last ones shut down to be gone."""
    deadline = time.monotonic() + wait
    while (n := kernels_alive(root)) > expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return n


async def one(runner: Runner, plan: Plan, tally: Tally) -> None:
    label = plan.case.name if plan.case else "good"
    try:
        result = await runner.run(f"soak {plan.index}: {label}", max_attempts=2)
    except Exception as e:  # a failure of autocoder itself: counted, and the soak goes on
        tally.raised.append(f"run {plan.index} ({label}): {type(e).__name__}: {e}"[:300])
        return
    tally.seconds.append(result.duration)
    problem = await asyncio.to_thread(notebook_problem, result)
    if problem:
        tally.lost.append(f"run {plan.index} ({label}): {problem}")
    first = result.attempts[0].error_kind if result.attempts else ErrorKind.LLM
    if plan.case is None:
        tally.good += 1
        if result.status == "success" and result.output == plan.expected:
            tally.good_ok += 1
        else:
            tally.wrong.append(f"run {plan.index}: {result.status} {result.output[:80]!r}")
    else:
        tally.hostile += 1
        tally.first_kinds[f"{label}: {first.value if first else 'success'}"] += 1
        recovered = first is None or result.output == "ok\n"
        if first not in plan.case.kinds or not recovered:
            tally.wrong.append(f"run {plan.index} ({label}): {first} then {result.output[:80]!r}")
    if result.workdir:  # a hostile run may leave a file of max_file_mb; the notebook is the record
        shutil.rmtree(result.workdir, ignore_errors=True)


def main() -> int:
    defaults = load_settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--hostile", type=float, default=0.2, help="share of hostile runs")
    parser.add_argument("--concurrency", type=int, default=defaults.max_concurrent_runs)
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size)
    parser.add_argument("--sandbox", default=os.environ.get("AUTOCODER_SANDBOX", "bwrap"))
    parser.add_argument("--timeout", type=float, default=HOSTILE["timeout"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    root, home = scratch_root("autocoder-soak-")
    llm = ScriptedLLM().start()
    try:
        settings = bench_settings(
            root, llm, sandbox=args.sandbox, timeout=args.timeout, pool_size=args.pool_size
        )
        cases = [c for c in CASES if settings.sandbox == "bwrap" or not c.confined_only]
        with listener() as srv:
            marker = f"hostile-{uuid.uuid4().hex}"
            runs = plans(
                args.runs,
                args.hostile,
                cases,
                Target(srv.getsockname()[1], REPO, home, marker),
                args.seed,
            )
            llm.responder = responder({p.index: p for p in runs})
            tally, figures = asyncio.run(soak(settings, runs, args.concurrency, str(root), llm))
            contacted = was_contacted(srv)
        strays = [args_ for _, args_ in processes() if marker in args_]
    finally:
        llm.stop()
        shutil.rmtree(root, ignore_errors=True)
    return report(args, settings, tally, figures, contacted, strays)


def report(
    args: Any, settings: Settings, tally: Tally, r: Figures, contacted: bool, strays: list[str]
) -> int:
    n = len(tally.seconds)
    q = statistics.quantiles(tally.seconds, n=20) if n >= 2 else [0.0] * 19
    print(
        f"soak: {args.runs} runs ({tally.good} good, {tally.hostile} hostile), "
        f"concurrency {args.concurrency}, pool {settings.pool_size}, sandbox {settings.sandbox}, "
        f"timeout {settings.timeout:g} s, python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    print(
        f"throughput: {n / r.wall:.2f} runs/s ({n} runs in {r.wall:.0f} s; "
        f"run time p50 {statistics.median(tally.seconds):.2f} s, p95 {q[18]:.2f} s)"
    )
    print(f"resident memory: start {r.rss_start} MiB, end {r.rss_end} MiB, peak {r.rss_peak} MiB")
    print(
        f"threads: {r.threads[0]} -> {r.threads[1]}; open fds: {r.fds[0]} -> {r.fds[1]}; "
        f"gc-tracked objects: {r.objects[0]:,} -> {r.objects[1]:,}"
    )
    beyond = r.kernels_open - r.pool_ready
    print(
        f"kernels alive at the end: {r.kernels_open} (the pool's {r.pool_ready} ready ones; "
        f"{beyond} beyond the pool); after closing the pool: {r.kernels_closed}"
    )
    print(f"processes the hostile programs left: {len(strays)}; listener contacted: {contacted}")
    print(f"notebooks missing or invalid: {len(tally.lost)}")
    print(f"good runs with the expected output: {tally.good_ok}/{tally.good}")
    print(f"runs that raised (autocoder's own failures): {len(tally.raised)}")
    if tally.first_kinds:
        print("hostile runs, attempt 1 ended as:")
        for key, count in sorted(tally.first_kinds.items()):
            print(f"  {count:4d}  {key}")
    for line in [*tally.lost, *tally.wrong, *tally.raised, *strays][:30]:
        print(f"  ! {line}")
    failed = (
        tally.lost
        or tally.wrong
        or tally.raised
        or strays
        or contacted
        or beyond > 0
        or r.kernels_closed > 0
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

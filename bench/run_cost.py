"""What one run costs in CPU, whole and by component, beside the original design's, in one run.

1. The whole system: `autocoder serve` (kernels forked from a zygote) and the original design
   (`bench/load.py`'s baseline: stdlib http.server, `python generated_code.py` per attempt) each
   in a cpuacct cgroup of their own, so each one's CPU counts everything it starts (zygote,
   inits, kernels; the `python` subprocesses). The same trivial prompt at concurrency 1, in
   interleaved blocks, so both see the same machine load. CPU-seconds per run, split into the
   server process and the rest. The scripted model runs outside both.
2. By component, in this process (itself in a cpuacct cgroup), through the engine's own code:
   a kernel's start (the server's part, and the zygote's, the init's and the kernel's: fork to
   ready, of which the kernel process's own, ipykernel's initialisation after the fork), the
   execute, the kernel's end, the notebook and record, the index, a jupyter_client manager and
   client made and connected; then a whole `Engine.run` with its pool, and the original
   design's write-file-and-`subprocess.run([python, file])`.

    python bench/run_cost.py [--runs 40] [--block 10] [--repeat 20]

Needs a root server (forked kernels), bubblewrap and a writable cgroup v1 cpuacct hierarchy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import CODE, EXPECTED, PROMPT, free_port, stop, wait_ready  # noqa: E402

CPUACCT = Path("/sys/fs/cgroup/cpuacct")
TICK = os.sysconf("SC_CLK_TCK")


class CpuGroup:
    """A cpuacct cgroup of this bench: every process put in it and all they start count."""

    def __init__(self, name: str) -> None:
        self.path = CPUACCT / f"autocoder-bench-{os.getpid()}-{name}"
        self.path.mkdir(exist_ok=True)

    def join(self) -> None:
        """Put the calling process in it (a preexec_fn of a child, or this process)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def usage(self) -> float:
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def close(self) -> None:
        """Move what is still in it to the root group, then remove it."""
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (CPUACCT / "cgroup.procs").write_text(pid)
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def process_cpu(pid: int) -> float:
    """CPU-seconds of one process, all its threads, ended ones included (clock ticks)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def live_cpu(pid: int) -> float:
    """CPU-seconds of a live process's threads, to the nanosecond (schedstat): for the short
    spans of one kernel, where clock ticks are too coarse. Threads that ended are not in it."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def model_server() -> None:
    """`run_cost.py --model`: the scripted model, answering at once, until stdin closes."""
    from autocoder.testing import Reply, ScriptedLLM, fenced

    llm = ScriptedLLM(responder=lambda body: Reply(fenced(CODE))).start()
    llm.requests = _Forgetful()  # a long bench keeps no history of requests
    print(llm.base_url, flush=True)
    sys.stdin.read()
    llm.stop()


class _Forgetful(list):  # type: ignore[type-arg]
    def append(self, item: Any) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# 1. The whole system


async def whole(args: argparse.Namespace, env: dict[str, str], work: Path) -> dict[str, Any]:
    groups = {"autocoder": CpuGroup("serve"), "baseline": CpuGroup("baseline")}
    log = open(work / "servers.log", "wb")  # noqa: SIM115 (closed in finally)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    try:
        port = free_port()
        procs["autocoder"] = subprocess.Popen(
            [sys.executable, "-m", "autocoder", "serve"],
            env={**env, "AUTOCODER_PORT": str(port), "AUTOCODER_KERNEL_START": "fork"},
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=groups["autocoder"].join,
        )
        urls["autocoder"] = f"http://127.0.0.1:{port}"
        port = free_port()
        procs["baseline"] = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("load.py")),
                "--baseline",
                str(port),
                env["OPENAI_BASE_URL"],
                str(work / "baseline"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=groups["baseline"].join,
        )
        urls["baseline"] = f"http://127.0.0.1:{port}"
        wait_ready(
            f"{urls['autocoder']}/health",
            procs["autocoder"],
            lambda r: r.json()["kernels_ready"] == args.pool_size,
        )
        wait_ready(urls["baseline"], procs["baseline"], lambda r: r.status_code == 501)
        totals = {name: {"runs": 0, "cpu": 0.0, "server": 0.0, "wall": 0.0} for name in urls}
        async with httpx.AsyncClient(timeout=300) as client:
            for url in urls.values():  # warm-up: imports, the zygote, first connections
                for _ in range(3):
                    await _post(client, url)
            for _ in range(max(1, args.runs // args.block)):
                for name, url in urls.items():
                    cpu, server = groups[name].usage(), process_cpu(procs[name].pid)
                    t = time.perf_counter()
                    for _ in range(args.block):
                        await _post(client, url)
                    row = totals[name]
                    row["wall"] += time.perf_counter() - t
                    row["cpu"] += groups[name].usage() - cpu
                    row["server"] += process_cpu(procs[name].pid) - server
                    row["runs"] += args.block
        return totals
    finally:
        for proc in procs.values():
            stop(proc)
        log.close()
        for group in groups.values():
            group.close()


async def _post(client: httpx.AsyncClient, url: str) -> None:
    r = await client.post(f"{url}/run", json={"prompt": PROMPT})
    if r.status_code != 200 or r.json()["output"] != EXPECTED:
        raise SystemExit(f"a run failed at {url}: {r.status_code} {r.text[:300]}")


# ---------------------------------------------------------------------------------------------
# 2. By component, in this process


class Meter:
    """CPU of this process (the server's part) and of all in the cgroup (the rest too)."""

    def __init__(self, group: CpuGroup) -> None:
        self.group = group
        self.rows: dict[str, list[tuple[float, float]]] = {}

    async def measure(self, name: str, step: Callable[[], Awaitable[Any]]) -> Any:
        own, total = time.process_time(), self.group.usage()
        out = await step()
        own = time.process_time() - own
        self.rows.setdefault(name, []).append((own, self.group.usage() - total - own))
        return out

    def add(self, name: str, own: float, rest: float) -> None:
        self.rows.setdefault(name, []).append((own, rest))


def init_and_kernel(kernel: Any) -> tuple[int | None, int | None]:
    """The forked kernel's init, and the kernel: the other process its cgroups hold (a child
    of the zygote's, in the init's namespaces)."""
    from autocoder.kernel import fork as forkserver

    provisioner = getattr(getattr(kernel.km, "manager", None), "provisioner", None)
    init = getattr(provisioner, "pid", None)
    if init is None:
        return None, None
    others = [p for p in forkserver._members(getattr(provisioner, "_cgroups", [])) if p != init]
    return init, (others[0] if others else None)


def descendants(root: int) -> list[int]:
    """`root`'s children, theirs, and so on."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError, ValueError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                children = (task / "children").read_text().split()
                found += [int(c) for c in children]
                todo += [int(c) for c in children]
    return found


async def components(args: argparse.Namespace, llm_url: str, work: Path) -> Meter:
    from autocoder import bundle
    from autocoder.config import load_settings
    from autocoder.engine import open_engine
    from autocoder.kernel import fork as forkserver
    from autocoder.kernel import local
    from autocoder.kernel.pool import new_kernel
    from autocoder.languages import kernels_dir
    from autocoder.notebook import notebook_path, write_notebook, write_record
    from autocoder.runner import new_run_id

    settings = load_settings(
        sandbox="bwrap",
        kernel_start="fork",
        autofile_dir=work / "autofile",
        notebooks_dir=work / "notebooks",
        openai_base_url=llm_url,
        openai_api_key="not-needed",
        llm_retries=0,
        pool_size=1,
    )
    reason = forkserver.why_not(settings)
    if reason is not None:
        sys.exit(f"bench/run_cost.py: kernels cannot be forked here: {reason}")
    group = CpuGroup("components")
    group.join()
    meter = Meter(group)
    try:
        zygote = forkserver.zygote_for(settings)
        await zygote.ready()
        # bwrap's two processes, then the zygote's python, then its nursery, which forks the
        # kernels' inits (the zygote forks the kernels).
        _, zygote_pid, nursery = descendants(zygote.process.pid)
        for i in range(args.repeat + 2):
            kernel = new_kernel(settings)
            before, before_nursery = live_cpu(zygote_pid), live_cpu(nursery)
            await meter.measure("start", kernel.start)
            meter.add(
                "  of which the zygote (forks the kernel)", 0.0, live_cpu(zygote_pid) - before
            )
            meter.add(
                "  of which the nursery (forks the init)", 0.0, live_cpu(nursery) - before_nursery
            )
            init, pid = init_and_kernel(kernel)
            if init is not None:
                meter.add("  of which the init (namespaces, view)", 0.0, live_cpu(init))
            if pid is not None:
                meter.add("  of which the kernel process to ready", 0.0, live_cpu(pid))
            done = await meter.measure("execute", lambda k=kernel: k.execute(CODE, timeout=30))
            assert done.stdout == EXPECTED, done

            async def end(k: Any = kernel) -> None:
                await k.end_processes()
                await k.shutdown()  # its workdir (a disk budget's mount) goes with it

            await meter.measure("end (kill, then teardown)", end)
            if i < 2:  # warm-up: first imports and caches
                meter.rows.clear()

        # jupyter_client's manager and client as a kernel's start makes them, connected.
        for _ in range(args.repeat):
            runtime = Path(tempfile.mkdtemp(dir=work))

            async def manager_and_client(runtime: Path = runtime) -> None:
                km = local._Manager(
                    kernel_spec_manager=local._OwnSpecs(kernel_dirs=[str(kernels_dir())]),
                    kernel_name="python3",
                    transport="ipc",
                    ip=str(runtime / "k"),
                    connection_file=str(runtime / "kernel.json"),
                    context=local._zmq_context(),
                )
                km.write_connection_file()
                kc = km.client(context=km.context)
                kc.start_channels(hb=False)
                kc.stop_channels()
                km.cleanup_connection_file()

            await meter.measure("  of which a manager and client (server)", manager_and_client)
            shutil.rmtree(runtime, ignore_errors=True)

        async with open_engine(settings, pool_size=1) as engine:
            result = await engine.run(PROMPT)  # warm-up, and a result to write again
            for _ in range(args.repeat):
                await meter.measure("Engine.run, whole (pool of 1)", lambda: engine.run(PROMPT))

            def record() -> None:
                result.run_id = new_run_id()
                path = notebook_path(settings.notebooks_dir.resolve(), result.run_id, PROMPT)
                write_notebook(result, path)
                write_record(result, settings.notebooks_dir)
                bundle.write_run_folder(result, path, [], reserve=0)

            def index() -> None:  # the run that record() just wrote
                engine.store.begin(result.run_id, PROMPT, "")
                engine.store.add(result)

            for _ in range(args.repeat):
                await meter.measure("notebook and record", lambda: asyncio.to_thread(record))
                await meter.measure("index (begin, add)", lambda: asyncio.to_thread(index))

        # The original design's attempt: write the file, run it with python.
        code_file = work / "generated_code.py"

        async def original() -> None:
            code_file.write_text(CODE)
            proc = subprocess.run([sys.executable, str(code_file)], capture_output=True, text=True)
            assert proc.stdout == EXPECTED

        for _ in range(args.repeat):
            await meter.measure("original: write, subprocess.run(python)", original)
        return meter
    finally:
        forkserver.close_all()
        group.close()


# ---------------------------------------------------------------------------------------------


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="POST /run per server")
    parser.add_argument("--block", type=int, default=10, help="runs per interleaved block")
    parser.add_argument("--repeat", type=int, default=20, help="runs per component")
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--model", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model:
        model_server()
        return
    if not (CPUACCT / "cgroup.procs").is_file() or not os.access(CPUACCT, os.W_OK):
        sys.exit("bench/run_cost.py needs a writable cgroup v1 cpuacct hierarchy")

    work = Path(tempfile.mkdtemp(prefix="autocoder-cost-"))
    model = subprocess.Popen(
        [sys.executable, __file__, "--model"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert model.stdout is not None
        llm_url = model.stdout.readline().decode().strip()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOCODER_", "OPENAI_"))}
        env.update(
            OPENAI_BASE_URL=llm_url,
            OPENAI_API_KEY="not-needed",
            AUTOCODER_SANDBOX="bwrap",
            AUTOCODER_POOL_SIZE=str(args.pool_size),
            AUTOCODER_NOTEBOOKS_DIR=str(work / "notebooks"),
            AUTOCODER_AUTOFILE_DIR=str(work / "autofile"),
            AUTOCODER_LLM_RETRIES="0",
        )
        totals = await whole(args, env, work)
        meter = await components(args, llm_url, work)
    finally:
        if model.stdin is not None:
            model.stdin.close()
        model.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"CPU per run, trivial prompt, scripted model answering at once (not counted), "
        f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}, cgroup cpuacct"
    )
    print()
    print(
        f"1. POST /run at concurrency 1, {args.runs} runs each, interleaved in blocks of {args.block}"
    )
    print(f"{'':34}{'CPU ms/run':>11}{'server':>9}{'the rest':>10}{'runs/s':>8}")
    for name, row in totals.items():
        n = row["runs"]
        print(
            f"{name:34}{row['cpu'] / n * 1000:>11.1f}{row['server'] / n * 1000:>9.1f}"
            f"{(row['cpu'] - row['server']) / n * 1000:>10.1f}{n / row['wall']:>8.1f}"
        )
    a, b = totals["autocoder"], totals["baseline"]
    print(
        f"autocoder / baseline: CPU per run {a['cpu'] / a['runs'] / (b['cpu'] / b['runs']):.2f}x, "
        f"runs/s {a['runs'] / a['wall'] / (b['runs'] / b['wall']):.2f}x"
    )
    print()
    print(f"2. By component, mean of {args.repeat}, ms of CPU (server: this process; the rest:")
    print("   zygote, init, kernel or subprocess)")
    print(f"{'':44}{'server':>8}{'the rest':>10}{'total':>8}")
    for name, rows in meter.rows.items():
        own = statistics.fmean(r[0] for r in rows) * 1000
        rest = statistics.fmean(r[1] for r in rows) * 1000
        print(f"{name:44}{own:>8.1f}{rest:>10.1f}{own + rest:>8.1f}")


if __name__ == "__main__":
    asyncio.run(main())

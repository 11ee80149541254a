"""What running given code costs an agent: `print(1+1)` through each door, against the floors.

Side by side in one run, at concurrency 1, 4 and 16:
- `python -c` in a subprocess (floor for a fresh process per call);
- a raw jupyter_client execute on a warm, unsandboxed kernel (floor for a kept kernel);
- `run_code` over MCP stdio (`autocoder mcp`, a fresh sandboxed kernel per call);
- `POST /execute` in a fresh sandboxed kernel, and in a session's kernel (one session per
  concurrent client, as a session takes one call at a time).

Each cell is N calls (per concurrent client: N / c), p50 and p99 of their latencies; with
fewer than 100 calls p99 is close to the slowest. The targets run in turn, in two interleaved
rounds, so that drift on a shared machine falls on all of them, each once the kernel pools
have refilled from the one before. Ratios are printed at p50
against the floor each door is meant to approach (the issue's target: within 2x).

    python bench/execute.py [--calls 32] [--concurrency 1,4,16] [--sandbox bwrap|none]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from jupyter_client.manager import AsyncKernelManager
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.types import TextContent

from autocoder import api
from autocoder.config import Settings, load_settings
from autocoder.testing import ScriptedLLM

CODE = "print(1+1)"
WANT = "2\n"
CALL_TIMEOUT = 120.0


class Target:
    name = ""

    async def start(self, clients: int) -> None:
        """Ready for `clients` concurrent callers (kernels warm, sessions open)."""

    async def call(self, client: int) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        """Undo `start`."""


class PythonC(Target):
    name = "python -c subprocess (floor)"

    async def call(self, client: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CODE, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), CALL_TIMEOUT)
        assert out.decode() == WANT, out


class RawKernel(Target):
    name = "raw jupyter_client, warm kernel (floor)"

    def __init__(self) -> None:
        self.managers: list[AsyncKernelManager] = []
        self.clients: list[Any] = []

    async def start(self, clients: int) -> None:
        while len(self.managers) < clients:
            km = AsyncKernelManager(kernel_name="python3")
            await km.start_kernel(stderr=subprocess.DEVNULL)  # its TCP warning
            kc = km.client()
            kc.start_channels()
            await kc.wait_for_ready(timeout=60)
            self.managers.append(km)
            self.clients.append(kc)

    async def call(self, client: int) -> None:
        printed: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                printed.append(msg["content"]["text"])

        reply = await self.clients[client].execute_interactive(
            CODE, output_hook=hook, timeout=CALL_TIMEOUT
        )
        assert reply["content"]["status"] == "ok" and "".join(printed) == WANT, printed

    async def stop(self) -> None:
        for kc, km in zip(self.clients, self.managers, strict=True):
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
        self.clients.clear()
        self.managers.clear()


class McpStdio(Target):
    name = "MCP stdio run_code, fresh kernel"

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self.cwd = env, cwd
        self.stack = contextlib.AsyncExitStack()
        self.client: ClientSession | None = None

    async def start(self, clients: int) -> None:
        if self.client is not None:
            return
        params = StdioServerParameters(
            command=sys.executable, args=["-m", "autocoder", "mcp"], env=self.env, cwd=str(self.cwd)
        )
        errlog = self.stack.enter_context((self.cwd / "mcp-stderr.log").open("w"))  # noqa: SIM115
        read, write = await self.stack.enter_async_context(stdio_client(params, errlog=errlog))
        self.client = await self.stack.enter_async_context(ClientSession(read, write))
        await asyncio.wait_for(self.client.initialize(), CALL_TIMEOUT)
        await self.call(0)  # the first call pays for imports in the server

    async def call(self, client: int) -> None:
        assert self.client is not None
        result = await self.client.call_tool(
            "run_code", {"code": CODE}, read_timeout_seconds=CALL_TIMEOUT
        )
        text = "".join(c.text for c in result.content if isinstance(c, TextContent))
        assert not result.is_error and text == WANT, text

    async def stop(self) -> None:
        self.client = None
        await self.stack.aclose()


class HttpExecute(Target):
    def __init__(self, server: Server, http: httpx.AsyncClient, in_session: bool) -> None:
        self.server, self.http, self.in_session = server, http, in_session
        self.name = "POST /execute, " + ("session's kernel" if in_session else "fresh kernel")
        self.sessions: list[str] = []

    async def start(self, clients: int) -> None:
        while self.in_session and len(self.sessions) < clients:
            r = await self.http.post(f"{self.server.url}/sessions", json={})
            r.raise_for_status()
            self.sessions.append(r.json()["session_id"])
        await self.call(0)

    async def call(self, client: int) -> None:
        body: dict[str, Any] = {"code": CODE}
        if self.in_session:
            body["session_id"] = self.sessions[client]
        r = await self.http.post(f"{self.server.url}/execute", json=body)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["status"] == "success" and answer["output"] == WANT, answer

    async def stop(self) -> None:
        for sid in self.sessions:
            await self.http.delete(f"{self.server.url}/sessions/{sid}")
        self.sessions.clear()


class Server:
    """uvicorn serving the app in a thread, on a port the OS picked."""

    def __init__(self, settings: Settings) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(api.create_app(settings), log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


async def measure(target: Target, clients: int, calls: int) -> list[float]:
    """`calls` calls, `clients` at a time, each client calling in turn; their latencies."""
    await target.start(clients)
    latencies: list[float] = []

    async def client(i: int) -> None:
        for _ in range(max(1, calls // clients)):
            t = time.perf_counter()
            await target.call(i)
            latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies


async def settle(server: Server, http: httpx.AsyncClient, bound: float = 60.0) -> None:
    """Before each target: the server's pool refilled after the last one took its kernels
    (starting kernels in the background would slow whichever target runs next); the MCP
    server's pool refills alongside, in the same time."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        health = (await http.get(f"{server.url}/health")).json()
        if health["kernels_ready"] >= health["pool_size"]:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)


def p50_p99(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]
    return statistics.median(ordered), p99


async def bench(args: argparse.Namespace, root: Path, llm: ScriptedLLM) -> None:
    levels = [int(c) for c in args.concurrency.split(",")]
    settings = load_settings(
        openai_base_url=llm.base_url,
        openai_api_key="unused",
        notebooks_dir=root / "nb",
        autofile_dir=root / "af",
        sandbox=args.sandbox,
        max_concurrent_runs=max(levels),
        max_queued_runs=4 * max(levels),
        max_sessions=max(levels) + 1,
        timeout=60,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOCODER_", "OPENAI_"))} | {
        "OPENAI_BASE_URL": llm.base_url,
        "OPENAI_API_KEY": "unused",
        "AUTOCODER_NOTEBOOKS_DIR": str(root / "mcp-nb"),
        "AUTOCODER_AUTOFILE_DIR": str(root / "mcp-af"),
        "AUTOCODER_SANDBOX": args.sandbox,
        "AUTOCODER_MAX_CONCURRENT_RUNS": str(max(levels)),
        "AUTOCODER_TIMEOUT": "60",
    }
    with Server(settings) as server:
        limits = httpx.Limits(max_connections=2 * max(levels))
        async with httpx.AsyncClient(timeout=CALL_TIMEOUT, limits=limits) as http:
            targets: list[Target] = [
                PythonC(),
                RawKernel(),
                McpStdio(env, root),
                HttpExecute(server, http, in_session=False),
                HttpExecute(server, http, in_session=True),
            ]
            got: dict[tuple[str, int], list[float]] = {}
            try:
                for level in levels:
                    for _ in range(args.rounds):
                        for target in targets:
                            await settle(server, http)
                            lat = await measure(target, level, args.calls // args.rounds)
                            got.setdefault((target.name, level), []).extend(lat)
                    print(f"  c={level} done", file=sys.stderr, flush=True)
            finally:
                for target in targets:
                    await target.stop()
    report(targets, levels, got, args)


def report(
    targets: list[Target],
    levels: list[int],
    got: dict[tuple[str, int], list[float]],
    args: argparse.Namespace,
) -> None:
    n = len(got[(targets[0].name, levels[0])])
    print(f"\n`{CODE}`: latency in ms, p50 / p99 of {n} calls per cell (sandbox {args.sandbox})")
    print(f"{'':42}" + "".join(f"{f'c={c}':>16}" for c in levels))
    stats = {key: p50_p99(lat) for key, lat in got.items()}
    for t in targets:
        cells = "".join(
            f"{f'{stats[(t.name, c)][0] * 1000:.0f} / {stats[(t.name, c)][1] * 1000:.0f}':>16}"
            for c in levels
        )
        print(f"{t.name:42}{cells}")
    names = [t.name for t in targets]
    floor_c, floor_k, mcp, fresh, session = names
    print("\nratios at p50" + "".join(f"{f'c={c}':>10}" for c in levels))
    for label, a, b in (
        ("/execute fresh ÷ python -c (target ≤ 2)", fresh, floor_c),
        ("/execute session ÷ raw warm kernel (≤ 2)", session, floor_k),
        ("MCP stdio run_code ÷ python -c", mcp, floor_c),
        ("MCP stdio run_code ÷ /execute fresh", mcp, fresh),
    ):
        ratios = "".join(f"{stats[(a, c)][0] / stats[(b, c)][0]:>10.2f}" for c in levels)
        print(f"  {label:44}{ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=32, help="calls per cell (default 32)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--sandbox", default=os.environ.get("AUTOCODER_SANDBOX", "bwrap"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="autocoder-bench-execute-"))
    llm = ScriptedLLM().start()
    try:
        asyncio.run(bench(args, root, llm))
    finally:
        llm.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

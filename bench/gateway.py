"""Kernels from a Jupyter Kernel Gateway against local kernels, side by side in one run.

Starts a real Kernel Gateway on 127.0.0.1 as docs/scale.md runs it (autocoder's kernelspec and
provisioner, restart_limit=0, the no-delay websocket), and a second one with jupyter_server's
stock websocket for the round trip. Interleaved, so every side sees the same machine load:

- kernel start: `KernelSource.acquire()` until the kernel answers;
- round trip: `execute("print(1+1)")` on a started kernel;
- interrupt: `while True: pass` interrupted at its deadline, until the kernel is idle again;
- /run: a trivial `POST /run` through a real uvicorn with a ready pool (the scripted model
  answers at once), kernel start not included.

    python bench/gateway.py [--repeat 10] [--sandbox bwrap|none]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from pydantic import SecretStr

from autocoder import api
from autocoder.config import Settings, load_settings
from autocoder.kernel.client import Kernel
from autocoder.kernel.pool import KernelSource
from autocoder.testing import KernelGateway, ScriptedLLM, fenced

LOOP_DEADLINE = 0.5
STOCK_WS = (
    "--KernelGatewayApp.kernel_websocket_connection_class="
    "jupyter_server.services.kernels.connection.channels.ZMQChannelsWebsocketConnection"
)


async def start(settings: Settings) -> tuple[float, Kernel]:
    t = time.perf_counter()
    session = await KernelSource(settings).acquire()
    return time.perf_counter() - t, session


async def round_trips(session: Kernel, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        result = await session.execute("print(1+1)", timeout=30)
        times.append(time.perf_counter() - t)
        assert result.stdout == "2\n", result
    return times


async def interrupt(session: Kernel) -> float:
    result = await session.execute("while True:\n    pass", timeout=LOOP_DEADLINE)
    assert result.error is not None and result.error.ename == "KeyboardInterrupt", result
    assert session.restarts == 0, "the interrupt did not take; the kernel was replaced"
    return result.duration - LOOP_DEADLINE


@contextmanager
def serving(settings: Settings) -> Iterator[httpx.Client]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(api.create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=120) as c:
            yield c
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def timed_run(client: httpx.Client) -> float:
    deadline = time.monotonic() + 60
    while client.get("/health").json()["kernels_ready"] < 1:
        assert time.monotonic() < deadline, "the pool did not refill"
        time.sleep(0.02)
    t = time.perf_counter()
    response = client.post("/run", json={"prompt": "add one and one"})
    took = time.perf_counter() - t
    assert response.json()["status"] == "success", response.text
    return took


def ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def row(name: str, local: list[float], remote: list[float], digits: int = 1) -> None:
    a, b = ms(local), ms(remote)
    print(f"{name:<26}{a:>12.{digits}f}{b:>12.{digits}f}{b / a:>9.2f}x")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--sandbox", default=os.environ.get("AUTOCODER_SANDBOX", "bwrap"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="autocoder-bench-gw-"))
    llm = ScriptedLLM().start()
    llm.responder = lambda body: fenced("print(1 + 1)")
    kernel = "autocoder-sandbox" if args.sandbox == "bwrap" else "autocoder-python"
    gw = KernelGateway(root / "gw").start()
    stock = KernelGateway(root / "stock", extra_args=[STOCK_WS]).start()
    local = load_settings(
        sandbox=args.sandbox,
        openai_base_url=llm.base_url,
        openai_api_key="unused",
        notebooks_dir=root / "nb",
        autofile_dir=root / "af",
        pool_size=1,
        llm_retries=0,
    )

    def through(g: KernelGateway) -> Settings:
        return local.model_copy(
            update={
                "gateway_url": g.url,
                "gateway_token": SecretStr(g.token),
                "gateway_kernel": kernel,
            }
        )

    remote, remote_stock = through(gw), through(stock)
    starts: dict[str, list[float]] = {"local": [], "gateway": []}
    trips: dict[str, list[float]] = {"local": [], "gateway": [], "stock": []}
    stops: dict[str, list[float]] = {"local": [], "gateway": []}
    runs: dict[str, list[float]] = {"local": [], "gateway": []}
    try:
        for i in range(args.repeat + 1):  # the first round warms caches, untimed
            for name, s in (("local", local), ("gateway", remote), ("stock", remote_stock)):
                took, session = await start(s)
                try:
                    rt = await round_trips(session, 20)
                    stop = await interrupt(session) if name != "stock" else 0.0
                finally:
                    await session.shutdown()
                if i:
                    trips[name] += rt
                    if name != "stock":
                        starts[name].append(took)
                        stops[name].append(stop)
        for name, s in (("local", local), ("gateway", remote)):
            with serving(s) as client:
                timed_run(client)
                runs[name] = [timed_run(client) for _ in range(args.repeat)]
        assert gw.kernels() == [] and stock.kernels() == [], "kernels left on a gateway"
    finally:
        gw.stop()
        stock.stop()
        llm.stop()

    print(
        f"sandbox={args.sandbox} repeat={args.repeat} python={sys.version.split()[0]} "
        f"cores={os.cpu_count()}"
    )
    print(f"{'median ms':<26}{'local':>12}{'gateway':>12}{'ratio':>10}")
    row("kernel start", starts["local"], starts["gateway"], 0)
    row("print(1+1) round trip", trips["local"], trips["gateway"], 2)
    row("  stock websocket (Nagle)", trips["local"], trips["stock"], 2)
    row("interrupt an endless loop", stops["local"], stops["gateway"], 1)
    row("POST /run, trivial", runs["local"], runs["gateway"], 0)


if __name__ == "__main__":
    asyncio.run(main())

"""Load on the HTTP door: `autocoder serve` against the original design, side by side, in one run.

Both servers listen on 127.0.0.1, ask the same scripted model (which answers at once) and
get the same trivial prompt from C concurrent httpx clients; the bench prints the p50 and p95
latency of `POST /run` and the runs per second at each concurrency.

- autocoder: `python -m autocoder serve` as shipped: uvicorn, the kernel pool, the sandbox,
  a concurrency limit with a queue, a notebook and an index entry per run.
  Once per `--kernel-start` (forked from a zygote, exec'd), one server at a time.
- baseline: the original AutoCoder's design. A synchronous handler (stdlib http.server, one
  thread, like Flask's dev server without threads) asks the model, writes generated_code.py,
  runs it as a `python` subprocess and retries on failure. No sandbox, no record.

    python bench/load.py [--requests 60] [--max-seconds 30] [--concurrency 1 4 16]
                         [--sandbox bwrap|none] [--pool-size 2] [--llm-delay 0]
                         [--kernel-start fork exec]

Each level sends `--requests` runs (fewer if `--max-seconds` runs out) after two warm-up runs;
at 60, a rare pause of the server (a garbage collection, a disk flush) moves the rate by a
few percent, not by ten.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx

PROMPT = "Print the sum of the numbers from 0 to 9."
CODE = "print(sum(range(10)))"
EXPECTED = "45\n"
STARTUP_TIMEOUT = 60.0


# ---------------------------------------------------------------------------------------------
# The baseline server (runs in its own process: `load.py --baseline PORT LLM_URL DIR`)


def baseline_server(
    port: int, llm_url: str, workdir: Path, max_attempts: int = 5, timeout: float = 10
) -> None:
    """The original design: one request at a time, a `python` subprocess per attempt."""
    workdir.mkdir(parents=True, exist_ok=True)

    def ask(messages: list[dict[str, str]]) -> str:
        request = urllib.request.Request(
            f"{llm_url}/chat/completions",
            data=json.dumps({"model": "scripted-model", "messages": messages}).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer x"},
        )
        with urllib.request.urlopen(request, timeout=120) as reply:
            return json.load(reply)["choices"][0]["message"]["content"]  # type: ignore[no-any-return]

    def solve(prompt: str) -> dict[str, str]:
        messages = [{"role": "user", "content": prompt}]
        result = {"status": "error", "filename": "", "code": "", "output": "", "error": ""}
        for _ in range(max_attempts):
            reply = ask(messages)
            match = re.search(r"```(?:python)?\n(.*?)```", reply, re.DOTALL)
            code = match.group(1) if match else reply
            path = workdir / "generated_code.py"
            path.write_text(code)
            try:
                proc = subprocess.run(
                    [sys.executable, str(path)], capture_output=True, text=True, timeout=timeout
                )
                ok, output, error = proc.returncode == 0, proc.stdout, proc.stderr
            except subprocess.TimeoutExpired:
                ok, output, error = False, "", f"timed out after {timeout} s"
            result = {
                "status": "success" if ok else "error",
                "filename": str(path),
                "code": code,
                "output": output,
                "error": "" if ok else error,
            }
            if ok:
                break
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": f"Fix this error:\n{error}"},
            ]
        return result

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            return None

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            data = json.dumps(solve(body["prompt"])).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    class Server(HTTPServer):
        request_queue_size = 128  # so the backlog, not the handler, is never what is measured

    Server(("127.0.0.1", port), Handler).serve_forever()


# ---------------------------------------------------------------------------------------------
# The load


@dataclass
class Level:
    concurrency: int
    latencies: list[float]
    wall: float
    failures: int

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


async def load(url: str, concurrency: int, requests: int, max_seconds: float) -> Level:
    latencies: list[float] = []
    failures = 0
    issued = 0
    start = time.perf_counter()
    deadline = start + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued, failures
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            t = time.perf_counter()
            try:
                r = await client.post("/run", json={"prompt": PROMPT})
                ok = r.status_code == 200 and r.json()["output"] == EXPECTED
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t)
            else:
                failures += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return Level(concurrency, latencies, time.perf_counter() - start, failures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], ready: Any) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server at {url} exited with {proc.returncode}")
        try:
            if ready(httpx.get(url, timeout=2)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the server at {url} did not get ready")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def measure(name: str, url: str, args: argparse.Namespace) -> list[Level]:
    await load(url, 1, 2, STARTUP_TIMEOUT)  # warm-up: imports, first connections
    levels = []
    for c in args.concurrency:
        level = await load(url, c, max(args.requests, c), args.max_seconds)
        print(
            f"  {name:9} c={c:<3} {len(level.latencies)} ok, {level.failures} failed, "
            f"{level.wall:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        levels.append(level)
    return levels


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60, help="runs per concurrency level")
    parser.add_argument("--max-seconds", type=float, default=30, help="time cap per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--sandbox", default=os.environ.get("AUTOCODER_SANDBOX", "bwrap"))
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument(
        "--kernel-start",
        choices=["fork", "exec"],
        nargs="+",
        default=["fork", "exec"],
        help="how autocoder serve starts its kernels (each is measured)",
    )
    parser.add_argument(
        "--llm-delay", type=float, default=0.0, help="seconds the model takes per answer"
    )
    parser.add_argument("--baseline", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        baseline_server(int(args.baseline[0]), args.baseline[1], Path(args.baseline[2]))
        return

    from autocoder.testing import Reply, ScriptedLLM, fenced

    llm = ScriptedLLM(responder=lambda body: Reply(fenced(CODE), delay=args.llm_delay)).start()
    work = Path(tempfile.mkdtemp(prefix="autocoder-load-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOCODER_", "OPENAI_"))}
    env.update(
        OPENAI_BASE_URL=llm.base_url,
        OPENAI_API_KEY="not-needed",
        AUTOCODER_SANDBOX=args.sandbox,
        AUTOCODER_POOL_SIZE=str(args.pool_size),
        AUTOCODER_NOTEBOOKS_DIR=str(work / "notebooks"),
        AUTOCODER_AUTOFILE_DIR=str(work / "autofile"),
        AUTOCODER_LLM_RETRIES="0",
    )
    ours: dict[str, list[Level]] = {}
    with open(work / "autocoder.log", "wb") as log:
        base_port = free_port()
        baseline = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--baseline",
                str(base_port),
                llm.base_url,
                str(work / "baseline"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base_url = f"http://127.0.0.1:{base_port}"
        try:
            wait_ready(base_url, baseline, lambda r: r.status_code == 501)
            for start in args.kernel_start:
                ours[start], health = await measure_autocoder(start, env, log, args)
            theirs = await measure("baseline", base_url, args)
        finally:
            stop(baseline)
            llm.stop()
    answering = f"after {args.llm_delay:g} s" if args.llm_delay else "at once"
    print(
        f"POST /run, trivial prompt, scripted model answering {answering}, 127.0.0.1, "
        f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}"
    )
    print(
        f"autocoder: autocoder serve, sandbox={args.sandbox}, pool={health['pool_size']}, "
        f"max_concurrent_runs={health['max_concurrent_runs']}, a fresh kernel per run; "
        "kernels forked from a zygote (fork) or exec'd (exec)"
    )
    print("baseline:  stdlib http.server, one thread, `python generated_code.py` per attempt")
    print()
    names = [*ours, "baseline"]
    print(f"{'':13}" + "".join(f"{n:^28}" for n in names) + "  runs/s, p50 against baseline")
    print(
        f"{'concurrency':>11}  "
        + f"{'p50 ms':>8}{'p95 ms':>9}{'runs/s':>9}   " * len(names)
        + "".join(f"{n:>16}" for n in ours)
    )
    for i, b in enumerate(theirs):
        row = [levels[i] for levels in ours.values()] + [b]
        cells = "".join(f"{lv.pct(0.5):>8.0f}{lv.pct(0.95):>9.0f}{lv.rate:>9.2f}   " for lv in row)
        ratios = "".join(
            f"{a.rate / b.rate if b.rate else float('nan'):>7.2f}x {_p50_ratio(a, b):>6.2f}x"
            for a in row[:-1]
        )
        print(f"{b.concurrency:>11}  {cells}{ratios}")
    failed = sum(lv.failures for levels in [*ours.values(), theirs] for lv in levels)
    if failed:
        print(f"\n{failed} request(s) failed; see {work / 'autocoder.log'}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def _p50_ratio(a: Level, b: Level) -> float:
    return a.pct(0.5) / b.pct(0.5) if b.latencies else float("nan")


async def measure_autocoder(
    start: str, env: dict[str, str], log: Any, args: argparse.Namespace
) -> tuple[list[Level], dict[str, Any]]:
    """One `autocoder serve` with kernels started by `start`, measured, then stopped."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "autocoder", "serve"],
        env={**env, "AUTOCODER_PORT": str(port), "AUTOCODER_KERNEL_START": start},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/health", server, lambda r: r.json()["kernels_ready"] == args.pool_size)
        health = httpx.get(f"{url}/health").json()
        return await measure(f"ac {start}", url, args), health
    finally:
        stop(server)


if __name__ == "__main__":
    asyncio.run(main())

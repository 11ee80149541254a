"""The embedded model's K candidates: generated together by autocoder's server against one after
another, and against llama-cpp-python's server (what served the embedded model before).

On the same GGUF, four ~150-token completions of one prompt (autocoder's system prompt and a task;
temperature 0.4, seeds 1..4) are asked three ways, side by side in one run:
- llama_cpp.server (as `server_args` started it before), one request after another (it answers one
  at a time and drops `n`);
- autocoder.local_server, one request after another;
- autocoder.local_server, all four at once.
Prints wall time, aggregate generated tokens per second and the ratios. `--runs` K = 1 against
K = 5 `autocoder run`s of one prompt on autocoder's server, too. `--threads` instead compares the
server's thread choice (`local_server.ThreadChoice`) with the one thread it generated on before:
five completions at once, on an idle machine and beside one busy process, alternated.

    python bench/batching.py [--repeat 2] [--runs 0] [--ks 2,3,5]
    python bench/batching.py --threads [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from autocoder import local_model
from autocoder.config import Settings
from autocoder.keepalive import keeper_pids
from autocoder.prompts import system_prompt_for

TASK = (
    "Read sales.csv (columns: date, region, product, units, price) and print the total revenue "
    "(units * price) per region, largest first, as a small table."
)
SEEDS = (1, 2, 3, 4)
MAX_TOKENS = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def old_server_args(settings: Settings, model: Path, name: str, port: int) -> list[str]:
    """`server_args` as it was before autocoder's own server."""
    cpus = len(os.sched_getaffinity(0))
    decode_threads, batch_threads = max(1, cpus // 2), cpus
    flags = {
        "model": str(model),
        "model_alias": name,
        "host": "127.0.0.1",
        "port": str(port),
        "n_ctx": str(settings.local_n_ctx),
        "n_batch": "256",
        "n_ubatch": "256",
        "n_threads": str(decode_threads),
        "n_threads_batch": str(batch_threads),
        "logits_all": "false",
        "flash_attn": "true",
        "use_mlock": "false",
        "use_mmap": "true",
        "cache": "false",
        "interrupt_requests": "false",
    }
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        *(x for k, v in flags.items() for x in (f"--{k}", v)),
    ]


class Served:
    """A server process on 127.0.0.1, up once it lists its model; stopped on exit."""

    def __init__(self, argv: list[str], port: int, name: str) -> None:
        self.argv, self.url, self.name = argv, f"http://127.0.0.1:{port}/v1", name

    def __enter__(self) -> Served:
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=local_model.child_env(),
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise SystemExit(f"the server did not start: {' '.join(self.argv)}")
            time.sleep(0.2)

    def __exit__(self, *_: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


async def four(
    server: Served, messages: list[dict[str, str]], together: bool, seeds: tuple[int, ...] = SEEDS
) -> tuple[float, int]:
    """(seconds, tokens generated) for the completions, one per seed."""
    client = openai.AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=900)

    async def one(seed: int, max_tokens: int = MAX_TOKENS) -> int:
        reply = await client.chat.completions.create(
            model=server.name,
            messages=messages,  # type: ignore[arg-type]
            temperature=0.4,
            max_tokens=max_tokens,
            seed=seed,
        )
        return reply.usage.completion_tokens if reply.usage else 0

    await one(0, 1)  # both servers have read the weights and the prompt once before timing
    start = time.perf_counter()
    if together:
        tokens = sum(await asyncio.gather(*(one(s) for s in seeds)))
    else:
        tokens = 0
        for s in seeds:
            tokens += await one(s)
    took = time.perf_counter() - start
    await client.close()
    return took, tokens


def autocoder_runs(settings: Settings, k: int, repeat: int) -> list[float]:
    """Seconds of `autocoder run` with K candidates, on a kept-warm server (its start excluded)."""
    env = {k_: v for k_, v in os.environ.items() if not k_.startswith(("OPENAI_", "AUTOCODER_"))}
    home = tempfile.mkdtemp(prefix="bench-batching-")
    env.update(
        AUTOCODER_HOME=home,
        AUTOCODER_MODEL_PATH=str(local_model.ensure_model_file(settings)),
        AUTOCODER_CANDIDATES=str(k),
        AUTOCODER_MODEL_KEEP_ALIVE="20",
    )
    cmd = [sys.executable, "-m", "autocoder", "run", "--json", "-q", "print the first 10 primes"]
    times = []
    for i in range(repeat + 1):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=home, capture_output=True, timeout=900)
        if i:  # the first run starts the server
            times.append(time.perf_counter() - start)
    deadline = time.monotonic() + 120
    while keeper_pids(Path(home)) and time.monotonic() < deadline:
        time.sleep(1)  # the kept server ends after its idle time
    return times


def one_thread_args(settings: Settings, model: Path, name: str, port: int) -> list[str]:
    """autocoder's server generating on one thread, as it did before it chose per step."""
    fixed = settings.model_copy(update={"local_threads": 1})
    return local_model.server_args(fixed, model, name, port)


def compare_threads(settings: Settings, messages: list[dict[str, str]], repeat: int) -> None:
    model = local_model.ensure_model_file(settings)
    name = local_model.model_name(settings)
    seeds = (1, 2, 3, 4, 5)
    arms = {"one thread": one_thread_args, "chosen per step": local_model.server_args}
    print(f"{name}, 5 completions of <= {MAX_TOKENS} tokens at once, seeds 1..5")
    for busy in (False, True):
        took: dict[str, list[float]] = {label: [] for label in arms}
        for _ in range(repeat):
            for label, args in arms.items():
                port = free_port()
                with Served(args(settings, model, name, port), port, name) as server:
                    hog = (
                        subprocess.Popen([sys.executable, "-c", "while True: pass"])
                        if busy
                        else None
                    )
                    try:
                        took[label].append(asyncio.run(four(server, messages, True, seeds))[0])
                    finally:
                        if hog is not None:
                            hog.kill()
                            hog.wait()
        one, chosen = (statistics.median(took[label]) for label in arms)
        print(
            f"  {'beside a busy process' if busy else 'idle machine':22s} one thread {one:5.1f} s, "
            f"chosen per step {chosen:5.1f} s ({one / chosen:4.2f}x), load {os.getloadavg()[0]:.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--runs", type=int, default=0, help="autocoder runs per K (0: none)")
    parser.add_argument(
        "--ks",
        default="",
        help="also, on autocoder's server, K completions one after another against at once, "
        "for each K of this list (2,3: the rounds in which a run draws its candidates)",
    )
    parser.add_argument(
        "--threads", action="store_true", help="compare the thread choice with one thread"
    )
    args = parser.parse_args()
    settings = Settings(model_path=None)
    model = local_model.ensure_model_file(settings)
    name = local_model.model_name(settings)
    messages = [
        {"role": "system", "content": system_prompt_for(settings)},
        {"role": "user", "content": TASK},
    ]
    if args.threads:
        compare_threads(settings, messages, args.repeat)
        return
    print(f"{name}, 4 completions of <= {MAX_TOKENS} tokens, temperature 0.4, seeds 1..4")
    results: dict[str, list[tuple[float, int]]] = {}
    for _ in range(args.repeat):
        port = free_port()
        with Served(old_server_args(settings, model, name, port), port, name) as old:
            results.setdefault("llama_cpp.server, one after another", []).append(
                asyncio.run(four(old, messages, together=False))
            )
        port = free_port()
        with Served(local_model.server_args(settings, model, name, port), port, name) as new:
            results.setdefault("autocoder.local_server, one after another", []).append(
                asyncio.run(four(new, messages, together=False))
            )
            results.setdefault("autocoder.local_server, all four at once", []).append(
                asyncio.run(four(new, messages, together=True))
            )
            for k in [int(x) for x in args.ks.split(",") if x]:
                seeds = tuple(range(1, k + 1))
                results.setdefault(f"K={k} apart", []).append(
                    asyncio.run(four(new, messages, together=False, seeds=seeds))
                )
                results.setdefault(f"K={k} at once", []).append(
                    asyncio.run(four(new, messages, together=True, seeds=seeds))
                )
    base = statistics.median(t for t, _ in results["llama_cpp.server, one after another"])
    for label, runs in results.items():
        took = statistics.median(t for t, _ in runs)
        rate = statistics.median(n / t for t, n in runs)
        if label.startswith("K="):
            continue
        print(f"  {label:44s} {took:6.1f} s  {rate:5.1f} tok/s  {base / took:4.2f}x")
    for k in [int(x) for x in args.ks.split(",") if x]:
        apart = statistics.median(t for t, _ in results[f"K={k} apart"])
        at_once = statistics.median(t for t, _ in results[f"K={k} at once"])
        print(
            f"  autocoder.local_server, K={k}: {apart:5.1f} s one after another, "
            f"{at_once:5.1f} s at once ({apart / at_once:4.2f}x)"
        )
    if args.runs:
        one, five = autocoder_runs(settings, 1, args.runs), autocoder_runs(settings, 5, args.runs)
        p1, p5 = statistics.median(one), statistics.median(five)
        print(
            f"autocoder run, warm server: K=1 p50 {p1:.1f} s, K=5 p50 {p5:.1f} s ({p5 / p1:.2f}x)"
        )


if __name__ == "__main__":
    main()

"""What output floods cost the calling process: an in-process Runner, and `autocoder serve`.

The generated code is `print('x' * 10**8)`, run through the whole engine (the scripted model on
127.0.0.1, a real kernel), side by side in one run:
- a Runner in a fresh process, with and without the kernel's own cap: a warm-up run first,
  then the peak RSS is reset (/proc/self/clear_refs) and the flood runs; the growth is the new
  peak minus the RSS before it. "without" starts kernels whose launcher is not given the limit
  (AUTOCODER_MAX_OUTPUT_BYTES), so only the server cuts, as before the in-kernel cap;
- a live `autocoder serve` subprocess: after warm-up runs, `--floods` floods through
  `POST /run`, one after the other; its RSS (VmRSS of the server process: kernels are other
  processes) after each, against the RSS before the first, and its peak (VmHWM) meanwhile.
  The growth after the last flood is where it plateaus: what floods cost the server to keep.

    python bench/flood.py [--sandbox bwrap|none] [--repeat 3] [--floods 6]

docs/security.md quotes its tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from autocoder import sandbox
from autocoder.config import load_settings
from autocoder.inside import output_cap
from autocoder.runner import Runner
from autocoder.testing import ScriptedLLM, fenced

FLOOD = "print('x' * 10**8)"


def status_kb(field: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def through_server(sandbox_mode: str, floods: int) -> dict[str, Any]:
    """`floods` floods through a live `autocoder serve`: its RSS after each, in MB above the
    RSS after the warm-up, its peak, and what the last answer kept and said."""
    llm = ScriptedLLM(
        responder=lambda body: fenced(FLOOD if "flood" in str(body["messages"]) else "print(1)")
    ).start()
    root = Path(tempfile.mkdtemp(prefix="autocoder-flood-serve-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOCODER_", "OPENAI_"))}
    env.update(
        OPENAI_BASE_URL=llm.base_url,
        OPENAI_API_KEY="sk-bench",
        AUTOCODER_SANDBOX=sandbox_mode,
        AUTOCODER_PORT=str(port),
        AUTOCODER_MAX_ATTEMPTS="1",
        AUTOCODER_TIMEOUT="30",
        AUTOCODER_LLM_RETRIES="0",
        AUTOCODER_HOME=str(root / "home"),
        AUTOCODER_NOTEBOOKS_DIR=str(root / "notebooks"),
        AUTOCODER_AUTOFILE_DIR=str(root / "autofile"),
    )
    url = f"http://127.0.0.1:{port}"
    with open(root / "serve.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "autocoder", "serve"], env=env, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"autocoder serve did not start: {(root / 'serve.log').read_text()}"
                )
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=300) as http:
            for _ in range(3):  # warm-up: imports, first kernels, first notebooks
                http.post("/run", json={"prompt": "print one"}).raise_for_status()
            time.sleep(1)
            before = status_kb("VmRSS", server.pid)
            after: list[float] = []
            last: dict[str, Any] = {}
            for _ in range(floods):
                last = http.post("/run", json={"prompt": "flood"}).json()
                time.sleep(0.5)  # the kernel's teardown, after the answer
                after.append((status_kb("VmRSS", server.pid) - before) / 1024)
            peak = (status_kb("VmHWM", server.pid) - before) / 1024
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        llm.stop()
        shutil.rmtree(root, ignore_errors=True)
    attempt = (last.get("attempts") or [{}])[0]
    return {
        "after": after,
        "peak": peak,
        "kept": len(last.get("output", "")),
        "kind": attempt.get("error_kind") or last.get("status"),
        "notice": "bytes of output cut" in last.get("output", ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sandbox", default=os.environ.get("AUTOCODER_SANDBOX", "bwrap"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--floods", type=int, default=6, help="floods through autocoder serve")
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
    # The max: glibc may keep the first flood's memory, which the next ones then reuse.
    ratio = rows["without"]["max_growth_mb"] / max(rows["with"]["max_growth_mb"], 0.1)
    print(f"\nwithout / with: {ratio:.0f}x the caller's peak RSS growth (max)")

    served = through_server(args.sandbox, args.floods)
    print(
        f"\nautocoder serve, {args.floods} floods through POST /run, one after the other "
        f"(load {os.getloadavg()[0]:.2f}):\n"
    )
    print("| server RSS above warm-up, after each flood | peak meanwhile | last answer |")
    print("|---|---|---|")
    steps = " → ".join(f"{mb:+.0f}" for mb in served["after"])
    notice = "with the notice" if served["notice"] else "NO notice"
    print(
        f"| {steps} MB | {served['peak']:+.0f} MB | {served['kind']}, "
        f"{served['kept']:,} chars, {notice} |"
    )


if __name__ == "__main__":
    main()

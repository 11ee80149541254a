"""What a session saves and what it costs: a follow-up prompt in a session that holds its data
against the same task as a one-shot `/run` (which starts from a fresh kernel and reads the
file again), and the memory an idle session keeps.

Both run against a real uvicorn, real kernels and the scripted model on 127.0.0.1; the
latencies are interleaved and their medians printed side by side with the ratio.

    python bench/sessions.py [--repeat 10] [--mb 10] [--sessions 4] [--sandbox bwrap|none]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from autocoder import api
from autocoder.config import load_settings
from autocoder.testing import ScriptedLLM, fenced

LOAD = "import pandas as pd\ndf = pd.read_csv('sales.csv')\nprint(len(df), 'rows')"
TOTAL = "print('total', round(float(df['revenue'].sum()), 2))"


def csv_of(mb: int) -> bytes:
    row = b"2024-01-01,store-042,widget,17,123.45\n"
    return b"day,store,item,qty,revenue\n" + row * (mb * 1024 * 1024 // len(row))


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                todo.append(child)
    return found


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages (Python, pandas) counted once across processes."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def kernels_pss() -> int:
    return sum(pss_kib(p) for p in descendants(os.getpid()))


class Server:
    def __init__(self, settings: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(api.create_app(settings), log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--mb", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument(
        "--hold", type=int, default=8, help="AUTOCODER_MAX_SESSIONS for the capacity part"
    )
    parser.add_argument("--sandbox", default=os.environ.get("AUTOCODER_SANDBOX", "bwrap"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="autocoder-bench-sessions-"))
    llm = ScriptedLLM().start()
    # A prompt that names the total gets the follow-up's code; the one-shot asks for both.
    llm.responder = lambda body: fenced(
        TOTAL
        if "df: pandas" in body["messages"][-1]["content"]
        else LOAD + "\n" + TOTAL
        if "total" in body["messages"][-1]["content"]
        else LOAD
    )
    settings = load_settings(
        openai_base_url=llm.base_url,
        openai_api_key="unused",
        notebooks_dir=root / "nb",
        autofile_dir=root / "af",
        sandbox=args.sandbox,
        pool_size=2,
        max_upload_mb=args.mb + 1,
        max_sessions=max(args.hold, args.sessions + 1),
        llm_retries=0,
        timeout=60,
    )
    data = csv_of(args.mb)
    upload = [("files", ("sales.csv", data, "text/csv"))]
    print(f"sandbox={args.sandbox} repeat={args.repeat} csv={args.mb} MB")
    one_shot: list[float] = []
    follow_up: list[float] = []
    try:
        with Server(settings) as server, httpx.Client(base_url=server.url, timeout=300) as c:
            sid = c.post("/sessions", files=upload).json()["session_id"]
            assert c.post(f"/sessions/{sid}/run", json={"prompt": "load"}).json()["status"] == (
                "success"
            )
            c.post("/run", data={"prompt": "warm up"}, files=upload)
            for _ in range(args.repeat):
                t = time.perf_counter()
                r = c.post("/run", data={"prompt": "print the total"}, files=upload)
                one_shot.append(time.perf_counter() - t)
                assert r.json()["status"] == "success", r.text
                t = time.perf_counter()
                r = c.post(f"/sessions/{sid}/run", json={"prompt": "print the total"})
                follow_up.append(time.perf_counter() - t)
                assert r.json()["status"] == "success" and len(r.json()["attempts"]) == 1, r.text
            c.delete(f"/sessions/{sid}")
            a, b = statistics.median(one_shot), statistics.median(follow_up)
            print(f"one-shot /run p50 (fresh kernel, reads the CSV):   {a * 1000:7.0f} ms")
            print(f"session follow-up p50 (df in memory):             {b * 1000:7.0f} ms")
            print(f"ratio one-shot/follow-up:                         {a / b:7.2f}x")

            time.sleep(2)  # the pool has refilled
            base = kernels_pss()
            opened = [
                c.post("/sessions", files=upload).json()["session_id"] for _ in range(args.sessions)
            ]
            time.sleep(1)
            empty = kernels_pss()
            for sid in opened:
                c.post(f"/sessions/{sid}/run", json={"prompt": "load"})
            time.sleep(1)
            held = kernels_pss()
            n = args.sessions
            print(f"kernels' PSS before the sessions (the pool):       {base / 1024:7.0f} MiB")
            print(
                f"per idle session, nothing loaded:                 {(empty - base) / n / 1024:7.0f} MiB"
            )
            print(
                f"per idle session, {args.mb} MB CSV loaded as df:        {(held - base) / n / 1024:7.0f} MiB"
            )
            print(
                f"each session's kernel is capped at AUTOCODER_MEMORY_MB = {settings.memory_mb} MiB"
            )

            # Capacity: fill AUTOCODER_MAX_SESSIONS with sessions holding df, then one more.
            while True:
                r = c.post("/sessions", files=upload)
                if r.status_code != 201:
                    break
                opened.append(r.json()["session_id"])
                c.post(f"/sessions/{opened[-1]}/run", json={"prompt": "load"})
            times = []
            for sid in opened:
                t = time.perf_counter()
                ok = c.post(f"/sessions/{sid}/run", json={"prompt": "print the total"})
                times.append(time.perf_counter() - t)
                assert ok.json()["status"] == "success", ok.text
            total = kernels_pss()
            print(
                f"sessions held (AUTOCODER_MAX_SESSIONS={settings.max_sessions}), each with df: "
                f"{len(opened)}; the next one: HTTP {r.status_code}, "
                f"Retry-After {r.headers.get('retry-after')} s"
            )
            print(
                f"follow-up p50 with all of them held:              {statistics.median(times) * 1000:7.0f} ms"
            )
            print(
                f"kernels' PSS with all held:                       {total / 1024:7.0f} MiB "
                f"of {mem_total_mib()} MiB on this machine ({os.cpu_count()} CPUs)"
            )
    finally:
        llm.stop()


if __name__ == "__main__":
    main()

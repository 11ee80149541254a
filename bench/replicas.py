"""Several replicas on one PostgreSQL, and list pages at 10,000 runs, side by side in one run.

Part 1, runs: `autocoder serve` processes ask the same scripted model (which answers at once)
and get `--runs` trivial runs from `--concurrency` clients spread over the replicas:
one replica on SQLite (the default), one on PostgreSQL, two on one PostgreSQL. It prints
runs/s, checks that every run is listed once by every replica (the point: correctness under
concurrency), and the CPU seconds per run of the API processes alone (their kernels are
other processes): with kernels on a gateway elsewhere, that is what one API core pays.

Part 2, list pages: 10,000 runs in each store, then list pages as the store answers them
(`store.list()`), unfiltered and filtered by status, by a prompt word, and both: SQLite with
the covering indexes, SQLite without them (the schema before), PostgreSQL; then the same
pages through `GET /runs` of the app (in this process, one keep-alive client) on SQLite and
on PostgreSQL, and on PostgreSQL with Nagle left on (as `autocoder serve` was before).

    python bench/replicas.py [--runs 40] [--concurrency 8] [--history 10000] [--seconds 2]

Needs psycopg and PostgreSQL's server binaries (a throwaway cluster is started in /tmp).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from autocoder.config import load_settings
from autocoder.notebook import write_record
from autocoder.records import Attempt, ErrorKind, RunResult
from autocoder.store.postgres import PostgresStore
from autocoder.store.sqlite import SqliteStore
from autocoder.testing import PostgresCluster, ScriptedLLM, fenced

CODE = "print(sum(range(10)))"
SECRET = "sk-bench"


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, its children not included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Replica:
    def __init__(self, home: Path, llm: ScriptedLLM, db_url: str | None, sandbox: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOCODER_", "OPENAI_"))}
        env.update(
            OPENAI_BASE_URL=llm.base_url,
            OPENAI_API_KEY=SECRET,
            AUTOCODER_SANDBOX=sandbox,
            AUTOCODER_NOTEBOOKS_DIR=str(home / "notebooks"),
            AUTOCODER_AUTOFILE_DIR=str(home / "autofile"),
            AUTOCODER_MAX_QUEUED_RUNS="256",
        )
        if db_url:
            env["AUTOCODER_DATABASE_URL"] = db_url
        self.log = open(home / "serve.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "autocoder", "serve", "--port", str(self.port)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"a replica exited: {(home / 'serve.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("a replica did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


async def drive(replicas: list[Replica], runs: int, concurrency: int) -> tuple[float, list[str]]:
    """`runs` POST /run spread round-robin, `concurrency` at a time; seconds and run ids."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(runs):
        queue.put_nowait(i)
    ids: list[str] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            r = await http.post(
                f"{replicas[i % len(replicas)].url}/run", json={"prompt": f"sum {i}"}
            )
            body = r.json()
            assert r.status_code == 200 and body["output"] == "45\n", body
            ids.append(body["run_id"])

    async with httpx.AsyncClient(timeout=300) as http:
        start = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return time.monotonic() - start, ids


def check_listed(replicas: list[Replica], ids: list[str]) -> str:
    """Every run listed exactly once by every replica."""
    for r in replicas:
        listed: list[str] = []
        offset = 0
        while True:
            page = httpx.get(f"{r.url}/runs", params={"limit": 100, "offset": offset}).json()
            listed += [x["run_id"] for x in page["runs"]]
            offset += 100
            if offset >= page["total"]:
                break
        if len(listed) != len(set(listed)) or set(listed) != set(ids):
            return f"MISMATCH on {r.url}: {len(listed)} listed, {len(set(ids))} posted"
    return f"all {len(ids)} listed once on each"


def part_runs(args: argparse.Namespace, cluster: PostgresCluster, root: Path) -> None:
    llm = ScriptedLLM().start()
    llm.responder = lambda body: fenced(CODE)
    sandbox = args.sandbox
    print(f"runs: {args.runs} runs, {args.concurrency} clients, sandbox={sandbox}")
    print(f"{'setup':<26}{'runs/s':>8}{'API CPU-s/run':>15}  check")
    try:
        for label, count, db in (
            ("1 replica, SQLite", 1, None),
            ("1 replica, PostgreSQL", 1, cluster.database()),
            ("2 replicas, PostgreSQL", 2, cluster.database()),
        ):
            reps = [
                Replica(root / f"{label.replace(' ', '_')}-{i}", llm, db, sandbox)
                for i in range(count)
            ]
            try:
                warm = asyncio.run(drive(reps, 2 * count, 2 * count))[1]
                cpu0 = sum(cpu_seconds(r.proc.pid) for r in reps)
                seconds, ids = asyncio.run(drive(reps, args.runs, args.concurrency))
                cpu = sum(cpu_seconds(r.proc.pid) for r in reps) - cpu0
                check = check_listed(reps, warm + ids)
                print(f"{label:<26}{args.runs / seconds:>8.2f}{cpu / args.runs:>15.3f}  {check}")
            finally:
                for r in reps:
                    r.stop()
    finally:
        llm.stop()


def a_run(i: int) -> RunResult:
    """A run the size of a typical one: two attempts, code, output, a traceback."""
    code = "import math\n" + "".join(f"x{j} = math.sin({j})\n" for j in range(30))
    failed = Attempt(
        number=1,
        status="error",
        code=code,
        reply=fenced(code),
        error="Traceback (most recent call last):\n" + "  File x, line 1\n" * 20,
        error_kind=ErrorKind.EXCEPTION,
    )
    ok = Attempt(number=2, status="success", code=code, reply=fenced(code), output="ok\n" * 50)
    words = ("plot a sine wave", "sum the csv column", "fit a line", "parse the log")
    success = i % 3 != 0
    return RunResult(
        status="success" if success else "error",
        error_kind=None if success else ErrorKind.EXCEPTION,
        run_id=f"20261201-{i // 3600 % 24:02d}{i // 60 % 60:02d}{i % 60:02d}-{i:06x}",
        prompt=f"{words[i % 4]} number {i}",
        model="scripted",
        attempts=[failed, ok] if success else [failed],
        code=code,
        output=ok.output,
        started_at=f"2026-12-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}+00:00",
        duration=1.5,
    )


QUERIES: list[tuple[str, dict[str, Any]]] = [
    ("newest", {}),
    ("status=error", {"status": "error"}),
    ("q=sine", {"q": "sine"}),
    ("status=success&q=csv", {"status": "success", "q": "csv"}),
]


def pages_per_second(store: Any, query: dict[str, Any], seconds: float) -> float:
    store.list(limit=20, **query)
    n, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        store.list(limit=20, offset=(n * 20) % 200, **query)
        n += 1
    return n / (time.monotonic() - start)


def part_pages(args: argparse.Namespace, cluster: PostgresCluster, root: Path) -> None:
    runs = [a_run(i) for i in range(args.history)]
    sqlite_dir = root / "sqlite"
    for run in runs:
        write_record(run, sqlite_dir)
    sqlite = SqliteStore(sqlite_dir)
    sqlite.open()
    before_dir = root / "sqlite-before"
    shutil.copytree(sqlite_dir, before_dir)
    before = SqliteStore(before_dir)
    before.open()
    with before._lock:
        before.db.executescript("DROP INDEX runs_list; DROP INDEX runs_by_status;")
    settings = load_settings(
        database_url=cluster.database(),
        openai_api_key=SECRET,
        openai_base_url="http://127.0.0.1:9/v1",
        notebooks_dir=root / "pg",
        autofile_dir=root / "pg-files",
    )
    pg = PostgresStore(settings)
    pg.open()
    for run in runs:
        pg.add(run)
    with pg.pool.connection() as conn:
        conn.execute("VACUUM ANALYZE autocoder_runs")
    servers = [
        LiveServer(settings.model_copy(update={"database_url": None, "notebooks_dir": sqlite_dir})),
        LiveServer(settings),
        LiveServer(settings, nagle=True),
    ]
    print(f"\nlist pages/s (20 a page) at {args.history:,} runs: store.list(), and GET /runs")
    widths = (8, 8, 8, 8, 8, 8)
    print(f"{'':<24}{'store.list()':^24}{'GET /runs':^24}")
    print(f"{'filter':<24}{'SQLite':>8}{'before':>8}{'PG':>8}{'SQLite':>8}{'PG':>8}{'Nagle':>8}")
    try:
        for label, query in QUERIES:
            figures = [pages_per_second(s, query, args.seconds) for s in (sqlite, before, pg)]
            figures += [pages_per_second(srv, query, args.seconds) for srv in servers]
            print(
                f"{label:<24}"
                + "".join(f"{f:>{w}.0f}" for f, w in zip(figures, widths, strict=True))
            )
    finally:
        for srv in servers:
            srv.stop()
        sqlite.close()
        before.close()
        pg.close()


class LiveServer:
    """The app in this process (uvicorn in a thread, no kernels kept), listed like a store."""

    def __init__(self, settings: Any, nagle: bool = False) -> None:
        import threading

        import uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol

        from autocoder.api import create_app
        from autocoder.api.app import server_options

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        settings = settings.model_copy(update={"pool_size": 0})
        # nagle: uvicorn's own protocol, as autocoder serve was before it set TCP_NODELAY.
        options = {"http": H11Protocol} if nagle else server_options(settings)
        config = uvicorn.Config(create_app(settings), log_level="warning", **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise SystemExit("the app did not start")
            time.sleep(0.05)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def list(self, *, limit: int, offset: int = 0, **query: Any) -> Any:
        r = self.http.get("/runs", params={"limit": limit, "offset": offset, **query})
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--history", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--sandbox", default="bwrap", choices=["bwrap", "none"])
    p.add_argument("--skip-runs", action="store_true")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    cluster = PostgresCluster().start()
    try:
        if not args.skip_runs:
            part_runs(args, cluster, root)
        part_pages(args, cluster, root)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Several replicas, one PostgreSQL: real `autocoder serve` processes, a real server started
here (a throwaway cluster), the scripted model. Skipped, with the reason, where PostgreSQL
or psycopg is missing."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from autocoder.store.postgres import SCHEMA_VERSION
from autocoder.testing import (
    KernelGateway,
    PostgresCluster,
    PostgresUnavailable,
    ScriptedLLM,
    fenced,
)
from tests.conftest import GATEWAY_KERNEL, SANDBOX, SECRET, autocoder_cmd

# Seconds; a replica heartbeats every third of it. Long enough that a replica starved of CPU
# for a moment on a loaded machine (starting its pool, say) keeps its lease: a lapse makes
# another replica reclaim its kernels under it, which is what these tests do on purpose only.
LEASE = 5.0


def code_in(body: dict[str, Any]) -> str:
    """The scripted model writes whatever code the prompt quotes between « and »."""
    for message in reversed(body["messages"]):
        found = re.search(r"«(.+?)»", str(message.get("content", "")), re.S)
        if found:
            return fenced(found.group(1))
    return fenced("print('no code quoted')")


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    try:
        pg = PostgresCluster().start()
    except PostgresUnavailable as e:
        pytest.skip(str(e))
    yield pg
    pg.stop()


@pytest.fixture(scope="module")
def model(llm_server: ScriptedLLM) -> ScriptedLLM:
    llm_server.script()
    llm_server.responder = code_in
    return llm_server


class Replica:
    """`autocoder serve` on its own port and its own disk, sharing the database."""

    def __init__(self, name: str, home: Path, db_url: str, model: ScriptedLLM, **env: str) -> None:
        self.name = name
        self.home = home
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("AUTOCODER_", "OPENAI_"))
        }
        self.env.update(
            OPENAI_BASE_URL=model.base_url,
            OPENAI_API_KEY=SECRET,
            AUTOCODER_SANDBOX=SANDBOX,
            AUTOCODER_LLM_RETRIES="0",
            AUTOCODER_POOL_SIZE="1",
            AUTOCODER_DATABASE_URL=db_url,
            AUTOCODER_REPLICA_LEASE=str(LEASE),
            AUTOCODER_NOTEBOOKS_DIR=str(home / "notebooks"),
            AUTOCODER_AUTOFILE_DIR=str(home / "autofile"),
            AUTOCODER_SHUTDOWN_GRACE="2",
            PYTHONUNBUFFERED="1",
        )
        self.env.update(env)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / f"{self.name}.log", "ab")  # noqa: SIM115 (the process owns it)
        self.proc = subprocess.Popen(
            [*autocoder_cmd(), "serve", "--port", str(self.port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.home,
        )
        log.close()
        return self

    def ready(self, timeout: float = 90) -> Replica:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"replica {self.name} exited: {self.log()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"replica {self.name} did not start: {self.log()[-2000:]}")

    def log(self) -> str:
        return (self.home / f"{self.name}.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def run(self, code: str, **fields: Any) -> dict[str, Any]:
        r = httpx.post(f"{self.url}/run", json={"prompt": f"run «{code}»", **fields}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", params=params, timeout=30)


@pytest.fixture(scope="module")
def replicas(
    cluster: PostgresCluster, model: ScriptedLLM, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Replica, Replica]]:
    """Two replicas started at the same moment on an empty database: both migrate it."""
    db = cluster.database()
    root = tmp_path_factory.mktemp("replicas")
    a = Replica("a", root / "a", db, model).start()
    b = Replica("b", root / "b", db, model).start()
    try:
        yield a.ready(), b.ready()
    finally:
        a.stop()
        b.stop()


def schema_rows(db_url: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT version FROM autocoder_schema").fetchall()


def test_two_replicas_starting_at_once_migrate_the_schema_once(
    replicas: tuple[Replica, Replica],
) -> None:
    a, _ = replicas
    assert schema_rows(a.env["AUTOCODER_DATABASE_URL"]) == [(SCHEMA_VERSION,)]
    assert "Traceback" not in a.log() + replicas[1].log()


def test_many_stores_migrating_together_do_not_race(cluster: PostgresCluster) -> None:
    from autocoder.config import load_settings
    from autocoder.store.postgres import PostgresStore

    db = cluster.database()
    settings = load_settings(database_url=db, openai_api_key=SECRET)
    barrier = threading.Barrier(8)

    def migrate() -> None:
        barrier.wait(10)
        PostgresStore(settings).check()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(migrate) for _ in range(8)]:
            f.result(timeout=60)
    PostgresStore(settings).check()  # and again, later: nothing to do
    assert schema_rows(db) == [(SCHEMA_VERSION,)]


def test_a_run_on_one_replica_is_seen_on_the_other_with_its_notebook_and_files(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    result = a.run("open('report.csv', 'w').write('x,y\\n1,2\\n'); print('written')")
    assert result["status"] == "success" and result["output"] == "written\n"
    run_id = result["run_id"]

    listed = b.get("/runs").json()
    assert run_id in [r["run_id"] for r in listed["runs"]]
    assert b.get(f"/runs/{run_id}").json() == a.get(f"/runs/{run_id}").json()
    notebook = b.get(f"/runs/{run_id}/notebook")
    assert notebook.status_code == 200
    assert notebook.content == Path(result["notebook"]).read_bytes()
    assert notebook.headers["content-type"] == "application/x-ipynb+json"
    assert Path(result["notebook"]).name in notebook.headers["content-disposition"]
    csv = b.get(f"/runs/{run_id}/files/report.csv")
    assert csv.status_code == 200 and csv.content == b"x,y\n1,2\n"
    assert csv.headers["content-type"].startswith("text/csv")
    # Nothing of it is on b's own disk: b answered from the database.
    assert not list((b.home / "notebooks").glob("*.ipynb"))
    assert b.get(f"/runs/{run_id}/files/nothing.csv").status_code == 404


def test_a_run_from_the_command_line_is_listed_by_every_replica(
    replicas: tuple[Replica, Replica], tmp_path: Path
) -> None:
    a, b = replicas
    env = dict(
        a.env,
        AUTOCODER_NOTEBOOKS_DIR=str(tmp_path / "notebooks"),
        AUTOCODER_AUTOFILE_DIR=str(tmp_path / "autofile"),
    )
    cli = subprocess.run(
        [*autocoder_cmd(), "run", "--json", "-q", "run «print(40 + 2)»"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert cli.returncode == 0, cli.stderr
    run_id = json.loads(cli.stdout)["run_id"]
    assert run_id in [r["run_id"] for r in a.get("/runs").json()["runs"]]
    assert b.get(f"/runs/{run_id}").json()["output"] == "42\n"
    assert b.get(f"/runs/{run_id}/notebook").status_code == 200


def test_concurrent_runs_on_both_replicas_are_each_stored_once(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    before = a.get("/runs", limit=1).json()["total"]
    jobs = [(r, f"print({i} * 7)") for i, r in enumerate([a, b] * 4)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: job[0].run(job[1]), jobs))
    assert [r["output"] for r in results] == [f"{i * 7}\n" for i in range(len(jobs))]
    ids = {r["run_id"] for r in results}
    assert len(ids) == len(jobs)
    for replica in (a, b):
        page = replica.get("/runs", limit=100).json()
        assert page["total"] == before + len(jobs)
        listed = [r["run_id"] for r in page["runs"]]
        assert len(listed) == len(set(listed)) and ids <= set(listed)
        found = replica.get("/runs", status="success", q="* 7", limit=100).json()
        assert {r["run_id"] for r in found["runs"]} == ids


def test_a_replica_killed_mid_run_leaves_the_run_interrupted_once_another_notices(
    replicas: tuple[Replica, Replica], cluster: PostgresCluster, model: ScriptedLLM
) -> None:
    a, b = replicas
    doomed = Replica("c", a.home.parent / "c", a.env["AUTOCODER_DATABASE_URL"], model)
    doomed.start().ready()
    asked = len(model.requests)
    running = concurrent.futures.ThreadPoolExecutor(1).submit(
        doomed.run, "import time; time.sleep(60)", timeout=90
    )
    deadline = time.monotonic() + 30
    while len(model.requests) == asked and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(model.requests) > asked, "the run never reached the model"
    time.sleep(0.5)  # the code is sleeping in c's kernel now
    doomed.kill()
    with pytest.raises(httpx.HTTPError):
        running.result(timeout=10)

    run_id = _wait_for_interrupted(b)
    record = b.get(f"/runs/{run_id}").json()
    assert record["status"] == "error" and record["error_kind"] == "interrupted"
    assert "before it finished" in record["error"]
    assert a.get(f"/runs/{run_id}").json() == record


def test_a_replica_killed_mid_run_has_its_gateway_kernels_deleted_by_another(
    cluster: PostgresCluster, model: ScriptedLLM, gateway: KernelGateway, tmp_path: Path
) -> None:
    import psycopg

    db = cluster.database()
    via_gateway = {
        "AUTOCODER_GATEWAY_URL": gateway.url,
        "AUTOCODER_GATEWAY_TOKEN": gateway.token,
        "AUTOCODER_GATEWAY_KERNEL": GATEWAY_KERNEL,
    }
    others = {k["id"] for k in gateway.kernels()}
    survivor = Replica("b", tmp_path / "b", db, model, AUTOCODER_POOL_SIZE="0", **via_gateway)
    doomed = Replica("a", tmp_path / "a", db, model, **via_gateway)  # a pool of one kernel
    survivor.start()
    doomed.start()
    try:
        survivor.ready()
        doomed.ready()
        running = concurrent.futures.ThreadPoolExecutor(1).submit(
            doomed.run, "import time; time.sleep(60)", timeout=90
        )

        def doomed_kernels() -> set[str]:
            return {k["id"] for k in gateway.kernels()} - others

        def recorded() -> set[str]:
            with psycopg.connect(db) as conn:
                return {r[0] for r in conn.execute("SELECT kernel_id FROM autocoder_kernels")}

        # The run's kernel is busy sleeping, a fresh one refills the pool; both are recorded.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            busy = [k for k in gateway.kernels() if k["execution_state"] == "busy"]
            if busy and len(doomed_kernels()) == 2 and doomed_kernels() <= recorded():
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the run never got its kernel: {gateway.kernels()}")
        left = doomed_kernels()
        doomed.kill()
        with pytest.raises(httpx.HTTPError):
            running.result(timeout=10)

        run_id = _wait_for_interrupted(survivor)
        assert survivor.get(f"/runs/{run_id}").json()["error_kind"] == "interrupted"
        deadline = time.monotonic() + 30
        while {k["id"] for k in gateway.kernels()} & left and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not {k["id"] for k in gateway.kernels()} & left, "the kernels were not reclaimed"
        deadline = time.monotonic() + 10
        while recorded() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert recorded() == set()
        assert "reclaimed kernel" in survivor.log()
    finally:
        doomed.stop()
        survivor.stop()


def _wait_for_interrupted(replica: Replica, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = replica.get("/runs", status="error", q="time.sleep(60)").json()["runs"]
        if runs:
            return str(runs[0]["run_id"])
        time.sleep(0.2)
    raise AssertionError("the killed replica's run was never marked interrupted")


def test_an_emptied_database_is_rebuilt_from_the_replicas_records(
    replicas: tuple[Replica, Replica],
) -> None:
    import psycopg

    a, b = replicas
    result = a.run("open('kept.txt', 'w').write('kept'); print('kept')")
    run_id = result["run_id"]
    with psycopg.connect(a.env["AUTOCODER_DATABASE_URL"]) as conn:
        conn.execute("TRUNCATE autocoder_runs CASCADE")
    assert b.get(f"/runs/{run_id}").status_code == 404

    a.stop()
    a.start().ready()  # a imports what its disk holds and the database lacks
    assert b.get(f"/runs/{run_id}").json()["output"] == "kept\n"
    assert b.get(f"/runs/{run_id}/files/kept.txt").content == b"kept"
    assert b.get(f"/runs/{run_id}/notebook").content == Path(result["notebook"]).read_bytes()


def test_a_database_that_cannot_be_reached_is_one_line_and_exit_2(
    tmp_path: Path, model: ScriptedLLM
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    replica = Replica(
        "down", tmp_path, f"postgresql://autocoder:s3cret@127.0.0.1:{closed}/runs", model
    )
    proc = subprocess.run(
        [*autocoder_cmd(), "serve", "--port", str(replica.port)],
        env=replica.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "AUTOCODER_DATABASE_URL" in lines[0], proc.stderr
    assert "s3cret" not in proc.stderr
    try:
        import psycopg  # noqa: F401
    except ImportError:  # the line says so, and what to install
        assert "pip install 'autocoder[postgres]'" in lines[0]
    else:
        assert f"127.0.0.1:{closed}/runs" in lines[0]


def test_a_database_gone_while_serving_is_503_with_retry_after(
    cluster: PostgresCluster, tmp_path: Path, model: ScriptedLLM
) -> None:
    import psycopg

    from autocoder.config import load_settings
    from tests.conftest import LiveServer

    db = cluster.database()
    settings = load_settings(
        database_url=db,
        openai_base_url=model.base_url,
        openai_api_key=SECRET,
        notebooks_dir=tmp_path / "nb",
        autofile_dir=tmp_path / "files",
        sandbox=SANDBOX,
        pool_size=0,
    )
    with LiveServer(settings) as live:
        assert httpx.get(f"{live.url}/runs", timeout=30).json()["total"] == 0
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{db.rsplit("/", 1)[1]}" WITH (FORCE)')
        r = httpx.get(f"{live.url}/runs", timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert re.search(r"run store at postgresql://127\.0\.0\.1:\d+/\w+ is unavailable", r.text)
        assert "postgres@" not in r.text


def test_the_replica_that_notices_a_lapsed_lease_gets_the_run_and_the_kernels_left(
    cluster: PostgresCluster, tmp_path: Path
) -> None:
    import psycopg

    from autocoder.config import load_settings
    from autocoder.store.postgres import PostgresStore

    db = cluster.database()
    stores = [
        PostgresStore(
            load_settings(
                database_url=db,
                openai_api_key=SECRET,
                notebooks_dir=tmp_path / name,
                replica_lease=5,
                gateway_url="http://127.0.0.1:9",
            )
        )
        for name in ("gone", "alive")
    ]
    gone, alive = stores
    for store in stores:
        store.open()
    try:
        gone.begin("20261203-100000-abcdef", "a long one", "scripted")
        gone.kernel_started("kernel-1")
        assert alive.heartbeat() == [] and alive.get("20261203-100000-abcdef") is None
        with psycopg.connect(db) as conn:  # its last heartbeat, a minute ago
            conn.execute(
                "UPDATE autocoder_replicas SET heartbeat_at = now() - interval '1 minute' "
                "WHERE replica_id = %s",
                (gone.replica_id,),
            )
        assert alive.heartbeat() == ["kernel-1"]
        assert alive.heartbeat() == ["kernel-1"]  # until it is deleted on the gateway
        alive.kernels_ended(["kernel-1"])
        assert alive.heartbeat() == []
        run = alive.get("20261203-100000-abcdef")
        assert run is not None and run.error_kind == "interrupted" and run.prompt == "a long one"
        assert gone.replica_id in run.error
        assert alive.list(limit=5)[1] == 1
    finally:
        for store in stores:
            store.close()

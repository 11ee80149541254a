"""The run store in PostgreSQL, shared by every replica of the service (AUTOCODER_DATABASE_URL).

What any replica needs to answer `GET /runs`, `GET /runs/{id}`, the notebook and the produced
files lives in the database: the index, each run's whole record, the notebook's bytes and the
files' bytes (those up to AUTOCODER_DATABASE_FILE_MB). Each replica still writes its records,
notebooks and files on its own disk as the runner always did; those are what `open()` and
`sync()` import when the database lacks them (a CLI run, a database restored from an older
backup or started empty): the index is rebuilt from the records, as with SQLite.

Replicas hold a lease: each heartbeats its row in `autocoder_replicas` every third of
AUTOCODER_REPLICA_LEASE, and every run in progress is a row naming its replica. Whichever
replica heartbeats next after a lease lapsed marks that replica's running runs interrupted
(rows locked with SKIP LOCKED, so two that notice at once do not both write) and drops its row.
Times are the database's `now()`, so the replicas' clocks need not agree.

Kernels a replica starts on a gateway are rows under its lease too (`autocoder_kernels`, from
the moment the gateway names the kernel until it is deleted), pooled ones included: once the
lease lapses, `heartbeat` hands them to whoever can delete them on that gateway, at every beat
until `kernels_ended` says they are gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocoder.config import without_credentials
from autocoder.errors import ConfigError, StoreUnavailable
from autocoder.files import media_type
from autocoder.notebook import is_valid_run_id, record_path
from autocoder.records import ErrorKind, RunResult
from autocoder.store.base import (
    INDEX_COLUMNS,
    PROMPT_PREVIEW,
    RunSummary,
    StoredFile,
    index_fields,
    read_record,
    rebuilt_notebook,
    stored_output,
)

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg_pool import ConnectionPool

    from autocoder.config import Settings

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key: 'autocodr' as a big-endian 64-bit integer.
MIGRATION_LOCK = int.from_bytes(b"autocodr", "big") & 0x7FFF_FFFF_FFFF_FFFF
CONNECT_TIMEOUT = 10
POOL_SIZE = 8  # connections per replica: runs being stored, list pages, the heartbeat
CLOSE_TIMEOUT = 3  # leaving the lease is a courtesy: others mark our runs anyway
STATEMENT_TIMEOUT_MS = 30_000

# Each step takes the schema from version i to i + 1; a step, once released, never changes.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE autocoder_runs (
        run_id      text PRIMARY KEY,
        started_at  text NOT NULL,
        status      text NOT NULL CHECK (status IN ('running', 'success', 'error')),
        error_kind  text,
        prompt      text NOT NULL,
        model       text NOT NULL,
        attempts    integer NOT NULL,
        duration    double precision NOT NULL,
        replica_id  text,
        kernel_id   text,
        updated_at  timestamptz NOT NULL DEFAULT now(),
        record      text NOT NULL
    );
    -- What list pages sort and filter on; records are TOASTed out of line and never read.
    CREATE INDEX autocoder_runs_newest ON autocoder_runs (started_at DESC, run_id DESC)
        WHERE status <> 'running';
    CREATE INDEX autocoder_runs_by_status ON autocoder_runs (status, started_at DESC, run_id DESC);
    CREATE INDEX autocoder_runs_running ON autocoder_runs (replica_id) WHERE status = 'running';
    CREATE TABLE autocoder_files (
        run_id      text NOT NULL REFERENCES autocoder_runs ON DELETE CASCADE,
        kind        text NOT NULL CHECK (kind IN ('notebook', 'file')),
        name        text NOT NULL,
        media_type  text NOT NULL,
        body        bytea NOT NULL,
        PRIMARY KEY (run_id, kind, name)
    );
    CREATE TABLE autocoder_replicas (
        replica_id   text PRIMARY KEY,
        host         text NOT NULL,
        pid          integer NOT NULL,
        lease        double precision NOT NULL,
        started_at   timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now()
    );
    """,
    """
    CREATE TABLE autocoder_kernels (
        gateway     text NOT NULL,
        kernel_id   text NOT NULL,
        replica_id  text NOT NULL,
        started_at  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (gateway, kernel_id)
    );
    CREATE INDEX autocoder_kernels_by_replica ON autocoder_kernels (replica_id);
    """,
    """
    ALTER TABLE autocoder_runs ADD COLUMN origin text NOT NULL DEFAULT 'model'
        CHECK (origin IN ('model', 'code'));
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
# A prompt search (`q`) is a substring match: a trigram index serves it when pg_trgm can be had.
TRIGRAM_INDEX = (
    "CREATE INDEX IF NOT EXISTS autocoder_runs_prompt_trgm "
    "ON autocoder_runs USING gin (prompt gin_trgm_ops)"
)

# A replica whose lease holds, for `r.replica_id` (a run's or a kernel's).
_LIVE_REPLICA = (
    "SELECT 1 FROM autocoder_replicas p WHERE p.replica_id = r.replica_id "
    "AND p.heartbeat_at >= now() - p.lease * interval '1 second'"
)
_SUMMARY = ", ".join(INDEX_COLUMNS)


def where_is(conninfo: str) -> str:
    """host:port/dbname of a connection string, never its password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        d = conninfo_to_dict(conninfo)
    except Exception:
        return "the database AUTOCODER_DATABASE_URL names"
    host = str(d.get("host") or "localhost")
    return f"{host}:{d.get('port') or 5432}/{d.get('dbname') or ''}"


class PostgresStore:
    """The run store every replica shares. Open it with `open()`: it connects, migrates the
    schema (under an advisory lock, so replicas starting together take turns), registers this
    replica's lease and imports the local records the database lacks."""

    def __init__(self, settings: Settings) -> None:
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError:
            raise ConfigError(
                "AUTOCODER_DATABASE_URL needs psycopg 3: pip install 'autocoder[postgres]'"
            ) from None
        assert settings.database_url is not None
        self.conninfo = settings.database_url.get_secret_value()
        self.notebooks_dir = settings.notebooks_dir
        self.autofile_dir = settings.autofile_dir
        self.records_dir = settings.notebooks_dir / ".autocoder" / "records"
        self.lease: float | None = settings.replica_lease
        self.file_limit = settings.database_file_mb * 1024 * 1024
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        # The gateway this replica's kernels come from, as every replica names it (no token).
        self.gateway: str | None = None
        if settings.gateway_url:
            self.gateway = without_credentials(settings.gateway_url)
        self._pool: ConnectionPool[Any] | None = None
        self._seen_dir_mtime: int | None = None
        # Local records known to be in the database as finished: not asked about again.
        self._settled: set[str] = set()

    @property
    def where(self) -> str:
        return f"postgresql://{where_is(self.conninfo)}"

    # Opening and closing.

    _kwargs: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT,
        "application_name": "autocoder",
        "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        "autocommit": True,
    }

    def check(self) -> None:
        """Connect and bring the schema up to date, or ConfigError with the reason in one line
        (`autocoder serve` asks this before it listens)."""
        import psycopg

        try:
            # A plain connection: its error says why, where a pool would only time out.
            with psycopg.connect(self.conninfo, **self._kwargs) as conn:
                self._migrate(conn)
        except psycopg.Error as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"cannot use the run store at {self.where} (AUTOCODER_DATABASE_URL): {detail}"
            ) from None

    def open(self) -> None:
        from psycopg_pool import ConnectionPool

        self.check()
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self._pool = ConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=POOL_SIZE,
            kwargs=self._kwargs,
            timeout=CONNECT_TIMEOUT,
            open=False,
        )
        self._pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        self.heartbeat()
        self.sync()

    def _migrate(self, conn: Connection[Any]) -> None:
        """Bring the schema to SCHEMA_VERSION. Idempotent; replicas starting together wait on
        one transaction-scoped advisory lock, so exactly one of them creates each table."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS autocoder_schema (version integer NOT NULL)")
            row = conn.execute("SELECT max(version) FROM autocoder_schema").fetchone()
            version = row[0] if row and row[0] is not None else 0
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"the run store at {self.where} has schema version {version}, newer than "
                    f"this autocoder's ({SCHEMA_VERSION}): upgrade autocoder"
                )
            for step in range(version, SCHEMA_VERSION):
                conn.execute(MIGRATIONS[step])
                log.info("run store %s: schema migrated to version %d", self.where, step + 1)
            conn.execute("DELETE FROM autocoder_schema")
            conn.execute("INSERT INTO autocoder_schema VALUES (%s)", (SCHEMA_VERSION,))
            try:
                with conn.transaction():
                    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
                    conn.execute(TRIGRAM_INDEX)
            except Exception as e:
                log.info("run store %s: no trigram index for prompt searches (%s)", self.where, e)

    def close(self) -> None:
        """Leave the lease: runs of ours still marked running cannot finish now."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            with pool.connection(timeout=CLOSE_TIMEOUT) as conn, conn.transaction():
                self._interrupt(conn, "AND replica_id = %s", (self.replica_id,), "stopped")
                conn.execute(
                    "DELETE FROM autocoder_replicas WHERE replica_id = %s", (self.replica_id,)
                )
        except Exception as e:
            log.warning("could not leave the run store %s cleanly: %s", self.where, e)
        finally:
            pool.close(timeout=CONNECT_TIMEOUT)

    @property
    def pool(self) -> ConnectionPool[Any]:
        if self._pool is None:
            raise RuntimeError("the run store is not open")
        return self._pool

    @contextlib.contextmanager
    def _conn(self) -> Iterator[Connection[Any]]:
        """A pooled connection; a database that is down, or too slow to answer, is
        StoreUnavailable (HTTP 503), every wait bounded by CONNECT_TIMEOUT or the statement
        timeout."""
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with self.pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StoreUnavailable(f"the run store at {self.where} is unavailable: {detail}") from e

    # The lease.

    def heartbeat(self) -> list[str]:
        """Renew this replica's lease, then mark the running runs of replicas whose lease
        lapsed as interrupted. Returns the ids of the kernels such replicas left on this
        replica's gateway (`kernel_started`), for the caller to delete there; they are
        returned again at each beat until `kernels_ended` forgets them."""
        with self._conn() as conn, conn.transaction():
            renewed = conn.execute(
                "UPDATE autocoder_replicas SET heartbeat_at = now(), lease = %s "
                "WHERE replica_id = %s",
                (self.lease, self.replica_id),
            ).rowcount
            if not renewed:
                conn.execute(
                    "INSERT INTO autocoder_replicas (replica_id, host, pid, lease) "
                    "VALUES (%s, %s, %s, %s)",
                    (self.replica_id, socket.gethostname(), os.getpid(), self.lease),
                )
                if self._seen_dir_mtime is not None:
                    log.warning(
                        "run store %s: this replica's lease had lapsed; runs it had in progress "
                        "were marked interrupted and are rewritten as they finish",
                        self.where,
                    )
            self._interrupt(conn, f"AND NOT EXISTS ({_LIVE_REPLICA})", (), "stopped answering")
            conn.execute(
                "DELETE FROM autocoder_replicas p "
                "WHERE p.heartbeat_at < now() - p.lease * interval '1 second' "
                "AND NOT EXISTS (SELECT 1 FROM autocoder_runs r "
                "WHERE r.replica_id = p.replica_id AND r.status = 'running')"
            )
            if self.gateway is None:
                return []
            rows = conn.execute(
                "SELECT kernel_id FROM autocoder_kernels r WHERE gateway = %s "
                f"AND NOT EXISTS ({_LIVE_REPLICA}) ORDER BY started_at",
                (self.gateway,),
            ).fetchall()
        return [r[0] for r in rows]

    def _interrupt(
        self, conn: Connection[Any], where: str, args: tuple[Any, ...], why: str
    ) -> None:
        rows = conn.execute(
            "SELECT run_id, record, replica_id FROM autocoder_runs r "
            f"WHERE status = 'running' {where} FOR UPDATE SKIP LOCKED",
            args,
        ).fetchall()
        for run_id, record, replica_id in rows:
            result = RunResult.model_validate_json(record)
            result.status = "error"
            result.error_kind = ErrorKind.INTERRUPTED
            result.error = (
                f"the server running this run ({replica_id}) {why} before it finished; "
                "the run was marked interrupted by the replica that noticed"
            )
            conn.execute(
                "UPDATE autocoder_runs SET status = 'error', error_kind = %s, record = %s, "
                "updated_at = now() WHERE run_id = %s",
                (ErrorKind.INTERRUPTED.value, result.model_dump_json(), run_id),
            )
            log.warning("run %s of replica %s marked interrupted (%s)", run_id, replica_id, why)

    # Kernels on the gateway, under this replica's lease.

    def kernel_started(self, kernel_id: str) -> None:
        """The gateway started a kernel for this replica: should the replica die before it
        deletes it, another one will (`heartbeat`)."""
        if self.gateway is None:
            return
        with self._conn() as conn:
            conn.execute(
                "INSERT INTO autocoder_kernels (gateway, kernel_id, replica_id) "
                "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (self.gateway, kernel_id, self.replica_id),
            )

    def kernels_ended(self, kernel_ids: list[str]) -> None:
        """These kernels are gone from the gateway (deleted by this replica, or reclaimed)."""
        if self.gateway is None or not kernel_ids:
            return
        with self._conn() as conn:
            conn.execute(
                "DELETE FROM autocoder_kernels WHERE gateway = %s AND kernel_id = ANY(%s)",
                (self.gateway, kernel_ids),
            )

    # Runs.

    def begin(self, run_id: str, prompt: str, model: str) -> None:
        """A run in progress, under this replica's lease, not yet listed: if the replica dies
        before `add`, another marks it interrupted."""
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        provisional = RunResult(
            status="error", run_id=run_id, prompt=prompt, model=model, started_at=started
        )
        with self._conn() as conn:
            conn.execute(
                "INSERT INTO autocoder_runs (run_id, started_at, status, prompt, model, "
                "attempts, duration, replica_id, record) "
                "VALUES (%s, %s, 'running', %s, %s, 0, 0, %s, %s) ON CONFLICT DO NOTHING",
                (
                    run_id,
                    started,
                    prompt[:PROMPT_PREVIEW],
                    model,
                    self.replica_id,
                    provisional.model_dump_json(),
                ),
            )

    def add(self, result: RunResult) -> None:
        """Store a finished run whole: its record, notebook and files' bytes, in one
        transaction (a finished run's record always wins over an interrupted mark)."""
        blobs: list[tuple[str, str, str, bytes]] = []
        nb = rebuilt_notebook(result)
        blobs.append(("notebook", nb.name, "application/x-ipynb+json", nb.data or b""))
        for f in result.files:
            stored = stored_output(self.autofile_dir, result.run_id, f.name)
            if stored is None or stored.opened is None:
                continue
            with stored.opened as opened:
                if opened.size > self.file_limit:
                    log.info(
                        "run %s: %s (%d bytes) is over AUTOCODER_DATABASE_FILE_MB; only this "
                        "replica serves it",
                        result.run_id,
                        f.name,
                        opened.size,
                    )
                    continue
                blobs.append(("file", f.name, media_type(f.name), opened.read()))
        row = (
            *index_fields(result),
            self.replica_id,
            result.model_dump_json(),
        )
        with self._conn() as conn, conn.transaction():
            conn.execute(
                f"INSERT INTO autocoder_runs ({_SUMMARY}, replica_id, record) "
                f"VALUES ({', '.join(['%s'] * (len(INDEX_COLUMNS) + 2))}) "
                "ON CONFLICT (run_id) DO UPDATE SET started_at = excluded.started_at, "
                "status = excluded.status, error_kind = excluded.error_kind, "
                "prompt = excluded.prompt, model = excluded.model, "
                "attempts = excluded.attempts, duration = excluded.duration, "
                "origin = excluded.origin, record = excluded.record, updated_at = now()",
                row,
            )
            conn.execute("DELETE FROM autocoder_files WHERE run_id = %s", (result.run_id,))
            if blobs:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO autocoder_files VALUES (%s, %s, %s, %s, %s)",
                        [(result.run_id, *b) for b in blobs],
                    )
        self._settled.add(result.run_id)

    def index_record(self, run_id: str) -> RunResult | None:
        """Store one run from this replica's record of it (a cancelled run, an import)."""
        result = self._read_record(run_id)
        if result is not None:
            self.add(result)
        return result

    def _read_record(self, run_id: str) -> RunResult | None:
        """This replica's record of a run, under the SQLite store's rules (store.read_record)."""
        found = read_record(self.notebooks_dir, run_id)
        return found[0] if found is not None else None

    def sync(self, *, force: bool = True) -> None:
        """Import this replica's records the database lacks (or has only as running or
        interrupted): rebuilds the index of an empty or restored database (a replica that was
        running while it was emptied does so when it restarts). Cheap when the records folder
        did not change, and asks only about records it has not yet seen stored. A record gone
        from disk stays: another replica's disk never held it."""
        try:
            dir_mtime = self.records_dir.stat().st_mtime_ns
        except OSError:
            return
        if not force and dir_mtime == self._seen_dir_mtime:
            return
        self._seen_dir_mtime = dir_mtime
        local = []
        with os.scandir(self.records_dir) as entries:
            for entry in entries:
                run_id = entry.name.removesuffix(".json")
                if (
                    entry.name.endswith(".json")
                    and is_valid_run_id(run_id)
                    and run_id not in self._settled
                ):
                    local.append(run_id)
        if not local:
            return
        with self._conn() as conn:
            settled = {
                r[0]
                for r in conn.execute(
                    "SELECT run_id FROM autocoder_runs WHERE run_id = ANY(%s) "
                    "AND status <> 'running' AND error_kind IS DISTINCT FROM %s",
                    (local, ErrorKind.INTERRUPTED.value),
                )
            }
        self._settled |= settled
        missing = [r for r in local if r not in settled]
        for run_id in missing:
            self.index_record(run_id)
        if missing:
            log.info("run store %s: imported %d local run record(s)", self.where, len(missing))

    def list(
        self, *, limit: int, offset: int = 0, status: str | None = None, q: str = ""
    ) -> tuple[list[RunSummary], int]:
        """A page of finished runs, newest first, and how many there are; `q` keeps those
        whose prompt (its first PROMPT_PREVIEW characters) contains it, ignoring case."""
        self.sync(force=False)
        terms = ["status <> 'running'"]
        args: list[Any] = []
        if status:
            terms.append("status = %s")
            args.append(status)
        if q:
            terms.append("prompt ILIKE %s")
            args.append("%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        where = " AND ".join(terms)
        with self._conn() as conn:
            row = conn.execute(
                f"SELECT count(*) FROM autocoder_runs WHERE {where}", args
            ).fetchone()
            rows = conn.execute(
                f"SELECT {_SUMMARY} FROM autocoder_runs WHERE {where} "
                "ORDER BY started_at DESC, run_id DESC LIMIT %s OFFSET %s",
                [*args, limit, offset],
            ).fetchall()
        runs = [RunSummary.model_validate(dict(zip(INDEX_COLUMNS, r, strict=True))) for r in rows]
        return runs, row[0] if row else 0

    def get(self, run_id: str) -> RunResult | None:
        """The whole record of a finished (or interrupted) run; a run this replica has on disk
        but the database lacks is imported first."""
        if not is_valid_run_id(run_id):
            return None
        with self._conn() as conn:
            row = conn.execute(
                "SELECT record FROM autocoder_runs WHERE run_id = %s AND status <> 'running'",
                (run_id,),
            ).fetchone()
        if row is not None:
            return RunResult.model_validate_json(row[0])
        if record_path(self.notebooks_dir, run_id).exists():
            return self.index_record(run_id)
        return None

    def notebook(self, run_id: str) -> StoredFile | None:
        return self._stored(run_id, "notebook", None)

    def output_file(self, run_id: str, name: str) -> StoredFile | None:
        return self._stored(run_id, "file", name)

    def _stored(self, run_id: str, kind: str, name: str | None) -> StoredFile | None:
        """The bytes the database keeps, else what this replica's disk has (a file over
        AUTOCODER_DATABASE_FILE_MB is only there)."""
        if not is_valid_run_id(run_id):
            return None
        with self._conn() as conn:
            row = conn.execute(
                "SELECT name, body FROM autocoder_files WHERE run_id = %s AND kind = %s "
                "AND (%s::text IS NULL OR name = %s)",
                (run_id, kind, name, name),
            ).fetchone()
        if row is not None:
            return StoredFile(Path(row[0]).name, data=bytes(row[1]))
        if kind == "notebook":
            result = self.get(run_id)
            return rebuilt_notebook(result) if result is not None else None
        assert name is not None
        return stored_output(self.autofile_dir, run_id, name)

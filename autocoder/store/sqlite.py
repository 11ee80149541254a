"""The canonical run records and an index of them in SQLite, so the service can list history fast.

The records (`.autocoder/records/<run-id>.json`, written by the runner) are the source of
truth; the notebooks are only a readable view and are never read back. A record that is gone
takes its run out of the index; one the index has not seen (written by the CLI, or by a run
cancelled mid-way) is read and added; a deleted or corrupt `runs.sqlite` is rebuilt.
Every method here blocks (SQLite, file reads); async callers use `asyncio.to_thread`.

`SqliteStore` is the default `store.base.Store`; `store.postgres.PostgresStore` is the one
replicas share.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from autocoder.errors import DiskFull
from autocoder.notebook import is_valid_run_id, record_path, write_record
from autocoder.records import RunResult
from autocoder.store.base import (
    INDEX_COLUMNS,
    RunSummary,
    StoredFile,
    index_fields,
    read_record,
    rebuilt_notebook,
    stored_output,
)

log = logging.getLogger(__name__)

INDEX_NAME = "runs.sqlite"
LEGACY_DIR = "legacy"
SCHEMA_VERSION = 3  # 3: origin

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id     TEXT PRIMARY KEY,
    started_at TEXT NOT NULL,
    status     TEXT NOT NULL,
    error_kind TEXT,
    prompt     TEXT NOT NULL,
    model      TEXT NOT NULL,
    attempts   INTEGER NOT NULL,
    duration   REAL NOT NULL,
    origin     TEXT NOT NULL DEFAULT 'model',
    nb_mtime   INTEGER NOT NULL,
    nb_size    INTEGER NOT NULL,
    record     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_newest ON runs (started_at DESC, nb_mtime DESC, run_id DESC);
-- A list page reads only these (covering) indexes, never the rows with their whole records:
-- a filter that scans (a prompt's words) scans the index, a status is a range of it.
CREATE INDEX IF NOT EXISTS runs_list ON runs (
    started_at DESC, nb_mtime DESC, run_id DESC,
    status, error_kind, prompt, model, attempts, duration, origin
);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (
    status, started_at DESC, nb_mtime DESC, run_id DESC,
    error_kind, prompt, model, attempts, duration, origin
);
"""


class SqliteStore:
    """The index. Open it with `open()`, which also brings it up to date with the records.

    Each run's canonical record is `<notebooks>/.autocoder/records/<run-id>.json`, written once
    by the runner and left read-only; the index (`.autocoder/runs.sqlite`) only caches it. Both
    sit in a hidden folder, so the notebooks a user browses and edits never feed the API.
    """

    lease: float | None = None

    def __init__(self, notebooks_dir: Path, autofile_dir: Path | None = None) -> None:
        self.notebooks_dir = notebooks_dir
        self.autofile_dir = autofile_dir
        self.records_dir = notebooks_dir / ".autocoder" / "records"
        self.path = notebooks_dir / ".autocoder" / INDEX_NAME
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._seen_dir_mtime: int | None = None

    @property
    def where(self) -> str:
        return str(self.path)

    def check(self) -> None:
        """Nothing to reach: the index is a file, made or rebuilt by `open()`."""

    def open(self) -> None:
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self._import_legacy_index()
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                # Not a broken index: one rebuilt now would be as empty as the disk is full.
                raise DiskFull(
                    f"cannot open the run index {str(self.path)!r}: the disk holding it is "
                    "full; free some space there and try again"
                ) from e
            self._db = self._rebuild(e)
        self.sync()

    def _import_legacy_index(self) -> None:
        """Runs made before records existed were kept only in `<notebooks>/runs.sqlite`, whole
        records included: write each as a record once, then move that index out of the folder
        the user browses (to `.autocoder/legacy/`). What cannot be read is said and skipped."""
        legacy = self.notebooks_dir / INDEX_NAME
        if not legacy.is_file() or legacy.is_symlink():
            return
        imported = 0
        try:
            db = sqlite3.connect(legacy, timeout=10)
            try:
                rows = db.execute("SELECT run_id, record FROM runs").fetchall()
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            log.warning(
                "cannot read the earlier run index %s (%s); its runs are not imported", legacy, e
            )
            rows = []
        for run_id, record in rows:
            if not (isinstance(run_id, str) and is_valid_run_id(run_id)):
                continue
            if record_path(self.notebooks_dir, run_id).exists():
                continue
            try:
                result = RunResult.model_validate_json(record)
            except ValueError as e:
                log.warning("skipping run %s of the earlier index: %s", run_id, e)
                continue
            if result.run_id != run_id:
                continue
            write_record(result, self.notebooks_dir)
            imported += 1
        moved = self.notebooks_dir / ".autocoder" / LEGACY_DIR
        moved.mkdir(exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            old = Path(f"{legacy}{suffix}")
            if old.is_file() and not old.is_symlink():
                old.replace(moved / old.name)
        log.info("imported %d run(s) from the earlier index %s into %s", imported, legacy, moved)

    def _rebuild(self, error: sqlite3.DatabaseError) -> sqlite3.Connection:
        log.warning(
            "run index %s is unreadable (%s); rebuilding it from the records", self.path, error
        )
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        self._seen_dir_mtime = None
        return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        try:
            # A corrupt page behind an intact header passes connect(); quick_check finds it here,
            # inside the guard, rather than later in the middle of a request.
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity check failed")
            db.execute("PRAGMA journal_mode=WAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                db.executescript(
                    f"DROP TABLE IF EXISTS runs; PRAGMA user_version={SCHEMA_VERSION};"
                )
            db.executescript(_SCHEMA)
            db.commit()
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the run index is not open")
        return self._db

    def _query(self, sql: str, args: Any = ()) -> list[Any]:
        """Run one statement; a database found corrupt at run time is rebuilt and asked again."""
        for retry in (True, False):
            try:
                with self._lock:
                    rows = self.db.execute(sql, args).fetchall()
                    self.db.commit()
                return rows
            except sqlite3.DatabaseError as e:
                if not retry or isinstance(e, sqlite3.ProgrammingError):
                    raise
                with self._lock:
                    self.db.close()
                    self._db = self._rebuild(e)
                self._sync_records()
        raise AssertionError("unreachable")

    def begin(self, run_id: str, prompt: str, model: str) -> None:
        """One process owns this store: a run it did not finish has no record, nothing to mark."""

    def heartbeat(self) -> list[str]:
        return []

    def kernel_started(self, kernel_id: str) -> None:
        """One process owns this store and its kernels: nobody else would reclaim them."""

    def kernels_ended(self, kernel_ids: list[str]) -> None:
        pass

    def add(self, result: RunResult) -> None:
        """Index a run that has just written its record."""
        self._put(result, record_path(self.notebooks_dir, result.run_id).stat())

    def _put(self, result: RunResult, stat: os.stat_result) -> None:
        row = (
            *index_fields(result),
            stat.st_mtime_ns,
            stat.st_size,
            result.model_dump_json(),
        )
        columns = (*INDEX_COLUMNS, "nb_mtime", "nb_size", "record")
        self._query(
            f"INSERT OR REPLACE INTO runs ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' * len(columns))})",
            row,
        )

    def _forget(self, run_id: str) -> None:
        self._query("DELETE FROM runs WHERE run_id = ?", (run_id,))

    def index_record(self, run_id: str) -> RunResult | None:
        """(Re)read one run from its record; None (and out of the index) when it has none."""
        found = read_record(self.notebooks_dir, run_id)
        if found is None:
            self._forget(run_id)
            return None
        result, stat = found
        self._put(result, stat)
        return result

    def sync(self, *, force: bool = True) -> None:
        """Make the index agree with the records on disk. Cheap when nothing changed."""
        try:
            dir_mtime = self.records_dir.stat().st_mtime_ns
        except OSError:
            return
        if not force and dir_mtime == self._seen_dir_mtime:
            return
        self._seen_dir_mtime = dir_mtime
        self._sync_records()

    def _sync_records(self) -> None:
        known = {
            r[0]: (r[1], r[2]) for r in self._query("SELECT run_id, nb_mtime, nb_size FROM runs")
        }
        on_disk: dict[str, tuple[int, int]] = {}
        with os.scandir(self.records_dir) as entries:
            for entry in entries:
                run_id = entry.name.removesuffix(".json")
                if (
                    entry.name.endswith(".json")
                    and is_valid_run_id(run_id)
                    and entry.is_file(follow_symlinks=False)
                ):
                    st = entry.stat(follow_symlinks=False)
                    on_disk[run_id] = (st.st_mtime_ns, st.st_size)
        for run_id in known.keys() - on_disk.keys():
            self._forget(run_id)
        for run_id, stamp in on_disk.items():
            if known.get(run_id) != stamp and self._stamp(run_id) != stamp:
                self.index_record(run_id)

    def _stamp(self, run_id: str) -> tuple[int, int] | None:
        """What the index last saw of a record (a run may have been added meanwhile)."""
        rows = self._query("SELECT nb_mtime, nb_size FROM runs WHERE run_id = ?", (run_id,))
        return (rows[0][0], rows[0][1]) if rows else None

    def list(
        self, *, limit: int, offset: int = 0, status: str | None = None, q: str = ""
    ) -> tuple[list[RunSummary], int]:
        """A page of runs, newest first, and how many there are in all; `q` keeps those whose
        prompt (its first PROMPT_PREVIEW characters) contains it, ignoring ASCII case."""
        self.sync(force=False)
        terms: list[str] = []
        args: list[Any] = []
        if status:
            terms.append("status = ?")
            args.append(status)
        if q:
            terms.append("prompt LIKE ? ESCAPE '\\'")
            args.append("%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        where = ("WHERE " + " AND ".join(terms)) if terms else ""
        total = self._query(f"SELECT count(*) FROM runs {where}", args)[0][0]
        rows = self._query(
            f"SELECT {', '.join(INDEX_COLUMNS)} FROM runs {where} "
            "ORDER BY started_at DESC, nb_mtime DESC, run_id DESC LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        return [
            RunSummary.model_validate(dict(zip(INDEX_COLUMNS, row, strict=True))) for row in rows
        ], total

    def get(self, run_id: str) -> RunResult | None:
        """The whole record, as the runner wrote it; editing the notebook changes nothing here."""
        if not is_valid_run_id(run_id):
            return None
        path = record_path(self.notebooks_dir, run_id)
        try:
            stat = path.lstat()
        except OSError:
            self._forget(run_id)
            return None
        rows = self._query("SELECT nb_mtime, nb_size, record FROM runs WHERE run_id = ?", (run_id,))
        if rows and (rows[0][0], rows[0][1]) == (stat.st_mtime_ns, stat.st_size):
            return RunResult.model_validate_json(rows[0][2])
        return self.index_record(run_id)

    def notebook(self, run_id: str) -> StoredFile | None:
        result = self.get(run_id)
        return rebuilt_notebook(result) if result is not None else None

    def output_file(self, run_id: str, name: str) -> StoredFile | None:
        """A file the run's code wrote, from the run's own directory (see `open_beneath`)."""
        if self.autofile_dir is None:
            return None
        return stored_output(self.autofile_dir, run_id, name)

"""An index of runs in SQLite, next to the notebooks, so the service can list history fast.

The notebooks are the source of truth: the index only caches what they say. A notebook that
is gone takes its run out of the index; one the index has not seen (written by the CLI, or by
a run cancelled mid-way) is read and added; a deleted or corrupt `runs.sqlite` is rebuilt.
Every method here blocks (SQLite, file reads); async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import nbformat
from pydantic import BaseModel, Field

from autocoder.kernel import texts
from autocoder.llm import clean_traceback
from autocoder.notebook import is_valid_run_id, notebook_path
from autocoder.records import Attempt, ErrorKind, RunFile, RunResult

log = logging.getLogger(__name__)

INDEX_NAME = "runs.sqlite"
SCHEMA_VERSION = 2
PROMPT_PREVIEW = 300

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
    nb_mtime   INTEGER NOT NULL,
    nb_size    INTEGER NOT NULL,
    record     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_newest ON runs (started_at DESC, nb_mtime DESC, run_id DESC);
"""

# The attempt headings notebook.py writes, e.g. "**Attempt 2/5** — failed: `timeout` · 2.01 s".
_HEADING = re.compile(
    r"^\*\*Attempt (?P<n>\d+)/\d+\*\* — (?:succeeded|failed: `(?P<kind>[a-z_]+)`)"
    r"(?: \((?P<ename>[^)]*)\))?(?: · (?P<duration>[0-9.]+) s)?"
)


class RunSummary(BaseModel):
    """One line of run history."""

    run_id: str = Field(description="The run's id; `GET /runs/{run_id}` has the whole record.")
    started_at: str = Field(description="When the run started (ISO 8601, UTC).")
    status: Literal["success", "error"] = Field(description="How the run ended.")
    error_kind: ErrorKind | None = Field(
        None, description="Why the last attempt failed, if it did."
    )
    prompt: str = Field(description=f"The prompt, cut to {PROMPT_PREVIEW} characters.")
    model: str = Field(description="The model that wrote the code.")
    attempts: int = Field(description="How many attempts the run made.")
    duration: float = Field(description="Seconds the whole run took.")


class RunStore:
    """The index. Open it with `open()`, which also brings it up to date with the notebooks."""

    def __init__(self, notebooks_dir: Path) -> None:
        self.notebooks_dir = notebooks_dir
        self.path = notebooks_dir / INDEX_NAME
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._seen_dir_mtime: int | None = None

    def open(self) -> None:
        self.notebooks_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as e:
            log.warning(
                "run index %s is unreadable (%s); rebuilding it from the notebooks", self.path, e
            )
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self._db = self._connect()
        self.sync()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        try:
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

    def add(self, result: RunResult) -> None:
        """Index a run that has just written its notebook."""
        path = notebook_path(self.notebooks_dir, result.run_id)
        self._put(result, path.stat())

    def _put(self, result: RunResult, stat: os.stat_result) -> None:
        row = (
            result.run_id,
            result.started_at,
            result.status,
            result.error_kind.value if result.error_kind else None,
            result.prompt[:PROMPT_PREVIEW],
            result.model,
            len(result.attempts),
            result.duration,
            stat.st_mtime_ns,
            stat.st_size,
            result.model_dump_json(),
        )
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
            self.db.commit()

    def _forget(self, run_id: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
            self.db.commit()

    def index_notebook(self, run_id: str) -> RunResult | None:
        """(Re)read one run from its notebook; None (and out of the index) when it has none."""
        path = notebook_path(self.notebooks_dir, run_id)
        try:
            stat = path.stat()
            result = record_from_notebook(path)
        except (OSError, ValueError, KeyError, nbformat.ValidationError) as e:
            if path.exists():
                log.warning("cannot read %s: %s", path, e)
            self._forget(run_id)
            return None
        self._put(result, stat)
        return result

    def sync(self, *, force: bool = True) -> None:
        """Make the index agree with the notebooks on disk. Cheap when nothing changed."""
        try:
            dir_mtime = self.notebooks_dir.stat().st_mtime_ns
        except OSError:
            return
        if not force and dir_mtime == self._seen_dir_mtime:
            return
        self._seen_dir_mtime = dir_mtime
        with self._lock:
            known = {
                r[0]: (r[1], r[2])
                for r in self.db.execute("SELECT run_id, nb_mtime, nb_size FROM runs")
            }
        on_disk: dict[str, tuple[int, int]] = {}
        with os.scandir(self.notebooks_dir) as entries:
            for entry in entries:
                run_id = entry.name.removesuffix(".ipynb")
                if entry.name.endswith(".ipynb") and is_valid_run_id(run_id) and entry.is_file():
                    st = entry.stat()
                    on_disk[run_id] = (st.st_mtime_ns, st.st_size)
        for run_id in known.keys() - on_disk.keys():
            self._forget(run_id)
        for run_id, stamp in on_disk.items():
            if known.get(run_id) != stamp and self._stamp(run_id) != stamp:
                self.index_notebook(run_id)

    def _stamp(self, run_id: str) -> tuple[int, int] | None:
        """What the index last saw of a notebook (a run may have been added meanwhile)."""
        with self._lock:
            row = self.db.execute(
                "SELECT nb_mtime, nb_size FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        return (row[0], row[1]) if row else None

    def list(
        self, *, limit: int, offset: int = 0, status: str | None = None
    ) -> tuple[list[RunSummary], int]:
        """A page of runs, newest first, and how many there are in all."""
        self.sync(force=False)
        where, args = ("WHERE status = ?", [status]) if status else ("", [])
        with self._lock:
            total = self.db.execute(f"SELECT count(*) FROM runs {where}", args).fetchone()[0]
            rows = self.db.execute(
                "SELECT run_id, started_at, status, error_kind, prompt, model, attempts, duration "
                f"FROM runs {where} ORDER BY started_at DESC, nb_mtime DESC, run_id DESC LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
        keys = (
            "run_id",
            "started_at",
            "status",
            "error_kind",
            "prompt",
            "model",
            "attempts",
            "duration",
        )
        return [RunSummary.model_validate(dict(zip(keys, row, strict=True))) for row in rows], total

    def get(self, run_id: str) -> RunResult | None:
        """The whole record, as long as its notebook is still there and unchanged."""
        if not is_valid_run_id(run_id):
            return None
        path = notebook_path(self.notebooks_dir, run_id)
        try:
            stat = path.stat()
        except OSError:
            self._forget(run_id)
            return None
        with self._lock:
            row = self.db.execute(
                "SELECT nb_mtime, nb_size, record FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        if row is not None and (row[0], row[1]) == (stat.st_mtime_ns, stat.st_size):
            return RunResult.model_validate_json(row[2])
        return self.index_notebook(run_id)


def record_from_notebook(path: Path) -> RunResult:
    """Rebuild a run record from its notebook.

    The run-level fields come from the notebook's metadata as written. Per attempt, code,
    output and timings come from the cells; the error text is the recorded traceback, which
    may word things differently from the message the run returned at the time.
    """
    nb = nbformat.read(path, as_version=4)
    meta: dict[str, Any] = dict(nb.metadata.get("autocoder") or {})
    if "run_id" not in meta or "status" not in meta:
        raise ValueError(f"{path.name} is not an autocoder run record")
    attempts: list[Attempt] = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            match = _HEADING.match(cell.source)
            if match:
                kind = match["kind"]
                attempts.append(
                    Attempt(
                        number=int(match["n"]),
                        status="error" if kind else "success",
                        error_kind=_kind(kind),
                        ename=match["ename"],
                        duration=float(match["duration"] or 0),
                    )
                )
            elif attempts and not attempts[-1].code and cell.source.startswith(">"):
                quoted = "\n".join(
                    line.removeprefix(">").removeprefix(" ") for line in cell.source.splitlines()
                )
                attempts[-1].error = attempts[-1].reply = quoted
            continue
        info = cell.get("metadata", {}).get("autocoder")
        if cell.cell_type != "code" or not info:
            continue
        if not attempts or attempts[-1].number != info.get("attempt"):
            attempts.append(
                Attempt(
                    number=int(info.get("attempt", len(attempts) + 1)),
                    status=info.get("status", "error"),
                )
            )
        _fill_attempt(attempts[-1], cell, info)
    last = attempts[-1] if attempts else None
    started_at = meta.get("started_at") or datetime.fromtimestamp(
        path.stat().st_mtime, timezone.utc
    ).isoformat(timespec="seconds")
    return RunResult(
        status=meta["status"],
        filename=meta.get("filename") or "",
        code=last.code if last else "",
        output=last.output if last else "",
        error=meta.get("error") or "",
        error_kind=_kind(meta.get("error_kind")),
        run_id=meta["run_id"],
        prompt=meta.get("prompt") or "",
        model=meta.get("model") or "",
        backend=meta.get("backend") or "",
        attempts=attempts,
        notebook=str(path),
        workdir=meta.get("workdir") or "",
        files=[RunFile.model_validate(f) for f in meta.get("files") or []],
        outputs=last.outputs if last else [],
        started_at=started_at,
        duration=float(meta.get("duration") or 0),
    )


def _fill_attempt(attempt: Attempt, cell: Any, info: dict[str, Any]) -> None:
    outputs = [dict(o) for o in cell.get("outputs", [])]
    stdout, stderr, text = texts(outputs)
    attempt.status = info.get("status", attempt.status)
    attempt.error_kind = _kind(info.get("error_kind")) or attempt.error_kind
    attempt.code = cell.source + ("\n" if cell.source and not cell.source.endswith("\n") else "")
    attempt.output, attempt.stderr = text, stderr
    attempt.outputs = outputs
    attempt.duration = float(info.get("duration") or attempt.duration)
    attempt.llm_duration = float(info.get("llm_duration") or 0)
    attempt.exec_duration = float(info.get("exec_duration") or 0)
    attempt.model = info.get("model") or ""
    attempt.filename = info.get("filename") or ""
    attempt.truncated = bool(info.get("truncated"))
    errors = [o for o in outputs if o.get("output_type") == "error"]
    if errors and attempt.status == "error":
        attempt.ename = attempt.ename or errors[-1].get("ename")
        attempt.error = clean_traceback(errors[-1].get("traceback") or []) or (
            f"{errors[-1].get('ename')}: {errors[-1].get('evalue')}"
        )
    elif attempt.status == "error" and attempt.error_kind is not None:
        attempt.error = attempt.error_kind.value.replace("_", " ")


def _kind(value: Any) -> ErrorKind | None:
    try:
        return ErrorKind(value) if value else None
    except ValueError:
        return None

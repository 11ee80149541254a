"""What every run store is and shares: the `Store` protocol the doors and the engine use, the
summaries and files it hands back, and the reading of the canonical run records both backends
index (`.autocoder/records/<run-id>.json`, written by the runner, left read-only)."""

from __future__ import annotations

import logging
import os
import stat as stat_mod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, Field

from autocoder.files import OpenedFile, open_beneath
from autocoder.notebook import is_valid_run_id, notebook_text, record_path
from autocoder.records import ErrorKind, Origin, RunResult

log = logging.getLogger(__name__)

PROMPT_PREVIEW = 300


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
    origin: Origin = Field(
        "model", description="`code` when the code was given (`POST /execute`), not written."
    )
    attempts: int = Field(description="How many attempts the run made.")
    duration: float = Field(description="Seconds the whole run took.")


@dataclass(frozen=True)
class StoredFile:
    """A run's notebook or produced file, as a store keeps it: a file on this machine, held
    open by descriptor (see `files.open_beneath`; the caller closes it), or its bytes (a
    shared store)."""

    name: str
    opened: OpenedFile | None = None
    data: bytes | None = None


class Store(Protocol):
    """What the service needs of a run store, whichever backend keeps it.

    Every method blocks; async callers use `asyncio.to_thread`. `lease` is how often the
    service must call `heartbeat` (None: never, one process owns the store).
    """

    lease: float | None

    @property
    def where(self) -> str: ...

    def check(self) -> None:
        """Before a server starts: the store can be reached, or one line says why not."""
        ...

    def open(self) -> None: ...

    def close(self) -> None: ...

    def begin(self, run_id: str, prompt: str, model: str) -> None: ...

    def heartbeat(self) -> list[str]: ...

    def kernel_started(self, kernel_id: str) -> None: ...

    def kernels_ended(self, kernel_ids: list[str]) -> None: ...

    def add(self, result: RunResult) -> None: ...

    def index_record(self, run_id: str) -> RunResult | None: ...

    def list(
        self, *, limit: int, offset: int = 0, status: str | None = None, q: str = ""
    ) -> tuple[list[RunSummary], int]: ...

    def get(self, run_id: str) -> RunResult | None: ...

    def notebook(self, run_id: str) -> StoredFile | None: ...

    def output_file(self, run_id: str, name: str) -> StoredFile | None: ...


INDEX_COLUMNS = (
    "run_id",
    "started_at",
    "status",
    "error_kind",
    "prompt",
    "model",
    "attempts",
    "duration",
    "origin",
)
"""What a list page reads: a RunSummary's fields, as both backends name their columns."""


def index_fields(result: RunResult) -> tuple[object, ...]:
    """The columns every store's index keeps of a run, in one order for both backends
    (`INDEX_COLUMNS`)."""
    return (
        result.run_id,
        result.started_at,
        result.status,
        result.error_kind.value if result.error_kind else None,
        result.prompt[:PROMPT_PREVIEW],
        result.model,
        len(result.attempts),
        result.duration,
        result.origin,
    )


def rebuilt_notebook(result: RunResult) -> StoredFile:
    """The notebook as the run made it, rebuilt from its read-only record: a user editing or
    deleting the notebook file changes nothing the API serves."""
    name = Path(result.notebook).name or f"{result.run_id}.ipynb"
    return StoredFile(name, data=notebook_text(result).encode())


def stored_output(autofile_dir: Path, run_id: str, name: str) -> StoredFile | None:
    """A file a run's code wrote, from the run's own directory, opened once."""
    if not is_valid_run_id(run_id):
        return None
    opened = open_beneath(autofile_dir / run_id / "files", name)
    return StoredFile(opened.name, opened=opened) if opened else None


def stat_is_regular(st: os.stat_result) -> bool:
    return stat_mod.S_ISREG(st.st_mode)


def read_record(notebooks_dir: Path, run_id: str) -> tuple[RunResult, os.stat_result] | None:
    """A run's record and its file's stat, or None when it has no valid one.

    The id is the file's name, never what the file says: a record whose content names
    another run is refused, and the log names the file only, never quotes its content.
    """
    path = record_path(notebooks_dir, run_id)
    try:
        stat = path.lstat()
        if not stat_is_regular(stat):
            raise ValueError("not a regular file")
        result = RunResult.model_validate_json(path.read_bytes())
        if result.run_id != run_id:
            raise ValueError("its run id does not match its file name")
    except (OSError, ValueError) as e:
        if path.exists() or path.is_symlink():
            reason = "unreadable" if isinstance(e, OSError) else "not a valid run record"
            log.warning("skipping run record %s: %s", path.name, reason)
        return None
    return result, stat

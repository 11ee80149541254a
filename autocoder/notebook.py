"""The run record: an nbformat v4 notebook that opens in Jupyter, and the attempt code files.

Everything here is written atomically (temp file in the same directory, fsync, rename), so a
crash or a full disk never leaves a half-written record behind.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from autocoder import __version__
from autocoder.records import Attempt, ErrorKind, RunResult

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
RUN_ID_CHARS = set("0123456789abcdefghijklmnopqrstuvwxyz-")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` all at once: readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def is_valid_run_id(run_id: str) -> bool:
    return 0 < len(run_id) <= 64 and set(run_id) <= RUN_ID_CHARS and not run_id.startswith("-")


def notebook_path(notebooks_dir: Path, run_id: str) -> Path:
    if not is_valid_run_id(run_id):
        raise ValueError(f"not a run id: {run_id!r}")
    return notebooks_dir / f"{run_id}.ipynb"


def _attempt_cells(attempt: Attempt, total: int) -> list[Any]:
    kind = attempt.error_kind.value if attempt.error_kind else None
    heading = f"**Attempt {attempt.number}/{total}** — "
    heading += "succeeded" if attempt.status == "success" else f"failed: `{kind}`"
    if attempt.ename:
        heading += f" ({attempt.ename})"
    heading += f" · {attempt.duration:.2f} s"
    cells: list[Any] = [new_markdown_cell(heading)]
    meta: dict[str, Any] = {
        "autocoder": {
            "attempt": attempt.number,
            "status": attempt.status,
            "error_kind": kind,
            "duration": round(attempt.duration, 4),
            "llm_duration": round(attempt.llm_duration, 4),
            "exec_duration": round(attempt.exec_duration, 4),
            "model": attempt.model,
            "truncated": attempt.truncated,
            "filename": attempt.filename,
        }
    }
    if attempt.status == "error":
        # A re-run of the notebook runs only the code that worked; Jupyter's "Run All" goes on.
        meta["tags"] = ["raises-exception", "skip-execution"]
    if (
        attempt.error_kind in {ErrorKind.EMPTY, ErrorKind.LLM, ErrorKind.CANCELLED}
        and not attempt.code
    ):
        text = attempt.reply.strip() or attempt.error
        cells.append(new_markdown_cell("> " + "\n> ".join(text.splitlines() or [""])))
        return cells
    cell = new_code_cell(source=attempt.code.rstrip("\n"), metadata=meta)
    cell.outputs = [nbformat.from_dict(o) for o in attempt.outputs]
    if attempt.status == "success":
        cell.execution_count = attempt.number
    cells.append(cell)
    return cells


def build_notebook(result: RunResult) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {
        "name": "python",
        "version": ".".join(map(str, sys.version_info[:3])),
        "mimetype": "text/x-python",
        "file_extension": ".py",
    }
    nb.metadata["autocoder"] = {
        "version": __version__,
        "run_id": result.run_id,
        "prompt": result.prompt,
        "model": result.model,
        "backend": result.backend,
        "status": result.status,
        "error_kind": result.error_kind.value if result.error_kind else None,
        "error": result.error,
        "attempts": len(result.attempts),
        "started_at": result.started_at,
        "duration": round(result.duration, 4),
        "filename": result.filename,
        "workdir": result.workdir,
        "files": [f.model_dump() for f in result.files],
    }
    status = "succeeded" if result.status == "success" else "failed"
    intro = f"# autocoder run `{result.run_id}`\n\n**Prompt**\n\n" + "\n".join(
        "> " + line for line in result.prompt.splitlines() or [""]
    )
    intro += (
        f"\n\nModel `{result.model or '?'}` ({result.backend or '?'}) · {status} after "
        f"{len(result.attempts)} attempt(s) · {result.duration:.2f} s"
    )
    nb.cells.append(new_markdown_cell(intro))
    for attempt in result.attempts:
        nb.cells.extend(_attempt_cells(attempt, len(result.attempts)))
    if result.files:
        nb.cells.append(files_cell(result))
    return nb


def files_cell(result: RunResult) -> Any:
    """A markdown list of the files the code wrote, linked by their download URL."""
    lines = ["**Files the code wrote**", ""]
    for f in result.files:
        lines.append(f"- [`{f.name}`]({f.url}) · {f.size:,} bytes · {f.media_type}")
    if result.workdir:
        lines += ["", f"Kept on the server in `{result.workdir}`."]
    return new_markdown_cell("\n".join(lines))


def write_notebook(result: RunResult, path: Path) -> Path:
    nb = build_notebook(result)
    nbformat.validate(nb)
    write_atomic(path, nbformat.writes(nb))
    return path


def read_notebook(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def result_from_notebook(path: Path) -> dict[str, Any]:
    """The run-level metadata of a saved notebook (enough to rebuild an index of runs)."""
    nb = read_notebook(path)
    meta = dict(nb.metadata.get("autocoder", {}))
    attempts = []
    for cell in nb.cells:
        info = cell.get("metadata", {}).get("autocoder")
        if cell.cell_type == "code" and info:
            attempts.append({**info, "code": cell.source})
    meta["attempt_records"] = attempts
    return meta

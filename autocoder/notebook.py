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
            # mkstemp makes the file 0600; give it the mode a plain open() would (umask applied).
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask; reading it means setting it, so it is put straight back."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def record_path(notebooks_dir: Path, run_id: str) -> Path:
    """Where a run's canonical record lives: a hidden folder no notebook editor writes into."""
    if not is_valid_run_id(run_id):
        raise ValueError(f"not a run id: {run_id!r}")
    return notebooks_dir / ".autocoder" / "records" / f"{run_id}.json"


def write_record(result: RunResult, notebooks_dir: Path) -> Path:
    """Write the full RunResult as JSON, atomically, then drop its write bits (read-only)."""
    path = record_path(notebooks_dir, result.run_id)
    write_atomic(path, result.model_dump_json(indent=1))
    path.chmod(path.stat().st_mode & ~0o222)
    return path


def is_valid_run_id(run_id: str) -> bool:
    return 0 < len(run_id) <= 64 and set(run_id) <= RUN_ID_CHARS and not run_id.startswith("-")


def notebook_path(notebooks_dir: Path, run_id: str) -> Path:
    if not is_valid_run_id(run_id):
        raise ValueError(f"not a run id: {run_id!r}")
    return notebooks_dir / f"{run_id}.ipynb"


NOTEBOOK_OUTPUT_CHARS = 20_000


def _cap(text: str, limit: int = NOTEBOOK_OUTPUT_CHARS) -> str:
    """Head and tail of a long text, with a line saying how much was cut from the middle."""
    if len(text) <= limit:
        return text
    half = limit // 2
    cut = len(text) - 2 * half
    return f"{text[:half]}\n… {cut:,} characters cut (the run record keeps them) …\n{text[-half:]}"


def _said(attempt: Attempt, timeout: float | None) -> str:
    """What an attempt hit, in words: a timeout is a limit, never a bare KeyboardInterrupt."""
    kind = attempt.error_kind.value if attempt.error_kind else None
    if attempt.status == "success":
        return "succeeded"
    if attempt.error_kind is ErrorKind.TIMEOUT:
        limit = f"{timeout:g} s" if timeout else "its time limit"
        return f"stopped after {limit} (timeout)"
    return f"failed: `{kind}`" + (f" ({attempt.ename})" if attempt.ename else "")


def _fence(text: str, lang: str = "") -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def _attempt_cells(attempt: Attempt, total: int, timeout: float | None) -> list[Any]:
    """A failed attempt is history (markdown, never executed); the success is a code cell.

    JupyterLab honours no skip tags, so only cells that are meant to run may be code cells:
    Run All then runs the answer and nothing else, in every front end.
    """
    kind = attempt.error_kind.value if attempt.error_kind else None
    heading = f"**Attempt {attempt.number}/{total}** — {_said(attempt, timeout)}"
    heading += f" · {attempt.duration:.2f} s"
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
        body = [f"<details><summary>{heading}</summary>\n"]
        if attempt.code:
            body.append(_fence(attempt.code, "python"))
        if attempt.output:
            body.append("Output:\n\n" + _fence(_cap(attempt.output)))
        error = attempt.error or (attempt.reply.strip() if not attempt.code else "")
        if error:
            body.append("Error:\n\n" + _fence(_cap(error)))
        body.append("</details>")
        return [new_markdown_cell("\n\n".join(body), metadata=meta)]
    cell = new_code_cell(source=attempt.code.rstrip("\n"), metadata=meta)
    cell.execution_count = 1
    outputs = []
    for o in attempt.outputs:
        out = nbformat.from_dict(dict(o))
        if out.get("output_type") == "execute_result":
            out["execution_count"] = 1
        if out.get("output_type") == "stream" and isinstance(out.get("text"), str):
            out["text"] = _cap(out["text"])
        outputs.append(out)
    cell.outputs = outputs
    return [new_markdown_cell(heading), cell]


def build_notebook(result: RunResult, *, timeout: float | None = None) -> nbformat.NotebookNode:
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
    first_line = (result.prompt.strip().splitlines() or [result.run_id])[0]
    title = first_line if len(first_line) <= 80 else first_line[:79] + "…"
    intro = f"# {title}\n\n**Prompt**\n\n" + "\n".join(
        "> " + line for line in result.prompt.splitlines() or [""]
    )
    intro += (
        f"\n\n**{status.capitalize()}** after {len(result.attempts)} attempt(s) · model "
        f"`{result.model or '?'}` ({result.backend or '?'}) · {result.duration:.2f} s · "
        f"started {result.started_at} · run `{result.run_id}`"
    )
    if result.attempts:
        intro += "\n\n" + "\n".join(f"{a.number}. {_said(a, timeout)}" for a in result.attempts)
    nb.cells.append(new_markdown_cell(intro))
    for attempt in result.attempts:
        nb.cells.extend(_attempt_cells(attempt, len(result.attempts), timeout))
    if result.files:
        nb.cells.append(files_cell(result))
    if result.status != "success":
        why = (result.error or "no attempt succeeded").strip().splitlines()[-1][:300]
        kind = result.error_kind.value if result.error_kind else "error"
        nb.cells.append(
            new_markdown_cell(
                f"**This run failed** ({kind}) after {len(result.attempts)} attempt(s): {why}"
            )
        )
        # Executing a failed run must fail too, so a notebook check in CI is never a false green.
        nb.cells.append(
            new_code_cell(
                f"raise RuntimeError({f'autocoder run {result.run_id} failed ({kind}): {why}'!r})"
            )
        )
    return nb


def files_cell(result: RunResult) -> Any:
    """A markdown list of the files the code wrote, linked by their download URL."""
    lines = ["**Files the code wrote**", ""]
    for f in result.files:
        lines.append(f"- [`{f.name}`]({f.url}) · {f.size:,} bytes · {f.media_type}")
    if result.workdir:
        lines += ["", f"Kept on the server in `{result.workdir}`."]
    return new_markdown_cell("\n".join(lines))


def write_notebook(result: RunResult, path: Path, *, timeout: float | None = None) -> Path:
    nb = build_notebook(result, timeout=timeout)
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

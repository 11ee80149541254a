"""A run's canonical JSON record and its notebook: the readable, runnable view of the run.

Everything here is written atomically (temp file in the same directory, fsync, rename), so a
crash or a full disk never leaves a half-written record behind. The pieces that build a
notebook (`summary_cell`, `attempt_cells`, `cap_text`, `cap_traceback`) are kept separate so
other views of runs (a session's notebook) can reuse them.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import stat
import tempfile
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import quote

from autocoder import __version__, examples, languages
from autocoder.records import Attempt, ErrorKind, RunResult, last_line

# Notebooks are built here as plain nbformat v4.5 JSON (dicts), not with nbformat: importing
# nbformat imports its validator, hence jsonschema, which compiles a grammar at import (2 s of
# every command's start), and nbformat's builders validate each cell and output as it is made
# (a run's cost on the server). tests/test_notebook.py validates every kind of notebook written
# here with nbformat itself.
Notebook = dict[str, Any]
Cell = dict[str, Any]
NBFORMAT, NBFORMAT_MINOR = 4, 5
# Besides text/*, the mimetypes nbformat's writer stores as a list of lines.
SPLIT_MIMES = frozenset({"application/javascript", "image/svg+xml"})


def new_notebook() -> Notebook:
    return {"nbformat": NBFORMAT, "nbformat_minor": NBFORMAT_MINOR, "metadata": {}, "cells": []}


def code_cell(source: str = "", **fields: Any) -> Cell:
    """A code cell; its id is set by `number_cells` once the notebook is whole."""
    return {
        "cell_type": "code",
        "id": "",
        "metadata": {},
        "execution_count": None,
        "source": source,
        "outputs": [],
        **fields,
    }


def markdown_cell(source: str = "", **fields: Any) -> Cell:
    return {"cell_type": "markdown", "id": "", "metadata": {}, "source": source, **fields}


def number_cells(nb: Notebook) -> Notebook:
    """Cell ids by position, not random: the same record always gives the same notebook."""
    for i, cell in enumerate(nb["cells"]):
        cell["id"] = f"cell-{i}"
    return nb


def notebook_json(nb: Notebook) -> str:
    """The notebook as nbformat's writer writes one (sorted keys, indent 1, multiline text as
    lists of lines), without changing `nb`."""
    cells = []
    for cell in nb["cells"]:
        cell = dict(cell)
        if isinstance(cell.get("source"), str):
            cell["source"] = cell["source"].splitlines(True)
        if cell["cell_type"] == "code":
            cell["outputs"] = [_split_output(out) for out in cell["outputs"]]
        cells.append(cell)
    return json.dumps(
        {**nb, "cells": cells}, indent=1, sort_keys=True, separators=(",", ": "), ensure_ascii=False
    )


def _split_output(out: dict[str, Any]) -> dict[str, Any]:
    out = dict(out)
    if out.get("output_type") in {"execute_result", "display_data"}:
        out["data"] = {
            key: value.splitlines(True)
            if isinstance(value, str) and (key.startswith("text/") or key in SPLIT_MIMES)
            else value
            for key, value in (out.get("data") or {}).items()
        }
    elif out.get("output_type") == "stream" and isinstance(out.get("text"), str):
        out["text"] = out["text"].splitlines(True)
    return out


KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
RUN_ID_CHARS = set("0123456789abcdefghijklmnopqrstuvwxyz-")


def write_atomic(path: Path, data: str | bytes, *, mode: int | None = None) -> None:
    """Replace `path` with `data` all at once: readers see the old file or the new, never half.
    The file gets `mode`, or the mode a plain open() would give it (the umask applied)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file 0600.
            os.fchmod(f.fileno(), 0o666 & ~_umask() if mode is None else mode)
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


SLUG_CHARS = 48
_STAMPED_ID = re.compile(r"^(\d{8}-\d{6})-([0-9a-z]+)$")
_NOTEBOOK_NAME = re.compile(r"^[0-9a-z][0-9a-z-]{0,150}\.ipynb$")


def slugify(text: str, limit: int = SLUG_CHARS) -> str:
    """`Plot a sine wave!` -> `plot-a-sine-wave`: ASCII letters, digits and single dashes only.

    Cut at a word boundary within `limit` characters; empty when nothing ASCII is left.
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    slug = ""
    for word in words:
        longer = f"{slug}-{word}" if slug else word
        if len(longer) > limit:
            if not slug:
                slug = word[:limit]
            break
        slug = longer
    return slug


def notebook_name(run_id: str, prompt: str = "") -> str:
    """`<date>-<time>-<slug-of-prompt>-<short-id>.ipynb`, as unique as the run id.

    The name keeps every part of the run id (date, time, short id), so two runs never share a
    notebook. An id of another shape is followed by the slug; a prompt with nothing ASCII to
    make a slug of gives `<run-id>.ipynb`, the name every run had before.
    """
    if not is_valid_run_id(run_id):
        raise ValueError(f"not a run id: {run_id!r}")
    slug = slugify(prompt)
    if not slug:
        return f"{run_id}.ipynb"
    stamped = _STAMPED_ID.match(run_id)
    if stamped:
        return f"{stamped.group(1)}-{slug}-{stamped.group(2)}.ipynb"
    return f"{run_id}-{slug}.ipynb"


FILES_SUFFIX = "_files"


def files_folder(notebook: str | Path) -> str:
    """The folder beside a notebook that holds its run's files (`<name>_files`, as nbconvert
    names the folder of a notebook's resources): what the run was given and what it wrote."""
    return Path(notebook).stem + FILES_SUFFIX


def setup_cell(language: str, folder: str) -> Cell:
    """The first code cell of a notebook whose code works with files: it enters the folder
    beside the notebook, as a Jupyter kernel starts in the notebook's own folder."""
    return code_cell(
        languages.get(language).enter_dir(folder),
        metadata={"autocoder": {"setup": "files", "folder": folder}},
    )


def notebook_path(notebooks_dir: Path, run_id: str, prompt: str = "") -> Path:
    """Where a run's notebook is written (see `notebook_name`)."""
    return notebooks_dir / notebook_name(run_id, prompt)


def find_notebook(notebooks_dir: Path, run_id: str, recorded: str = "") -> Path | None:
    """A run's notebook, as a regular file directly inside `notebooks_dir`, or None.

    `recorded` is the path the run's record names; only its file name is used, looked up in
    `notebooks_dir`, so a notebooks folder that was moved or copied still serves its notebooks
    and no record can point a reader anywhere else. Symlinks are refused. Runs saved before
    notebooks were named after their prompt are found as `<run-id>.ipynb`.
    """
    if not is_valid_run_id(run_id):
        return None
    names = [Path(recorded).name] if recorded else []
    names.append(f"{run_id}.ipynb")
    for name in names:
        if not _NOTEBOOK_NAME.match(name) or not names_run(name, run_id):
            continue
        path = notebooks_dir / name
        try:
            if stat.S_ISREG(path.lstat().st_mode):
                return path
        except OSError:
            continue
    return None


def names_run(name: str, run_id: str) -> bool:
    """Whether a notebook file name is one `notebook_name` gives this run."""
    stem = name.removesuffix(".ipynb")
    if stem == run_id:
        return True
    stamped = _STAMPED_ID.match(run_id)
    if stamped:
        date_time, short_id = stamped.groups()
        return stem.startswith(f"{date_time}-") and stem.endswith(f"-{short_id}")
    return stem.startswith(f"{run_id}-")


NOTEBOOK_OUTPUT_CHARS = 10_000
NOTEBOOK_OUTPUT_LINES = 120
"""How much of one output a notebook shows (head and tail); the record keeps all of it."""
SHOWN_ERROR_CHARS = 160
_FRAME_LINE = re.compile(r"^\s*(?:File |Cell In\[)")
_MAX_PERIOD = 8


def cap_text(
    text: str, chars: int = NOTEBOOK_OUTPUT_CHARS, lines: int = NOTEBOOK_OUTPUT_LINES
) -> str:
    """Head and tail of a long text, with a line saying how much was cut from the middle.

    Bounded in lines as well as characters, so a notebook stays a page a person can scroll.
    """
    split = text.splitlines(keepends=True)
    if len(split) > lines:
        half = lines // 2
        cut = len(split) - 2 * half
        text = (
            "".join(split[:half])
            + f"… {cut:,} lines cut (the run record keeps them) …\n"
            + "".join(split[-half:])
        )
    if len(text) <= chars:
        return text
    half = chars // 2
    cut = len(text) - 2 * half
    return f"{text[:half]}\n… {cut:,} characters cut (the run record keeps them) …\n{text[-half:]}"


def fold_recursion(text: str) -> str:
    """Fold the frames of a traceback that repeat (a recursion, direct or mutual) into one line.

    `... N more frames of the same recursion ...` replaces all but the first round, so a
    977-frame RecursionError reads as the few frames that matter and the error.
    """
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if _FRAME_LINE.match(line)]
    if len(starts) < 3:
        return text
    frames = ["\n".join(lines[a:b]) for a, b in zip(starts, [*starts[1:], len(lines)], strict=True)]
    out = lines[: starts[0]]
    i = 0
    while i < len(frames):
        best_rounds, best_period = 1, 1
        for period in range(1, _MAX_PERIOD + 1):
            cycle = frames[i : i + period]
            rounds = 1
            while frames[i + rounds * period : i + (rounds + 1) * period] == cycle:
                rounds += 1
            if rounds >= 3 and rounds * period > best_rounds * best_period:
                best_rounds, best_period = rounds, period
        if best_rounds >= 3:
            out.extend(frames[i : i + best_period])
            folded = (best_rounds - 1) * best_period
            out.append(f"... {folded:,} more frames of the same recursion ...")
            i += best_rounds * best_period
        else:
            out.append(frames[i])
            i += 1
    return "\n".join(out)


def cap_traceback(text: str) -> str:
    """A traceback as a notebook shows it: recursion folded, then head and tail."""
    return cap_text(fold_recursion(text))


def said(attempt: Attempt, timeout: float | None) -> str:
    """What an attempt hit, in words: a timeout is a limit, never a bare KeyboardInterrupt."""
    kind = attempt.error_kind
    if attempt.status == "success":
        return "succeeded"
    if kind is ErrorKind.TIMEOUT:
        limit = f"{timeout:g} s" if timeout else "its time limit"
        return f"stopped after {limit} (timeout)"
    if kind is ErrorKind.EMPTY:
        return "no code in the model's reply (empty)"
    if kind is ErrorKind.UNCERTAIN:
        return f"not sure (uncertain): {agree_line(attempt)}"
    name = kind.value if kind else "error"
    last = error_line(attempt.error) or attempt.ename or ""
    return f"failed ({name})" + (f": `{last}`" if last else "")


def error_line(error: str) -> str:
    """The line of an error that says what went wrong (its last), bounded, for one line of text."""
    return last_line(error, SHOWN_ERROR_CHARS).replace("`", "'")


def md_escape(text: str) -> str:
    """Text shown as itself in markdown: no emphasis, links, headings or HTML of its own."""
    return re.sub(r"([\\`*_\[\]<>#|~!])", r"\\\1", text)


def _fence(text: str, lang: str = "") -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def agree_line(attempt: Attempt) -> str:
    """`4 of 5 candidates agree`: how many of an attempt's candidates produced its answer."""
    drawn = 1 + len(attempt.others)
    if attempt.group != 1:
        return f"none of {drawn} candidates ran cleanly"
    agree = sum(1 for a in (attempt, *attempt.others) if a.group == 1)
    return f"{agree} of {drawn} candidates agree"


def attempt_cells(attempt: Attempt, total: int, timeout: float | None) -> list[Cell]:
    """A failed attempt is history (markdown, never executed); the answer is a code cell.

    JupyterLab honours no skip tags, so only cells that are meant to run may be code cells:
    Run All then runs the answer and nothing else, in every front end. The answer is the
    notebook's first execution, `[1]`, and so are its results. An uncertain answer is one too
    (the run's last cell, which fails, says why it is not to be trusted). An attempt's other
    candidates follow it, collapsed, as failed attempts are.
    """
    kind = attempt.error_kind.value if attempt.error_kind else None
    heading = f"**Attempt {attempt.number}/{total}** — {said(attempt, timeout)}"
    if attempt.others and attempt.status == "success":
        heading += f" · {agree_line(attempt)}"
    if attempt.examples and attempt.status == "success":
        heading += f" · {examples.held(attempt.examples)}"
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
            "candidate": attempt.candidate,
            "candidates": 1 + len(attempt.others),
            "examples": attempt.examples,
        }
    }
    others = [candidates_cell(attempt, timeout)] if attempt.others else []
    if attempt.status == "error" and attempt.error_kind is not ErrorKind.UNCERTAIN:
        # Markdown is not rendered inside <summary>: its line is HTML, escaped.
        plain = f"{said(attempt, timeout).replace('`', '')} · {attempt.duration:.2f} s"
        summary = f"<b>Attempt {attempt.number}/{total}</b> — {html.escape(plain)}"
        body = [f"<details><summary>{summary}</summary>\n"]
        if attempt.code:
            body.append(_fence(attempt.code, languages.get(attempt.language).fences[0]))
        if attempt.output:
            body.append("Output:\n\n" + _fence(cap_text(attempt.output)))
        error = attempt.error or (attempt.reply.strip() if not attempt.code else "")
        if error:
            body.append("Error:\n\n" + _fence(cap_traceback(error)))
        body.append("</details>")
        return [markdown_cell("\n\n".join(body), metadata=meta), *others]
    cell = code_cell(
        attempt.code.rstrip("\n"),
        metadata=meta,
        execution_count=1,
        outputs=[notebook_output(o, execution_count=1) for o in attempt.outputs],
    )
    return [markdown_cell(heading), cell, *others]


def candidates_cell(attempt: Attempt, timeout: float | None) -> Cell:
    """An attempt's other candidates, collapsed: each one's code, output or error, and whether
    it produced the attempt's answer."""
    plain = f"{agree_line(attempt)}; the others of attempt {attempt.number}"
    body = [f"<details><summary>{html.escape(plain)}</summary>\n"]
    fences = languages.get(attempt.language).fences[0]
    for other in attempt.others:
        if other.group == 1:
            verdict = "same result as the answer"
        elif other.group:
            verdict = f"a different result (group {other.group})"
        else:
            verdict = said(other, timeout)
        body.append(f"**Candidate {other.candidate}** — {verdict}")
        if other.code:
            body.append(_fence(other.code, fences))
        if other.output:
            body.append("Output:\n\n" + _fence(cap_text(other.output)))
        if other.status == "error" and other.error:
            body.append("Error:\n\n" + _fence(cap_traceback(other.error)))
    body.append("</details>")
    meta = {
        "autocoder": {
            "attempt": attempt.number,
            "candidates": [
                {"candidate": o.candidate, "group": o.group, "status": o.status}
                for o in attempt.others
            ],
        }
    }
    return markdown_cell("\n\n".join(body), metadata=meta)


def notebook_output(output: dict[str, Any], *, execution_count: int | None) -> dict[str, Any]:
    """One recorded output as a notebook shows it: text capped, results numbered as their cell."""
    out = dict(output)
    kind = out.get("output_type")
    if kind == "execute_result":
        out["execution_count"] = execution_count
    if kind == "stream" and isinstance(out.get("text"), str):
        out["text"] = cap_text(out["text"])
    elif kind == "error":
        tb = cap_traceback("\n".join(out.get("traceback") or []))
        out["traceback"] = tb.splitlines()
    elif kind in {"execute_result", "display_data"}:
        data = dict(out.get("data") or {})
        if isinstance(data.get("text/plain"), str):
            data["text/plain"] = cap_text(data["text/plain"])
        out["data"] = data
    return out


def title_of(result: RunResult) -> str:
    """The first line of the prompt, short enough for a heading (the run id without one);
    code given is titled by its first line."""
    if result.origin == "code" and not result.prompt.strip():
        lines = [line.strip() for line in result.code.splitlines() if line.strip()]
        first = f"Code given: {lines[0]}" if lines else f"Code given ({result.run_id})"
    else:
        first = (result.prompt.strip().splitlines() or [result.run_id])[0].strip()
    return first if len(first) <= 80 else first[:79] + "…"


def summary_cell(result: RunResult, *, timeout: float | None = None) -> Cell:
    """The title, the prompt, and how the run went: status, attempts, model, time, each attempt."""
    status = "succeeded" if result.status == "success" else "failed"
    if result.error_kind is ErrorKind.UNCERTAIN:
        status = "not sure"
    if result.origin == "code":
        intro = (
            f"# {md_escape(title_of(result))}\n\n**Code given**, run as it is: no model wrote "
            f"it, and it was not retried · {result.duration:.2f} s · started "
            f"{result.started_at} · run `{result.run_id}`"
        )
        if not result.attempts and result.error:
            intro += f"\n\nIt did not run: `{error_line(result.error)}`"
        return markdown_cell(intro)
    intro = f"# {md_escape(title_of(result))}\n\n**Prompt**\n\n" + "\n".join(
        "> " + md_escape(line) for line in result.prompt.splitlines() or [""]
    )
    intro += (
        f"\n\n**{status.capitalize()}** after {len(result.attempts)} attempt(s)"
        + (
            f" · {result.agreement} of {result.candidates} candidates agree"
            if result.candidates > 1
            else ""
        )
        + " · model "
        f"`{result.model or '?'}` ({result.backend or '?'}) · {result.duration:.2f} s · "
        f"started {result.started_at} · run `{result.run_id}`"
    )
    if result.attempts:
        intro += "\n\n" + "\n".join(
            f"{a.number}. {said(a, timeout)} · {a.duration:.2f} s" for a in result.attempts
        )
    elif result.error:
        intro += f"\n\nNo attempt ran: `{error_line(result.error)}`"
    return markdown_cell(intro)


def failed_cells(result: RunResult, *, timeout: float | None = None) -> list[Cell]:
    """A failed run's last cells: why it failed, and a cell that fails when executed.

    Executing a failed run must fail too, so a notebook check in CI is never a false green.
    """
    last = result.attempts[-1] if result.attempts else None
    kind = result.error_kind.value if result.error_kind else "error"
    if last is not None and last.error_kind is result.error_kind and result.error_kind:
        why = said(last, timeout)
    else:
        why = error_line(result.error or "no attempt succeeded")
    plain = why.replace("`", "")
    if result.error_kind is ErrorKind.UNCERTAIN:
        # The whole of it: the alternatives are named there.
        said_all = md_escape(result.error)
        heading = f"**This run is not sure of its answer** ({kind}): {said_all}"
    else:
        heading = f"**This run failed** ({kind}) after {len(result.attempts)} attempt(s): {why}"
    return [
        markdown_cell(heading),
        code_cell(
            languages.get(result.language).fail(f"autocoder run {result.run_id} failed: {plain}")
        ),
    ]


def language_info(language: str = "python") -> dict[str, Any]:
    """All of what the kernel reports (ipykernel's for Python), so a front end that starts
    the kernel changes nothing."""
    return dict(languages.get(language).language_info)


def build_notebook(result: RunResult, *, timeout: float | None = None) -> Notebook:
    """The run as a notebook; a function of its record alone (`timeout` defaults to the
    record's), so the notebook as the run made it can be rebuilt from the record."""
    if timeout is None:
        timeout = result.timeout
    nb = new_notebook()
    lang = languages.get(result.language)
    meta = nb["metadata"]
    meta["kernelspec"] = dict(lang.kernelspec)
    meta["language_info"] = language_info(lang.name)
    meta["title"] = title_of(result)
    meta["autocoder"] = {
        "version": __version__,
        "run_id": result.run_id,
        "prompt": result.prompt,
        "origin": result.origin,
        "language": result.language,
        "model": result.model,
        "backend": result.backend,
        "status": result.status,
        "error_kind": result.error_kind.value if result.error_kind else None,
        "error": result.error,
        "attempts": len(result.attempts),
        "candidates": result.candidates,
        "agreement": result.agreement,
        "started_at": result.started_at,
        "duration": round(result.duration, 4),
        "filename": result.filename,
        "workdir": result.workdir,
        "files": [f.model_dump() for f in result.files],
    }
    cells: list[Cell] = nb["cells"]
    cells.append(summary_cell(result, timeout=timeout))
    # A run that was given files or wrote some has them in a folder beside its notebook.
    folder = files_folder(result.notebook) if result.workdir and result.notebook else None
    if folder:
        cells.append(setup_cell(result.language, folder))
    for i, attempt in enumerate(result.attempts, 1):
        if i == len(result.attempts) and not attempt.outputs:
            # A record keeps only the last attempt's outputs, as the result's.
            attempt = attempt.model_copy(update={"outputs": result.outputs})
        cells.extend(attempt_cells(attempt, len(result.attempts), timeout))
    if result.files:
        cells.append(files_cell(result, folder))
    if result.status != "success":
        cells.extend(failed_cells(result, timeout=timeout))
    return number_cells(nb)


def files_cell(result: RunResult, folder: str | None = None) -> Cell:
    """A markdown list of the files the code wrote, linked by their path relative to the
    notebook (inside `folder`), which any Jupyter front end opens from where the notebook is;
    a root-relative `/runs/...` link would go to that front end's own server instead."""
    lines = ["**Files the code wrote**", ""]
    for f in result.files:
        named = f"[`{f.name}`]({quote(f'{folder}/{f.name}')})" if folder else f"`{f.name}`"
        lines.append(f"- {named} · {f.size:,} bytes · {f.media_type}")
    if folder:
        lines += ["", f"In the folder `{folder}` beside this notebook."]
    if result.workdir:
        lines += ["", f"Kept on the server in `{result.workdir}`."]
    return markdown_cell("\n".join(lines))


def notebook_text(result: RunResult, *, timeout: float | None = None) -> str:
    return notebook_json(build_notebook(result, timeout=timeout))


def write_notebook(result: RunResult, path: Path, *, timeout: float | None = None) -> Path:
    write_atomic(path, notebook_text(result, timeout=timeout))
    return path


def read_notebook(path: Path) -> Any:
    """A notebook as nbformat reads it (any version, converted to v4)."""
    import nbformat  # start-up time: reading notebooks is rare, see Notebook above

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

"""The notebook a person opens: named after the prompt, titled, summarised, bounded, findable."""

from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path

import nbformat
import pytest

from autocoder.kernel.output import OutputCollector
from autocoder.notebook import (
    build_notebook,
    cap_text,
    find_notebook,
    fold_recursion,
    notebook_json,
    notebook_name,
    notebook_path,
    slugify,
    write_notebook,
)
from autocoder.records import Attempt, ErrorKind, RunFile, RunResult, SessionInfo, SessionRun
from autocoder.sessions import build_session_notebook

SAFE_NAME = re.compile(r"^\d{8}-\d{6}-[a-z0-9]+(-[a-z0-9]+)*-[0-9a-f]{6}\.ipynb$")


def a_retried_run(run_id: str = "20261203-061500-a1b2c3", **changes: object) -> RunResult:
    failed = Attempt(
        number=1,
        status="error",
        code="print(1/0)\n",
        error="Traceback (most recent call last):\nZeroDivisionError: division by zero",
        error_kind=ErrorKind.EXCEPTION,
        ename="ZeroDivisionError",
        duration=0.4,
    )
    ok = Attempt(
        number=2,
        status="success",
        code="6 * 7\n",
        output="42\n",
        duration=0.3,
        outputs=[
            {
                "output_type": "execute_result",
                "execution_count": 2,
                "data": {"text/plain": "42"},
                "metadata": {},
            }
        ],
    )
    values: dict[str, object] = {
        "status": "success",
        "code": ok.code,
        "output": ok.output,
        "run_id": run_id,
        "prompt": "Compute *the* answer to <everything>\nand show it",
        "model": "scripted",
        "backend": "openai",
        "attempts": [failed, ok],
        "started_at": "2026-12-03T06:15:00+00:00",
        "duration": 0.8,
    }
    values.update(changes)
    return RunResult.model_validate(values)


@pytest.mark.parametrize(
    "prompt",
    [
        "Plot a sine wave!",
        "Zeichne eine Sinuswelle für Ärger-Öl — bitte",
        "../../etc/passwd; rm -rf / && echo $HOME `id`",
        "x" * 500,
        "a " * 400,
        "CON AUX nul .ipynb",
    ],
)
def test_a_notebook_is_named_after_its_prompt_in_safe_ascii(prompt: str) -> None:
    name = notebook_name("20261203-061500-a1b2c3", prompt)

    assert SAFE_NAME.match(name), name
    assert name.startswith("20261203-061500-") and name.endswith("-a1b2c3.ipynb")
    assert len(name) <= 16 + 48 + 7 + 6
    assert name.isascii() and "/" not in name and ".." not in name


def test_names_read_like_the_prompt_and_stay_unique() -> None:
    assert notebook_name("20261203-061500-a1b2c3", "Plot a sine wave!") == (
        "20261203-061500-plot-a-sine-wave-a1b2c3.ipynb"
    )
    assert slugify("Zeichne eine Sinuswelle für Ärger") == "zeichne-eine-sinuswelle-fur-arger"
    # The same prompt in the same second: the short id keeps the two apart.
    same = {notebook_name(f"20261203-061500-{h}", "plot it") for h in ("a1b2c3", "d4e5f6")}
    assert len(same) == 2
    # Nothing ASCII to make a slug of: the run id alone, as older runs were named.
    assert (
        notebook_name("20261203-061500-a1b2c3", "正弦波を描く 🎉") == "20261203-061500-a1b2c3.ipynb"
    )
    assert notebook_name("some-run", "plot it") == "some-run-plot-it.ipynb"
    with pytest.raises(ValueError):
        notebook_name("../etc", "plot it")


def test_the_notebook_is_found_where_its_record_says_and_nowhere_else(tmp_path: Path) -> None:
    run = a_retried_run()
    path = write_notebook(run, notebook_path(tmp_path, run.run_id, run.prompt))
    assert find_notebook(tmp_path, run.run_id, str(path)) == path
    # A notebooks folder that moved still serves its notebooks: the name is what counts.
    assert find_notebook(tmp_path, run.run_id, f"/old/place/{path.name}") == path
    # An older run's notebook is `<run-id>.ipynb`.
    older = write_notebook(run, tmp_path / "20261201-080000-0f0f0f.ipynb")
    assert find_notebook(tmp_path, "20261201-080000-0f0f0f", "") == older
    # A record never points a reader outside the folder, at another run, or through a link.
    outside = tmp_path.parent / f"{tmp_path.name}-outside.ipynb"
    outside.write_text("{}")
    for recorded in (str(outside), "../outside.ipynb", "/etc/passwd", older.name):
        assert find_notebook(tmp_path, "20261203-061500-d4e5f6", recorded) is None
    link = tmp_path / "20261203-061500-d4e5f6.ipynb"
    link.symlink_to(path)
    assert find_notebook(tmp_path, "20261203-061500-d4e5f6", str(link)) is None
    assert find_notebook(tmp_path, "not/an/id", str(path)) is None


def test_the_top_of_the_notebook_says_what_happened() -> None:
    run = a_retried_run()
    nb = nbformat.from_dict(build_notebook(run, timeout=10))

    summary = nb.cells[0].source
    assert summary.startswith("# Compute \\*the\\* answer to \\<everything\\>\n")
    assert nb.metadata.title == "Compute *the* answer to <everything>"
    assert "**Succeeded** after 2 attempt(s) · model `scripted` (openai)" in summary
    assert "1. failed (exception): `ZeroDivisionError: division by zero` · 0.40 s" in summary
    assert "2. succeeded · 0.30 s" in summary
    # A failed attempt is collapsed history whose one line is HTML (markdown is not rendered
    # inside <summary>).
    history = nb.cells[1].source
    assert history.startswith(
        "<details><summary><b>Attempt 1/2</b> — failed (exception): "
        "ZeroDivisionError: division by zero · 0.40 s</summary>"
    )
    # One code cell, the answer, numbered [1] like its result.
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [1]
    assert [o.execution_count for o in code[0].outputs] == [1]


def test_a_failed_run_ends_saying_why_and_a_timeout_is_a_limit() -> None:
    attempt = Attempt(
        number=1,
        status="error",
        code="while True: pass\n",
        error="timed out after 10 s",
        error_kind=ErrorKind.TIMEOUT,
        ename="KeyboardInterrupt",
    )
    run = a_retried_run(
        status="error",
        attempts=[attempt],
        error="timed out after 10 s",
        error_kind=ErrorKind.TIMEOUT,
    )
    nb = nbformat.from_dict(build_notebook(run, timeout=10))

    assert "1. stopped after 10 s (timeout)" in nb.cells[0].source
    said, raising = nb.cells[-2:]
    assert said.source == (
        "**This run failed** (timeout) after 1 attempt(s): stopped after 10 s (timeout)"
    )
    assert raising.cell_type == "code" and raising.execution_count is None
    assert raising.source.startswith("raise RuntimeError(") and not raising.outputs
    assert "KeyboardInterrupt" not in nbformat.writes(nb)


def mutual_recursion_traceback(depth: int) -> str:
    def ping(n: int) -> int:
        return pong(n - 1) if n else 1 // 0

    def pong(n: int) -> int:
        return ping(n - 1)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 500)
    try:
        ping(depth)
    except ZeroDivisionError as e:
        return "".join(traceback.format_exception(e))
    finally:
        sys.setrecursionlimit(limit)
    raise AssertionError("unreachable")


def test_recursion_frames_fold_into_one_line() -> None:
    text = mutual_recursion_traceback(976)
    assert text.count('  File "') >= 977

    folded = fold_recursion(text)
    assert re.search(r"\.\.\. 9\d\d more frames of the same recursion \.\.\.", folded)
    assert folded.count('  File "') < 10
    assert folded.endswith("ZeroDivisionError: integer division or modulo by zero\n".rstrip("\n"))
    assert fold_recursion("Traceback:\nValueError: nope") == "Traceback:\nValueError: nope"


def test_long_outputs_keep_their_head_and_tail_and_say_what_was_cut() -> None:
    text = "".join(f"line {n}\n" for n in range(10_000))
    shown = cap_text(text)
    assert shown.startswith("line 0\n") and shown.endswith("line 9999\n")
    assert "… 9,880 lines cut (the run record keeps them) …" in shown
    assert len(shown.splitlines()) == 121
    wide = cap_text("x" * 1_000_000)
    assert len(wide) < 10_100 and "990,000 characters cut" in wide


def test_a_flood_and_a_deep_recursion_make_a_short_notebook(tmp_path: Path) -> None:
    flood = Attempt(
        number=1,
        status="error",
        code="print('x' * 10**6)\n",
        output="x" * 1_000_000 + "\n",
        error="output exceeded 1,000,000 bytes (AUTOCODER_MAX_OUTPUT_BYTES) and was cut",
        error_kind=ErrorKind.OUTPUT_LIMIT,
    )
    deep = Attempt(
        number=2,
        status="error",
        code="ping(976)\n",
        error=mutual_recursion_traceback(976),
        error_kind=ErrorKind.EXCEPTION,
        ename="ZeroDivisionError",
    )
    run = a_retried_run(attempts=[flood, deep, a_retried_run().attempts[1]])
    path = write_notebook(run, tmp_path / "run.ipynb")

    assert path.stat().st_size < 40_000
    text = path.read_text()
    assert text.count("\\n") < 600  # lines a reader scrolls through, at most


# Every kind of notebook autocoder writes, built without nbformat (see autocoder.notebook), is
# checked here with nbformat's own validator and writer.

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def kernel_outputs() -> list[dict[str, object]]:
    """What a kernel sends, the odd along with the usual, as the collector keeps it."""
    collector = OutputCollector(limit=1_000_000)
    messages = [
        ("stream", {"name": "stdout", "text": "one\ntwo\n"}),
        ("stream", {"name": "stderr", "text": "careful\n"}),
        (
            "display_data",
            {
                "data": {"image/png": PNG, "text/plain": "<Figure size 640x480 with 1 Axes>"},
                "metadata": {"image/png": {"width": 1}},
                "transient": {"display_id": "x"},
            },
        ),
        ("display_data", {"data": {"text/html": ["<b>", "bold</b>"], "text/plain": 5}}),
        ("display_data", {"data": {"application/json": {"a": [1, 2]}}, "metadata": None}),
        ("display_data", {"data": "not a bundle"}),
        ("execute_result", {"data": {"text/plain": "42"}, "metadata": {}, "execution_count": 3}),
        ("execute_result", {"data": {"text/plain": "43"}, "execution_count": "three"}),
        ("stream", {"name": "stdin", "text": 7}),
        ("error", {"ename": "ValueError", "evalue": "no", "traceback": ["tb", 1]}),
    ]
    for kind, content in messages:
        collector.add({"msg_type": kind, "header": {"msg_type": kind}, "content": content})
    return collector.finish()


def every_kind_of_run() -> list[RunResult]:
    outputs = kernel_outputs()
    plain = a_retried_run()
    shown = a_retried_run(outputs=outputs, attempts=[a_retried_run().attempts[1]])
    timed_out = Attempt(
        number=1,
        status="error",
        code="while True: pass\n",
        error="timed out after 10 s",
        error_kind=ErrorKind.TIMEOUT,
        outputs=outputs,
    )
    failed = a_retried_run(
        status="error", attempts=[timed_out], error="timed out", error_kind=ErrorKind.TIMEOUT
    )
    no_attempt = a_retried_run(
        status="error", attempts=[], error="cannot reach the model", error_kind=ErrorKind.LLM
    )
    other = a_retried_run().attempts[1].model_copy(update={"candidate": 2, "group": 2})
    uncertain = a_retried_run(
        status="error",
        error_kind=ErrorKind.UNCERTAIN,
        error="the candidates disagree: 42 or 41",
        candidates=2,
        attempts=[
            a_retried_run()
            .attempts[1]
            .model_copy(
                update={"error_kind": ErrorKind.UNCERTAIN, "status": "error", "others": [other]}
            )
        ],
    )
    with_files = a_retried_run(
        notebook="/notebooks/20261203-061500-a1b2c3.ipynb",
        workdir="/work/20261203-061500-a1b2c3",
        files=[
            RunFile(name="plot.png", size=10, media_type="image/png", url="/runs/x/files/plot.png")
        ],
    )
    bash = a_retried_run(
        language="bash",
        attempts=[
            a_retried_run().attempts[1].model_copy(update={"language": "bash", "code": "echo hi"})
        ],
    )
    return [plain, shown, failed, no_attempt, uncertain, with_files, bash]


@pytest.mark.parametrize("run", every_kind_of_run(), ids=lambda r: f"{r.status}-{r.error_kind}")
def test_every_kind_of_run_notebook_is_valid_and_written_as_nbformat_writes_it(
    run: RunResult, tmp_path: Path
) -> None:
    text = write_notebook(run, tmp_path / "run.ipynb").read_text()

    nb = nbformat.reads(text, as_version=4)
    nbformat.validate(nb)
    assert text == nbformat.writes(nbformat.from_dict(build_notebook(run)))


def test_a_session_notebook_is_valid_whatever_its_runs_did() -> None:
    ok = a_retried_run(outputs=kernel_outputs())
    runs = [
        SessionRun(run_id=ok.run_id, prompt="load it", status="success"),
        SessionRun(
            run_id="20261203-061600-d4e5f6",
            prompt="loop",
            status="error",
            error_kind=ErrorKind.TIMEOUT,
            state_lost=True,
        ),
        SessionRun(run_id=ok.run_id, prompt="again", status="success", state_lost=True),
    ]
    info = SessionInfo(
        session_id="s1",
        status="open",
        created_at="2026-12-03T06:15:00+00:00",
        last_used_at="2026-12-03T06:16:00+00:00",
        expires_at="2026-12-03T07:16:00+00:00",
        notebook="/notebooks/sessions/s1.ipynb",
        workdir="/work/s1",
        runs=runs,
    )
    for folder in (None, "s1_files"):
        nb = build_session_notebook(info, [ok, None, ok], files_folder=folder)

        read = nbformat.reads(notebook_json(nb), as_version=4)
        nbformat.validate(read)
        assert notebook_json(nb) == nbformat.writes(nbformat.from_dict(nb))
        assert [c.source for c in read.cells if c.cell_type == "code"][-2:] == [
            "%reset -f",
            "6 * 7",
        ]

"""Running code as it is given, no model: what an agent that writes its own code uses.

`Engine.execute` is a run of one attempt through the run loop: a real sandboxed kernel, the
record, notebook and index of a run, marked `origin: "code"`; the scripted model is never asked.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from autocoder.config import Settings
from autocoder.engine import open_engine
from autocoder.files import InputFile
from autocoder.records import ErrorKind, Event, RunResult
from autocoder.testing import ScriptedLLM

pytestmark = pytest.mark.timeout(120)


async def test_given_code_runs_as_a_run_recorded_as_code_given(
    settings: Settings, llm: ScriptedLLM
) -> None:
    events: list[Event] = []
    async with open_engine(settings, pool_size=0) as engine:
        result = await engine.execute(
            "import pathlib\nprint(6 * 7, pathlib.Path('n.txt').read_text())",
            files=[InputFile("n.txt", b"from a file")],
            on_event=events.append,
        )
        assert result.status == "success", result.error
        assert result.output == "42 from a file\n"
        assert result.origin == "code" and result.prompt == "" and result.model == ""
        assert len(result.attempts) == 1 and result.attempts[0].reply == ""
        assert llm.requests == [], "no model is asked for given code"

        # Recorded and indexed like any run, and said to be code given.
        stored = engine.store.get(result.run_id)
        assert isinstance(stored, RunResult) and stored.origin == "code"
        listed, _ = engine.store.list(limit=5)
        assert [r.run_id for r in listed] == [result.run_id]
        nb = nbformat.read(Path(result.notebook), as_version=4)
        assert nb.metadata["autocoder"]["origin"] == "code"
        assert "Code given" in nb.cells[0].source
        assert Path(result.notebook).name.endswith(f"-code-{result.run_id.rsplit('-', 1)[1]}.ipynb")

    # The events /run/stream sends, with the code and its output.
    kinds = [e.type for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert "code_generated" in kinds and "output" in kinds and "token" not in kinds
    assert events[0].data["origin"] == "code" and events[-1].data["origin"] == "code"


async def test_a_failure_is_data_one_attempt_and_no_retry(
    settings: Settings, llm: ScriptedLLM
) -> None:
    async with open_engine(settings, pool_size=0) as engine:
        raised = await engine.execute("x = 1\n1 / 0")
        assert raised.status == "error" and raised.error_kind is ErrorKind.EXCEPTION
        assert "ZeroDivisionError" in raised.error and "\x1b[" not in raised.error
        assert len(raised.attempts) == 1

        syntax = await engine.execute("def f(:\n  pass")
        assert syntax.error_kind is ErrorKind.SYNTAX and len(syntax.attempts) == 1

        # A top-level await is IPython's to run, not a syntax error.
        awaited = await engine.execute("import asyncio\nawait asyncio.sleep(0)\nprint('ok')")
        assert awaited.status == "success" and awaited.output == "ok\n", awaited.error

        slow = await engine.execute("while True:\n    pass", timeout=1)
        assert slow.error_kind is ErrorKind.TIMEOUT and len(slow.attempts) == 1
    assert llm.requests == []


async def test_in_a_session_state_is_kept_between_given_code(
    settings: Settings, llm: ScriptedLLM
) -> None:
    async with open_engine(settings, pool_size=0) as engine:
        sessions = engine.sessions
        session = await sessions.create()
        sid = session.info.session_id
        first = await engine.execute("total = 40", session=sessions.claim(sid))
        assert first.status == "success" and first.session_id == sid
        second = await engine.execute("print(total + 2)", session=sessions.claim(sid))
        assert second.output == "42\n" and second.origin == "code"

        # A failure's new names are undone, as a failed prompt's are.
        failed = await engine.execute(
            "extra = 1\nraise ValueError('no')", session=sessions.claim(sid)
        )
        assert failed.error_kind is ErrorKind.EXCEPTION
        after = await engine.execute("print('extra' in dir(), total)", session=sessions.claim(sid))
        assert after.output == "False 40\n"

        # Another session, or a fresh kernel, has none of it.
        fresh = await engine.execute("print(total)")
        assert fresh.error_kind is ErrorKind.EXCEPTION and "NameError" in fresh.error

        info = sessions.describe(session)
        assert [r.origin for r in info.runs] == ["code"] * 4
        await sessions.end(session, "deleted")
        nb = nbformat.read(Path(info.notebook), as_version=4)
        assert any("Code given" in c.source for c in nb.cells if c.cell_type == "markdown")
    assert llm.requests == []

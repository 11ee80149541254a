"""Running code as it is given, no model: what an agent that writes its own code uses.

`Engine.execute` is a run of one attempt through the run loop: a real sandboxed kernel, the
record, notebook and index of a run, marked `origin: "code"`; the scripted model is never asked.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest

from autocoder.config import Settings
from autocoder.engine import open_engine
from autocoder.files import InputFile
from autocoder.records import ErrorKind, Event, RunResult
from autocoder.testing import ScriptedLLM
from tests.conftest import LiveServer
from tests.test_api import events_of, make_settings

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


def test_records_from_before_say_the_model_wrote_their_code() -> None:
    old = RunResult.model_validate({"status": "success", "run_id": "20250101-000000-abcdef"})
    assert old.origin == "model"


# --- POST /execute: the story of an agent with code to run ------------------------------------

TOKEN = "agent-token"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, llm_server: ScriptedLLM) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("execute"),
        llm_server,
        pool_size=1,
        max_sessions=4,
        max_concurrent_runs=4,
        max_upload_mb=1,
        api_token=TOKEN,
    )
    with LiveServer(settings) as server:
        yield server


@pytest.fixture
def agent(live: LiveServer, llm: ScriptedLLM) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=live.url, timeout=60, headers=headers) as c:
        yield c
    assert llm.requests == [], "no model is asked for code given"


def execute(agent: httpx.Client, code: str, **fields: Any) -> dict[str, Any]:
    r = agent.post("/execute", json={"code": code, **fields})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_an_agent_prints_a_value_and_gets_it_back_recorded_as_code_given(
    agent: httpx.Client,
) -> None:
    done = execute(agent, "print(sum(range(10)))")
    assert done["status"] == "success" and done["output"] == "45\n"
    assert done["error"] == "" and done["error_kind"] is None and done["origin"] == "code"
    assert done["code"] == "print(sum(range(10)))" and done["run_id"] and done["duration"] > 0
    assert {"filename", "outputs", "files", "notebook", "state_lost"} <= done.keys()

    # The record, the notebook and the history say the code was given, not generated.
    record = agent.get(f"/runs/{done['run_id']}").json()
    assert record["origin"] == "code" and record["prompt"] == ""
    nb = nbformat.reads(agent.get(f"/runs/{done['run_id']}/notebook").text, as_version=4)
    assert nb.metadata["autocoder"]["origin"] == "code"
    assert "Code given" in nb.cells[0].source
    listed = agent.get("/runs", params={"limit": 100}).json()["runs"]
    assert next(r for r in listed if r["run_id"] == done["run_id"])["origin"] == "code"


def test_a_plot_comes_back_as_a_png(agent: httpx.Client) -> None:
    done = execute(agent, PLOT)
    assert done["status"] == "success", done["error"]
    shown = [o for o in done["outputs"] if "image/png" in o.get("data", {})]
    assert shown and base64.b64decode(shown[0]["data"]["image/png"]).startswith(PNG_MAGIC)


def test_an_exception_is_an_error_with_the_cleaned_traceback(agent: httpx.Client) -> None:
    done = execute(agent, "def f(x):\n    return 1 / x\n\nf(0)")
    assert done["status"] == "error" and done["error_kind"] == "exception"
    assert "ZeroDivisionError" in done["error"] and "return 1 / x" in done["error"]
    assert "\x1b[" not in done["error"]
    assert len(done["attempts"]) == 1, "given code is never retried"
    missing = execute(agent, "import no_such_package_here")
    assert missing["error_kind"] == "missing_module"


def test_a_loop_that_never_ends_times_out_and_the_next_call_works(agent: httpx.Client) -> None:
    stuck = execute(agent, "while True:\n    pass", timeout=1)
    assert stuck["status"] == "error" and stuck["error_kind"] == "timeout"
    assert execute(agent, "print('after')")["output"] == "after\n"


def test_files_go_in_and_the_code_reads_them(agent: httpx.Client) -> None:
    r = agent.post(
        "/execute",
        data={"code": "print(open('data.csv').read().count(','))", "timeout": "10"},
        files=[("files", ("data.csv", b"a,b\n1,2\n", "text/csv"))],
    )
    assert r.status_code == 200, r.text
    assert r.json()["output"] == "2\n"


def test_a_session_keeps_state_between_calls_and_not_across_sessions(
    agent: httpx.Client,
) -> None:
    first = agent.post("/sessions").json()["session_id"]
    other = agent.post("/sessions").json()["session_id"]
    try:
        kept = execute(agent, "rows = [1, 2, 3]", session_id=first)
        assert kept["status"] == "success" and kept["session_id"] == first
        assert execute(agent, "print(len(rows))", session_id=first)["output"] == "3\n"
        elsewhere = execute(agent, "print(rows)", session_id=other)
        assert elsewhere["error_kind"] == "exception" and "NameError" in elsewhere["error"]
        assert "NameError" in execute(agent, "print(rows)")["error"]
        runs = agent.get(f"/sessions/{first}").json()["runs"]
        assert [r["origin"] for r in runs] == ["code", "code"]
    finally:
        agent.delete(f"/sessions/{first}")
        agent.delete(f"/sessions/{other}")
    r = agent.post("/execute", json={"code": "print(1)", "session_id": first})
    assert r.status_code == 404 and "is closed" in r.json()["detail"]


def test_bad_requests_are_refused_with_a_message(agent: httpx.Client) -> None:
    unknown = agent.post("/execute", json={"code": "1", "session_id": "session-nope"})
    assert unknown.status_code == 404 and "no session 'session-nope'" in unknown.json()["detail"]

    broken = agent.post(
        "/execute", content=b'{"code": ', headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422 and broken.json()["detail"]

    for body, says in (
        ({"code": "1", "language": "cobol"}, "cobol"),
        ({"code": "   "}, "blank"),
        ({"prompt": "print 1"}, "code"),
        ({"code": "1", "timeout": 10_000}, "AUTOCODER_MAX_REQUEST_TIMEOUT"),
        ({"code": "1", "language": "bash", "session_id": "session-x"}, "Python"),
    ):
        r = agent.post("/execute", json=body)
        assert r.status_code == 422, (body, r.text)
        assert says in str(r.json()["detail"]), (body, r.text)

    big = agent.post(
        "/execute",
        data={"code": "print(1)"},
        files=[("files", ("big.bin", b"x" * (2 * 1024 * 1024), "application/octet-stream"))],
    )
    assert big.status_code == 413 and "AUTOCODER_MAX_UPLOAD_MB" in big.json()["detail"]


def test_without_the_token_or_from_a_foreign_host_nothing_runs(
    live: LiveServer, agent: httpx.Client
) -> None:
    before = agent.get("/runs").json()["total"]
    for path in ("/execute", "/execute/stream"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(f"{live.url}{path}", json={"code": "print(1)"}, headers=headers)
            assert r.status_code == 401, (path, headers)
        foreign = agent.post(path, json={"code": "print(1)"}, headers={"Host": "evil.example"})
        assert foreign.status_code == 403 and foreign.json()["detail"]
    assert agent.get("/runs").json()["total"] == before


def test_the_stream_sends_the_code_its_output_and_the_result(agent: httpx.Client) -> None:
    with agent.stream("POST", "/execute/stream", json={"code": "print('a')\nprint('b')"}) as r:
        assert r.status_code == 200
        events = list(events_of(r.iter_lines()))
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert "code_generated" in kinds and "token" not in kinds
    printed = "".join(e["data"]["data"].get("text", "") for e in events if e["event"] == "output")
    assert printed == "a\nb\n"
    finished = events[-1]["data"]["data"]
    assert finished["status"] == "success" and finished["origin"] == "code"

    # /execute with Accept: text/event-stream streams the same way.
    with agent.stream(
        "POST", "/execute", json={"code": "print(3)"}, headers={"Accept": "text/event-stream"}
    ) as r:
        assert [e["event"] for e in events_of(r.iter_lines())][-1] == "run_finished"

"""Sessions as a user meets them: a real server, real kernels, the scripted model.

A session keeps one sandboxed kernel and one working directory between prompts, so the second
prompt works on what the first one loaded, and the session's notebook replays the whole story.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
from nbclient import NotebookClient

from autocoder.config import Settings
from autocoder.records import SessionInfo, SessionRun
from autocoder.sessions import Session
from autocoder.testing import Reply, ScriptedLLM, fenced
from tests.conftest import LiveServer, autocoder_cmd, kernel_pids
from tests.test_api import events_of, make_settings

pytestmark = pytest.mark.timeout(120)

SALES = b"month,amount\nJan,10\nFeb,20\nMar,12\n"
LOAD = "import pandas as pd\ndf = pd.read_csv('sales.csv')\nprint(len(df), 'rows')"
TOTAL = "print('total', int(df['amount'].sum()))"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, llm_server: ScriptedLLM) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("sessions"), llm_server, max_sessions=4, max_concurrent_runs=4
    )
    with LiveServer(settings) as server:
        yield server


@pytest.fixture
def client(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


@pytest.fixture
def session(client: httpx.Client) -> Iterator[dict[str, Any]]:
    """A session holding sales.csv, deleted at the end (if the test has not closed it)."""
    r = client.post("/sessions", files=[("files", ("sales.csv", SALES, "text/csv"))])
    assert r.status_code == 201, r.text
    info = r.json()
    yield info
    client.delete(f"/sessions/{info['session_id']}")


def user_message(request: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in request["messages"] if m["role"] == "user")


def run(client: httpx.Client, sid: str, prompt: str, **fields: Any) -> dict[str, Any]:
    r = client.post(f"/sessions/{sid}/run", json={"prompt": prompt, **fields})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_the_second_prompt_works_on_what_the_first_one_loaded(
    client: httpx.Client, llm: ScriptedLLM, session: dict[str, Any]
) -> None:
    sid = session["session_id"]
    assert session["status"] == "open" and session["expires_at"] and session["notebook"]
    llm.script(fenced(LOAD), fenced(TOTAL))

    # pandas' first import in a cold kernel can take seconds on a loaded machine.
    first = run(client, sid, "load sales.csv into df", timeout=60)
    second = run(client, sid, "print the total amount")

    assert first["status"] == "success" and first["output"] == "3 rows\n"
    assert second["status"] == "success" and second["output"] == "total 42\n"
    assert second["session_id"] == sid and second["state_lost"] is False
    told = user_message(llm.requests[1])
    assert "df: pandas.DataFrame, shape (3, 2)" in told
    assert "load sales.csv into df" in told and "pd.read_csv('sales.csv')" in told
    assert "sales.csv" in told.split("Files in the working directory:")[1]
    # Each run is an ordinary run too, with its own record and notebook.
    record = client.get(f"/runs/{second['run_id']}").json()
    assert record["session_id"] == sid and record["prompt"] == "print the total amount"
    assert client.get(f"/runs/{second['run_id']}/notebook").status_code == 200
    info = client.get(f"/sessions/{sid}").json()
    assert [r["run_id"] for r in info["runs"]] == [first["run_id"], second["run_id"]]
    assert [f["name"] for f in info["files"]] == ["sales.csv"]
    got = client.get(info["files"][0]["url"])
    assert got.status_code == 200 and got.content == SALES


def test_files_sent_with_a_prompt_join_the_session_and_each_run_keeps_what_it_wrote(
    client: httpx.Client, llm: ScriptedLLM, session: dict[str, Any]
) -> None:
    sid = session["session_id"]
    llm.script(
        fenced(
            "import pandas as pd\nmore = pd.read_csv('more.csv')\n"
            "open('summary.txt', 'w').write(str(len(more)))\nprint('ok')"
        )
    )
    r = client.post(
        f"/sessions/{sid}/run",
        data={"prompt": "load more.csv and write its length to summary.txt"},
        files=[("files", ("more.csv", b"a\n1\n2\n", "text/csv"))],
    )
    assert r.status_code == 200 and r.json()["status"] == "success", r.text
    result = r.json()
    assert "more.csv" in user_message(llm.requests[0])
    assert [f["name"] for f in result["files"]] == ["summary.txt"]
    assert client.get(result["files"][0]["url"]).content == b"2"
    info = client.get(f"/sessions/{sid}").json()
    assert [f["name"] for f in info["files"]] == ["more.csv", "sales.csv", "summary.txt"]

    again = client.post(
        f"/sessions/{sid}/run",
        data={"prompt": "again"},
        files=[("files", ("more.csv", b"a\n3\n", "text/csv"))],
    )
    assert again.status_code == 422 and "already has a file named 'more.csv'" in again.text
    # A name that differs only in case (or in Unicode form) is the same name to a reader.
    for name in ("More.csv", "SUMMARY.TXT", "ｍｏｒｅ.csv"):
        alike = client.post(
            f"/sessions/{sid}/run",
            data={"prompt": "again"},
            files=[("files", (name, b"a\n3\n", "text/csv"))],
        )
        assert alike.status_code == 422 and "only in case or form" in alike.text, name
    assert len(llm.requests) == 1


def test_the_session_notebook_replays_to_the_same_outputs(
    client: httpx.Client, llm: ScriptedLLM, session: dict[str, Any]
) -> None:
    sid = session["session_id"]
    llm.script(
        fenced(LOAD),
        fenced("df = None\nraise ValueError('half done')"),
        fenced("df['double'] = df['amount'] * 2\nprint(df['double'].tolist())"),
        fenced(TOTAL),
    )
    run(client, sid, "load sales.csv into df", timeout=60)
    fixed = run(client, sid, "add a column double")
    run(client, sid, "print the total amount")
    # The failed attempt's `df = None` was undone before the retry.
    assert fixed["status"] == "success" and fixed["output"] == "[20, 40, 24]\n"
    assert len(fixed["attempts"]) == 2

    r = client.get(f"/sessions/{sid}/notebook")
    assert r.status_code == 200
    nb = nbformat.reads(r.text, as_version=4)
    nbformat.validate(nb)
    # First the cell that enters the folder beside the notebook, which holds sales.csv.
    setup, *code = [c for c in nb.cells if c.cell_type == "code"]
    assert setup.metadata.autocoder == {"setup": "files", "folder": f"{sid}_files"}
    assert [c.source for c in code] == [
        LOAD,
        "df['double'] = df['amount'] * 2\nprint(df['double'].tolist())",
        TOTAL,
    ]
    prompts = [c.source for c in nb.cells if c.cell_type == "markdown" and "**Prompt" in c.source]
    assert len(prompts) == 3 and "add a column double" in prompts[1]

    saved = [[o.get("text") for o in c.outputs] for c in code]
    replay = nbformat.reads(r.text, as_version=4)
    # As JupyterLab runs it: from the notebook's own folder.
    NotebookClient(
        replay,
        timeout=60,
        kernel_name="python3",
        resources={"metadata": {"path": str(Path(session["notebook"]).parent)}},
    ).execute()
    replayed = [[o.get("text") for o in c.outputs] for c in replay.cells if c.cell_type == "code"]
    assert replayed[1:] == saved == [["3 rows\n"], ["[20, 40, 24]\n"], ["total 42\n"]]


def test_a_timeout_is_reported_and_the_next_prompt_still_has_the_data(
    client: httpx.Client, llm: ScriptedLLM, session: dict[str, Any]
) -> None:
    sid = session["session_id"]
    llm.script(fenced(LOAD), fenced("import time\ntime.sleep(60)"), fenced(TOTAL))
    run(client, sid, "load sales.csv into df", timeout=60)

    slow = run(client, sid, "wait a minute", timeout=1, max_attempts=1)
    after = run(client, sid, "print the total amount")

    assert slow["status"] == "error" and slow["error_kind"] == "timeout"
    assert slow["state_lost"] is False
    assert after["status"] == "success" and after["output"] == "total 42\n"


def test_a_kernel_that_dies_is_reported_as_lost_state_and_the_session_goes_on(
    client: httpx.Client, llm: ScriptedLLM, session: dict[str, Any]
) -> None:
    sid = session["session_id"]
    llm.script(
        fenced(LOAD),
        fenced("import os\nos._exit(1)"),
        fenced("print(sorted(name for name in dir() if not name.startswith('_')))"),
    )
    run(client, sid, "load sales.csv into df", timeout=60)

    crash = run(client, sid, "exit hard", max_attempts=1)
    fresh = run(client, sid, "list the names")

    assert crash["status"] == "error" and crash["error_kind"] == "kernel_died"
    assert crash["state_lost"] is True
    assert "session's state was lost" in crash["attempts"][0]["notice"]
    told = user_message(llm.requests[2])
    assert "state was lost" in told and "df: pandas" not in told
    assert fresh["status"] == "success" and "'df'" not in fresh["output"]
    assert [r["state_lost"] for r in client.get(f"/sessions/{sid}").json()["runs"]] == [
        False,
        True,
        False,
    ]
    nb = nbformat.reads(client.get(f"/sessions/{sid}/notebook").text, as_version=4)
    assert "%reset -f" in [c.source for c in nb.cells if c.cell_type == "code"]


def test_a_second_prompt_while_one_runs_gets_409(
    client: httpx.Client, llm: ScriptedLLM, session: dict[str, Any], live: LiveServer
) -> None:
    sid = session["session_id"]
    llm.script(Reply(fenced("print('slow')"), delay=3))
    first: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: first.update(run(client, sid, "take your time")), daemon=True
    )
    worker.start()
    live.wait_for("the run to start", lambda: client.get(f"/sessions/{sid}").json()["running"])

    r = client.post(f"/sessions/{sid}/run", json={"prompt": "me too"})

    assert r.status_code == 409 and "running another prompt" in r.json()["detail"]
    worker.join(30)
    assert first["status"] == "success"


def test_a_session_run_streams_its_events(
    client: httpx.Client, llm: ScriptedLLM, session: dict[str, Any]
) -> None:
    llm.script(fenced("print('hi')"))
    with client.stream(
        "POST",
        f"/sessions/{session['session_id']}/run",
        json={"prompt": "say hi"},
        headers={"Accept": "text/event-stream"},
    ) as r:
        events = list(events_of(r.iter_lines()))
    assert [e["event"] for e in events][-1] == "run_finished"
    assert events[-1]["data"]["data"]["session_id"] == session["session_id"]


def test_delete_stops_the_kernel_and_later_requests_say_it_is_closed(
    client: httpx.Client, live: LiveServer
) -> None:
    before = set(kernel_pids())
    sid = client.post("/sessions", json={}).json()["session_id"]
    mine = set(kernel_pids()) - before
    assert mine
    open_before = live.health()["sessions_open"]

    r = client.delete(f"/sessions/{sid}")

    assert r.status_code == 200 and r.json()["closed_reason"] == "deleted"
    live.wait_for("the kernel to stop", lambda: not mine & set(kernel_pids()))
    assert live.health()["sessions_open"] == open_before - 1
    gone = client.post(f"/sessions/{sid}/run", json={"prompt": "anything"})
    assert gone.status_code == 404 and "is closed (it was deleted" in gone.json()["detail"]
    unknown = client.post("/sessions/session-20000101-000000-abcdef/run", json={"prompt": "x"})
    assert unknown.status_code == 404 and unknown.json()["detail"].startswith("no session")
    # Answered before the body is read: an unknown session is a 404 whatever is uploaded.
    refused = client.post(f"/sessions/{sid}/run", json={"not": "a run"})
    assert refused.status_code == 404
    assert client.get(f"/sessions/{sid}").json()["status"] == "closed"
    assert client.get(f"/sessions/{sid}/notebook").status_code == 200
    listed = client.get("/sessions").json()
    assert sid in [s["session_id"] for s in listed["sessions"]]


def test_idle_sessions_expire_and_the_limit_answers_429(tmp_path: Path, llm: ScriptedLLM) -> None:
    settings = make_settings(tmp_path, llm, max_sessions=1, session_idle_timeout=3)
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        before = set(kernel_pids())
        sid = c.post("/sessions").json()["session_id"]
        mine = set(kernel_pids()) - before

        full = c.post("/sessions")
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        assert "AUTOCODER_MAX_SESSIONS" in full.json()["detail"]

        closed = server.wait_for(
            "the session to expire",
            lambda: (info := c.get(f"/sessions/{sid}").json())["status"] == "closed" and info,
        )
        assert closed["closed_reason"] == "idle"
        server.wait_for("the kernel to stop", lambda: not mine & set(kernel_pids()))
        late = c.post(f"/sessions/{sid}/run", json={"prompt": "anything"})
        assert late.status_code == 404 and "expired" in late.json()["detail"]
        assert c.post("/sessions").status_code == 201


def test_after_a_restart_sessions_are_listed_closed_with_no_kernel_left(
    tmp_path: Path, llm: ScriptedLLM
) -> None:
    settings: Settings = make_settings(tmp_path, llm)
    before = set(kernel_pids())
    with LiveServer(settings) as server:
        sid = httpx.post(f"{server.url}/sessions", timeout=60).json()["session_id"]
    assert not set(kernel_pids()) - before
    with LiveServer(settings) as server:
        listed = httpx.get(f"{server.url}/sessions", timeout=10).json()["sessions"]
        assert [(s["session_id"], s["status"]) for s in listed] == [(sid, "closed")]
        assert listed[0]["closed_reason"] == "shutdown"
    # A server that died without closing it left the record open: the next one closes it.
    record = settings.notebooks_dir / ".autocoder" / "sessions" / f"{sid}.json"
    record.write_text(record.read_text().replace('"status": "closed"', '"status": "open"'))
    with LiveServer(settings) as server:
        info = httpx.get(f"{server.url}/sessions/{sid}", timeout=10).json()
        assert (info["status"], info["closed_reason"]) == ("closed", "server_restart")
        assert httpx.get(f"{server.url}/sessions/{sid}/notebook", timeout=10).status_code == 200


def test_sessions_need_the_token_like_every_endpoint(tmp_path: Path, llm: ScriptedLLM) -> None:
    settings = make_settings(tmp_path, llm, api_token="t0ken")
    with LiveServer(settings) as server:
        assert httpx.post(f"{server.url}/sessions", timeout=10).status_code == 401
        assert httpx.get(f"{server.url}/sessions", timeout=10).status_code == 401
        ok = httpx.get(
            f"{server.url}/sessions", headers={"Authorization": "Bearer t0ken"}, timeout=10
        )
        assert ok.status_code == 200


class Terminal:
    """`autocoder chat` on a pseudo-terminal, read as a user would watch it."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.master, slave = pty.openpty()
        # Its own session with the terminal as controlling tty, so Ctrl-C is a SIGINT to it.
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.seen = ""
        self.mark = 0

    def expect(self, text: str, timeout: float = 60) -> str:
        """Wait until `text` appears after what the last expect matched."""
        deadline = time.monotonic() + timeout
        while text not in self.seen[self.mark :]:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} did not appear; the terminal shows:\n{self.seen}"
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"{text!r} never appeared:\n{self.seen}")
                self.seen += chunk.decode("utf-8", "replace")
        self.mark = self.seen.index(text, self.mark) + len(text)
        return self.seen

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self, timeout: float = 30) -> int:
        """Its exit code; a chat still running after `timeout` is ended (SIGTERM, then kill)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(timeout=5)
        finally:
            os.close(self.master)


def test_chat_keeps_the_data_between_prompts_and_prints_the_notebook(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "sales.csv").write_bytes(SALES)
    llm.script(fenced(LOAD), Reply(fenced("import time\ntime.sleep(60)")), fenced(TOTAL))
    env = dict(cli_env, AUTOCODER_HOME=str(tmp_path / "home"))
    term = Terminal([*autocoder_cmd(), "chat", "--file", "sales.csv"], env, tmp_path)
    code = None
    try:
        term.expect("autocoder> ")
        term.send("load sales.csv into df\r")
        term.expect("3 rows")
        term.expect("autocoder> ")
        term.send("wait for a minute\r")
        term.expect("running…")
        term.send("\x03")  # Ctrl-C stops this prompt, not the chat
        term.expect("interrupted; the session is still there")
        term.send("print the total amount\r")
        term.expect("total 42")
        term.expect("autocoder> ")
        term.send("\x04")  # Ctrl-D leaves
        shown = term.expect("session notebook: ")
        code = term.close()
    finally:
        if code is None:
            term.close(timeout=0)
    assert code == 0, shown
    path = Path(tmp_path, shown.split("session notebook: ")[1].split()[0])
    nb = nbformat.read(path, as_version=4)
    setup, *code = [c for c in nb.cells if c.cell_type == "code"]
    assert setup.metadata.autocoder.setup == "files"  # it enters the folder with sales.csv
    assert [c.source for c in code] == [LOAD, TOTAL]
    assert (path.with_name(path.stem + "_files") / "sales.csv").read_bytes() == SALES
    assert (tmp_path / "home" / "chat_history").read_text().splitlines()[-3:] == [
        "load sales.csv into df",
        "wait for a minute",
        "print the total amount",
    ]


def test_ctrl_c_at_the_prompt_leaves_the_chat(
    llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(cli_env, AUTOCODER_HOME=str(tmp_path / "home"))
    before = set(kernel_pids())
    term = Terminal([*autocoder_cmd(), "chat"], env, tmp_path)
    code = None
    try:
        term.expect("autocoder> ")
        term.send("\x03")
        shown = term.expect("session notebook: ")
        code = term.close()
    finally:
        if code is None:
            term.close(timeout=0)
    assert code == 0, shown
    assert not set(kernel_pids()) - before


def test_a_wrong_method_lists_every_method_of_the_path(client: httpx.Client) -> None:
    r = client.request("PUT", "/sessions")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    r = client.request("PATCH", "/sessions/session-20000101-000000-abcdef")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"


def test_chat_with_a_missing_file_is_one_line_and_exit_2(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    proc = subprocess.run(
        [*autocoder_cmd(), "chat", "--file", "nope.csv"],
        env=cli_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["autocoder: error: 'nope.csv' is not a file"]


def test_what_the_model_is_told_stays_within_the_context_budget(
    settings: Settings, tmp_path: Path
) -> None:
    """Forty earlier prompts with long code: the newest are told, the oldest are counted."""
    info = SessionInfo(
        session_id="session-x",
        status="open",
        created_at="",
        last_used_at="",
        expires_at="",
        notebook=str(tmp_path / "s.ipynb"),
        workdir=str(tmp_path),
    )
    session = Session(settings, info, tmp_path)
    history = [
        (SessionRun(run_id=f"r{n}", prompt=f"step {n}", status="success"), "x = 1\n" * 300)
        for n in range(1, 41)
    ]
    names = [(f"v{n}", "int") for n in range(60)]

    told = session.context("the next step", names, history, [])

    assert len(told) <= settings.session_context_chars + 200
    assert told.endswith("Task:\nthe next step") and "- v59: int" in told
    assert "Task 40: step 40" in told and "Task 1: step 1\n" not in told
    assert "earlier task(s) not shown" in told


def test_a_session_closes_at_its_max_age_even_when_used(tmp_path: Path, llm: ScriptedLLM) -> None:
    settings = make_settings(tmp_path, llm, session_max_age=2.0)
    llm.responder = lambda body: fenced("print('busy')")
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        sid = c.post("/sessions").json()["session_id"]

        def closed() -> Any:
            c.post(f"/sessions/{sid}/run", json={"prompt": "keep it busy"})
            info = c.get(f"/sessions/{sid}").json()
            return info["status"] == "closed" and info

        assert server.wait_for("the session to reach its max age", closed)["closed_reason"] == (
            "max_age"
        )

"""The HTTP door as a client meets it: a real uvicorn on 127.0.0.1, real kernels, the scripted model.

FastAPI's TestClient is used only where the event loop is not the point (auth, docs, limits).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
from fastapi.testclient import TestClient

from autocoder import api
from autocoder.config import Settings, load_settings
from autocoder.errors import ConfigError
from autocoder.testing import Reply, ScriptedLLM, fenced
from tests.conftest import SANDBOX, SECRET, LiveServer, autocoder_cmd
from tests.processes import alive

pytestmark = pytest.mark.timeout(60)


def make_settings(root: Path, llm: ScriptedLLM, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "openai_base_url": llm.base_url,
        "openai_api_key": SECRET,
        "notebooks_dir": root / "notebooks",
        "autofile_dir": root / "autofile",
        "sandbox": SANDBOX,
        "timeout": 5.0,
        "llm_retries": 0,
        "pool_size": 0,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, llm_server: ScriptedLLM) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("api"),
        llm_server,
        pool_size=2,
        max_concurrent_runs=8,
        max_queued_runs=8,
    )
    with LiveServer(settings) as server:
        yield server


@pytest.fixture
def client(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def events_of(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Server-sent events as {"event": name, "data": parsed JSON}."""
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if "event" in fields:
                yield {"event": fields["event"], "data": json.loads(fields["data"])}
            fields = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            fields[key] = value


def my_kernel_count() -> int:
    """Kernels this test process has started (the machine may be running others)."""
    files = set()
    for pid in _descendants(os.getpid()):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        launched = any(k in a for a in args for k in (b"ipykernel", b"autocoder.sandbox"))
        if launched and b"-f" in args and alive(pid):
            files.add(args[args.index(b"-f") + 1])
    return len(files)


def runs_with_prompt(client: httpx.Client, prompt: str) -> list[dict[str, Any]]:
    page = client.get("/runs", params={"limit": 100}).json()
    return [r for r in page["runs"] if r["prompt"] == prompt]


# ---------------------------------------------------------------------------------------------
# The contract


def test_a_prompt_gets_the_original_contract(client: httpx.Client, llm: ScriptedLLM) -> None:
    code = "def factorial(n):\n    return 1 if n < 2 else n * factorial(n - 1)\nprint(factorial(5))"
    llm.script(fenced(code))
    prompt = "Write a Python function to calculate the factorial of a number"
    r = client.post("/run", json={"prompt": prompt})

    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "success"
    assert body["output"] == "120\n"
    assert body["error"] == ""
    assert body["code"].strip() == code
    assert Path(body["filename"]).read_text() == body["code"]
    assert body["run_id"] and body["duration"] > 0 and len(body["attempts"]) == 1
    assert nbformat.read(body["notebook"], as_version=4).metadata.autocoder.status == "success"
    assert llm.requests[0]["messages"][-1]["content"] == prompt


def test_a_run_whose_attempts_all_fail_is_still_http_200(
    client: httpx.Client, llm: ScriptedLLM
) -> None:
    llm.script(*[fenced("raise ValueError('nope')")] * 3)
    r = client.post(
        "/run", json={"prompt": "fail twice", "max_attempts": 2, "model": "scripted-model"}
    )

    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "error"
    assert body["error_kind"] == "exception"
    assert "ValueError: nope" in body["error"]
    assert len(body["attempts"]) == 2 and len(llm.requests) == 2
    assert {"filename", "code", "output", "run_id", "notebook", "duration"} <= body.keys()


def test_attempts_is_taken_by_the_name_the_cli_and_the_form_use(
    client: httpx.Client, llm: ScriptedLLM
) -> None:
    """`--attempts` on the command line, "Attempts" on the page: `attempts` in the body too."""
    for body in (
        {"json": {"prompt": "fail", "attempts": 2}},
        {"files": {"prompt": (None, "fail"), "attempts": (None, "2")}},
    ):
        llm.script(*[fenced("raise ValueError('nope')")] * 3)
        r = client.post("/run", **body)  # type: ignore[arg-type]
        assert r.status_code == 200, r.text
        assert len(r.json()["attempts"]) == 2 and len(llm.requests) == 2, body
    both = client.post("/run", json={"prompt": "x", "attempts": 1, "max_attempts": 2})
    assert both.status_code == 422 and "not both" in both.json()["message"]
    over = client.post("/run", json={"prompt": "x", "attempts": 1000})
    assert over.status_code == 422 and "AUTOCODER_MAX_REQUEST_ATTEMPTS" in over.text


def test_history_and_notebook_download_survive_a_restart(
    client: httpx.Client, llm: ScriptedLLM, live: LiveServer, tmp_path: Path
) -> None:
    llm.script(fenced("print('first')"), fenced("1/0"), fenced("print('second')"))
    first = client.post("/run", json={"prompt": "history one"}).json()
    second = client.post("/run", json={"prompt": "history two"}).json()

    newest = client.get("/runs", params={"limit": 1}).json()
    assert newest["runs"][0]["run_id"] == second["run_id"] and newest["total"] >= 2
    older = client.get("/runs", params={"limit": 1, "offset": 1}).json()["runs"][0]
    assert older["run_id"] == first["run_id"] and older["status"] == "success"
    assert client.get(f"/runs/{second['run_id']}").json() == second
    assert second["attempts"][0]["error_kind"] == "exception"

    download = client.get(f"/runs/{first['run_id']}/notebook")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/x-ipynb+json"
    # Named after its prompt, found where the record says.
    notebook_name = Path(first["notebook"]).name
    assert notebook_name.endswith(f"-history-one-{first['run_id'][16:]}.ipynb")
    assert f'filename="{notebook_name}"' in download.headers["content-disposition"]
    nb = nbformat.reads(download.text, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.autocoder.run_id == first["run_id"]

    # A new server over a copy of the notebooks alone rebuilds the index from them.
    copy = tmp_path / "notebooks"
    shutil.copytree(
        live.settings.notebooks_dir, copy, ignore=shutil.ignore_patterns("runs.sqlite*")
    )
    restarted = live.settings.model_copy(update={"notebooks_dir": copy, "pool_size": 0})
    for _ in range(2):  # the second start finds the index it built
        with TestClient(api.create_app(restarted)) as c:
            page = c.get("/runs", params={"limit": 100}).json()
            assert [r["run_id"] for r in page["runs"][:2]] == [second["run_id"], first["run_id"]]
            # Every field comes back: reply, tokens, model, errors worded as they were.
            assert c.get(f"/runs/{second['run_id']}").json() == second
            # The record names the old folder; the notebook is found by its name in this one.
            moved = c.get(f"/runs/{first['run_id']}/notebook")
            assert moved.status_code == 200 and moved.text == download.text

    # Saving over the notebook (cells deleted, outputs cleared) changes nothing the API serves.
    path = Path(second["notebook"])
    served = client.get(f"/runs/{second['run_id']}/notebook").text
    assert served == path.read_text()  # as the run wrote it
    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if c.cell_type == "code"][:1]
    for cell in nb.cells:
        cell.outputs = []
    nbformat.write(nb, path)
    assert client.get(f"/runs/{second['run_id']}").json() == second
    assert client.get("/runs", params={"limit": 1}).json()["runs"][0]["run_id"] == second["run_id"]
    assert client.get(f"/runs/{second['run_id']}/notebook").text == served


def test_a_streamed_run_tells_its_story(client: httpx.Client, llm: ScriptedLLM) -> None:
    llm.script(fenced("1/0"), fenced("print('streamed')"))
    with client.stream("POST", "/run/stream", json={"prompt": "stream it"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        streamed = list(events_of(r.iter_lines()))

    # The model's reply arrives as it is written, before the code taken from it.
    tokens = [e for e in streamed if e["event"] == "token"]
    names = [e["event"] for e in streamed]
    first_code = names.index("code_generated")
    assert names[2] == "token" and names[first_code - 1] == "token" and len(tokens) > 3
    written = "".join(e["data"]["data"]["text"] for e in tokens if e["data"]["attempt"] == 1)
    assert written == fenced("1/0")
    events = [e for e in streamed if e["event"] != "token"]
    per_attempt = ["attempt_started", "code_generated", "output", "attempt_finished"]
    assert [e["event"] for e in events] == [
        "run_started",
        *per_attempt,
        *per_attempt,
        "run_finished",
    ]
    assert len({e["data"]["run_id"] for e in events}) == 1
    assert events[3]["data"]["data"]["ename"] == "ZeroDivisionError"
    failed = events[4]["data"]
    assert failed["attempt"] == 1 and failed["data"]["error_kind"] == "exception"
    assert events[7]["data"]["data"]["text"] == "streamed\n"
    final = events[-1]["data"]["data"]
    assert final["status"] == "success" and final["output"] == "streamed\n"

    # /run streams too when asked for event-stream.
    llm.script(fenced("print('also')"))
    with client.stream(
        "POST",
        "/run",
        json={"prompt": "stream via accept"},
        headers={"Accept": "text/event-stream"},
    ) as r:
        names = [e["event"] for e in events_of(r.iter_lines())]
    assert names[0] == "run_started" and names[-1] == "run_finished"

    # A failure that is not the code's ends the stream with server_error, saying why.
    with client.stream(
        "POST", "/run/stream", json={"prompt": "no model", "model": "no-such-model"}
    ) as r:
        last = list(events_of(r.iter_lines()))[-1]
    assert last["event"] == "server_error"
    assert "404" in last["data"]["detail"]


# ---------------------------------------------------------------------------------------------
# Concurrency


async def test_eight_concurrent_runs_each_see_only_their_own_state(
    live: LiveServer, llm: ScriptedLLM
) -> None:
    def responder(body: dict[str, Any]) -> str:
        n = int(body["messages"][-1]["content"].split()[-1])
        return fenced(
            f"import os, time\nmine_{n} = {n}\nopen('file_{n}.txt', 'w').write('x')\n"
            "time.sleep(0.5)\n"
            "print(sorted(k for k in globals() if k.startswith('mine_')), sorted(os.listdir('.')))"
        )

    llm.responder = responder
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=live.url, timeout=120) as c:
        replies = await asyncio.gather(
            *(c.post("/run", json={"prompt": f"isolated run {n}"}) for n in range(8))
        )
    wall = time.monotonic() - start

    bodies = [r.json() for r in replies]
    for n, body in enumerate(bodies):
        assert body["status"] == "success", body["error"]
        assert body["output"] == f"['mine_{n}'] ['file_{n}.txt']\n"
    assert len({b["run_id"] for b in bodies}) == 8
    assert wall < 0.8 * sum(b["duration"] for b in bodies), "the runs did not overlap"


async def test_a_run_timing_out_does_not_slow_health(live: LiveServer, llm: ScriptedLLM) -> None:
    llm.script(fenced("while True:\n    pass"))
    latencies = []
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as c:
        run = asyncio.create_task(
            c.post("/run", json={"prompt": "spin", "timeout": 2, "max_attempts": 1})
        )
        while not run.done():
            t = time.perf_counter()
            assert (await c.get("/health")).status_code == 200
            latencies.append(time.perf_counter() - t)
            await asyncio.sleep(0.05)
        body = (await run).json()

    assert body["status"] == "error" and body["error_kind"] == "timeout"
    assert "timed out after 2 s" in body["error"]
    assert len(latencies) >= 10
    assert statistics.median(latencies) < 0.25 and max(latencies) < 1.0  # blocked would be 2 s


async def test_hanging_up_cancels_the_run_and_frees_its_kernel(
    live: LiveServer, client: httpx.Client, llm: ScriptedLLM
) -> None:
    llm.script(fenced("import time\nprint('started', flush=True)\ntime.sleep(40)"))
    prompt = "hang up on me"
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=live.url) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/run", json={"prompt": prompt, "timeout": 60}, timeout=3)

    runs = live.wait_for("the cancelled run's record", lambda: runs_with_prompt(client, prompt))
    assert runs[0]["status"] == "error" and runs[0]["error_kind"] == "cancelled"
    live.wait_for("the run to end", lambda: live.health()["runs_running"] == 0)
    assert time.monotonic() - start < 20  # nowhere near the 40 s the code wanted
    live.wait_for("its kernel to go", lambda: my_kernel_count() <= live.settings.pool_size)


def test_closing_a_stream_cancels_its_run(
    live: LiveServer, client: httpx.Client, llm: ScriptedLLM
) -> None:
    llm.script(fenced("import time\nprint('working', flush=True)\ntime.sleep(40)"))
    start = time.monotonic()
    with client.stream(
        "POST", "/run/stream", json={"prompt": "stream, then hang up", "timeout": 60}
    ) as r:
        for event in events_of(r.iter_lines()):
            if event["event"] == "run_started":
                run_id = event["data"]["run_id"]
            if event["event"] == "output":
                break

    record = live.wait_for(
        "the cancelled run's record",
        lambda: (g := client.get(f"/runs/{run_id}")).status_code == 200 and g.json(),
    )
    assert record["status"] == "error" and record["error_kind"] == "cancelled"
    assert record["attempts"] == [] or record["attempts"][-1]["code"].startswith("import time")
    assert time.monotonic() - start < 20
    live.wait_for("the run to end", lambda: live.health()["runs_running"] == 0)


def test_a_run_stopped_by_request_ends_its_stream_as_cancelled(
    live: LiveServer, client: httpx.Client, llm: ScriptedLLM
) -> None:
    llm.script(
        fenced("import time\nprint('working', flush=True)\ntime.sleep(100)"),
        fenced("import time\ntime.sleep(100)"),
    )
    with client.stream(
        "POST", "/run/stream", json={"prompt": "work, then be stopped", "timeout": 110}
    ) as r:
        events = events_of(r.iter_lines())
        for event in events:
            if event["event"] == "run_started":
                run_id = event["data"]["run_id"]
            if event["event"] == "output":
                break
        stopped = client.post(f"/runs/{run_id}/cancel")
        assert stopped.status_code == 202 and stopped.json()["run_id"] == run_id
        rest = [e["event"] for e in events]
    assert rest[-1] == "run_finished"
    record = client.get(f"/runs/{run_id}").json()
    assert record["status"] == "error" and record["error_kind"] == "cancelled"
    assert record["attempts"][0]["output"] == "working\n"
    assert client.post(f"/runs/{run_id}/cancel").status_code == 404

    # A prompt sent without streaming, stopped from elsewhere (its session names the run in
    # progress), is answered with the run's record.
    sid = client.post("/sessions", json={}).json()["session_id"]
    try:

        def stop_it() -> None:
            running = live.wait_for(
                "the prompt to start",
                lambda: client.get(f"/sessions/{sid}").json()["running"],
                timeout=60,
            )
            assert client.post(f"/runs/{running}/cancel").status_code == 202

        stopper = threading.Thread(target=stop_it)
        stopper.start()
        answer = client.post(
            f"/sessions/{sid}/run", json={"prompt": "sleep, then be stopped", "timeout": 110}
        )
        stopper.join(60)
        assert answer.status_code == 200
        assert answer.json()["error_kind"] == "cancelled" and answer.json()["session_id"] == sid
    finally:
        client.delete(f"/sessions/{sid}")
    live.wait_for("the runs to end", lambda: live.health()["runs_running"] == 0)


def test_beyond_the_queue_requests_get_429_and_then_503_with_retry_after(
    tmp_path: Path, llm: ScriptedLLM
) -> None:
    settings = make_settings(
        tmp_path, llm, max_concurrent_runs=1, max_queued_runs=1, queue_timeout=1.5
    )
    llm.script(Reply(content=fenced("print('slow but fine')"), delay=4))
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        results: dict[str, httpx.Response] = {}

        def post(name: str) -> None:
            results[name] = c.post("/run", json={"prompt": name})

        first = threading.Thread(target=post, args=("first",))
        first.start()
        server.wait_for("the first run", lambda: server.health()["runs_running"] == 1)
        second = threading.Thread(target=post, args=("second",))
        second.start()
        server.wait_for("the second to queue", lambda: server.health()["runs_queued"] == 1)
        third = c.post("/run", json={"prompt": "third"})
        assert third.status_code == 429
        assert int(third.headers["retry-after"]) >= 1
        assert "AUTOCODER_MAX_QUEUED_RUNS" in third.json()["detail"]
        second.join(timeout=60)
        first.join(timeout=60)

    assert results["second"].status_code == 503
    assert int(results["second"].headers["retry-after"]) >= 1
    assert results["first"].status_code == 200
    assert results["first"].json()["output"] == "slow but fine\n"


# ---------------------------------------------------------------------------------------------
# Bad input and safety

BAD_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("no body", {}),
    ("not JSON", {"content": b"{prompt: hi", "headers": {"content-type": "application/json"}}),
    ("form data", {"data": {"prompt": "hi"}}),
    ("a JSON list", {"json": ["hi"]}),
    ("missing prompt", {"json": {"timeout": 3}}),
    ("empty prompt", {"json": {"prompt": ""}}),
    ("blank prompt", {"json": {"prompt": " \n\t"}}),
    ("prompt not a string", {"json": {"prompt": 42}}),
    ("attempts as a string", {"json": {"prompt": "hi", "max_attempts": "3"}}),
    ("zero attempts", {"json": {"prompt": "hi", "max_attempts": 0}}),
    ("too many attempts", {"json": {"prompt": "hi", "max_attempts": 1000}}),
    ("negative timeout", {"json": {"prompt": "hi", "timeout": -1}}),
    ("too long a timeout", {"json": {"prompt": "hi", "timeout": 10_000}}),
    ("an unknown field", {"json": {"prompt": "hi", "temprature": 0.5}}),
    ("too long a prompt", {"json": {"prompt": "x" * 20_001}}),
    ("a huge body", {"content": b'{"prompt": "' + b"x" * 2_000_000 + b'"}'}),
]


def test_bad_input_gets_a_4xx_that_says_why_and_writes_nothing(
    client: httpx.Client, llm: ScriptedLLM, live: LiveServer
) -> None:
    before = sorted(p.name for p in live.settings.notebooks_dir.iterdir())
    for name, kwargs in BAD_BODIES:
        for path in ("/run", "/run/stream"):
            r = client.post(path, **kwargs)
            assert r.status_code in (413, 422), (name, path, r.status_code)
            body = r.json()
            if r.status_code == 422:  # says what is wrong, without echoing the input back
                assert body["message"] and all("input" not in d for d in body["detail"]), name
            else:
                assert "bytes" in body["detail"], name
    assert (
        client.post("/run", json={"prompt": "x" * 20_001})
        .json()["message"]
        .endswith("this server takes at most 20,000 (AUTOCODER_MAX_PROMPT_CHARS)")
    )
    assert llm.requests == []
    assert sorted(p.name for p in live.settings.notebooks_dir.iterdir()) == before

    # A model the endpoint does not serve is the request's fault, not the server's.
    r = client.post("/run", json={"prompt": "hi", "model": "no-such-model"})
    assert r.status_code == 422 and "no-such-model" in r.json()["message"]


def test_a_timeout_of_inf_or_nan_is_refused_as_json_and_as_a_form_field(
    tmp_path: Path, llm: ScriptedLLM
) -> None:
    """JSON has no inf, but Python's parser reads `Infinity`, and a form field is text."""
    json_type = {"content-type": "application/json"}
    bodies: list[dict[str, Any]] = [
        {"content": b'{"prompt": "hi", "timeout": Infinity}', "headers": json_type},
        {"content": b'{"prompt": "hi", "timeout": NaN}', "headers": json_type},
        {"files": {"prompt": (None, "hi"), "timeout": (None, "inf")}},
        {"files": {"prompt": (None, "hi"), "timeout": (None, "nan")}},
    ]
    with TestClient(api.create_app(make_settings(tmp_path, llm))) as c:
        for body in bodies:
            r = c.post("/run", **body)
            assert r.status_code == 422, body
            assert r.json()["message"] == "timeout: Input should be a finite number", body
    assert llm.requests == []


def test_a_run_id_never_reaches_outside_the_notebooks(
    client: httpx.Client, live: LiveServer
) -> None:
    link = live.settings.notebooks_dir / "sneaky.ipynb"
    link.symlink_to("/etc/passwd")
    try:
        for suffix in ("", "/notebook"):
            assert client.get(f"/runs/sneaky{suffix}").status_code == 404
            assert client.get(f"/runs/no-such-run{suffix}").status_code == 404
            assert client.get(f"/runs/Not_An_Id{suffix}").status_code == 422
        host, port = live.url.removeprefix("http://").split(":")
        for raw in (
            "/runs/../../etc/passwd",
            "/runs/..%2F..%2Fetc%2Fpasswd",
            "/runs/%2e%2e/notebook",
            "/runs/..%2f..%2fetc%2fpasswd/notebook",
            "/runs/%2Fetc%2Fpasswd/notebook",
        ):
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", raw)
            reply = conn.getresponse()
            text = reply.read().decode()
            conn.close()
            assert reply.status in (404, 422), raw
            assert "root:" not in text
    finally:
        link.unlink()


def test_a_token_guards_everything_but_health(tmp_path: Path, llm: ScriptedLLM) -> None:
    settings = make_settings(tmp_path, llm, api_token="s3cret-token")
    with TestClient(api.create_app(settings)) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/docs").status_code == 200
        for method, path in (
            ("GET", "/runs"),
            ("GET", "/runs/abc"),
            ("GET", "/runs/abc/notebook"),
            ("POST", "/run"),
            ("POST", "/run/stream"),
        ):
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": "s3cret-token"},
            ):
                r = c.request(method, path, json={"prompt": "hi"}, headers=headers)
                assert r.status_code == 401, (method, path, headers)
                assert r.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret-token"}
        assert c.get("/runs", headers=good).status_code == 200
        assert c.get("/runs/abc", headers=good).status_code == 404
    assert llm.requests == []

    # Without a token, the API refuses to be reached from anywhere but loopback...
    open_settings = make_settings(tmp_path, llm)
    public = open_settings.model_copy(update={"allowed_hosts": "192.0.2.10"})
    with TestClient(api.create_app(public), base_url="http://192.0.2.10") as c:
        assert c.get("/runs").status_code == 403
        assert c.get("/health").status_code == 200
    # ...and refuses to start on a public address at all.
    with pytest.raises(ConfigError, match="AUTOCODER_API_TOKEN"):
        api.serve(open_settings.model_copy(update={"host": "0.0.0.0"}))


def test_serve_refuses_a_public_address_without_a_token(cli_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [*autocoder_cmd(), "serve", "--host", "0.0.0.0", "--port", "1"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "AUTOCODER_API_TOKEN" in proc.stderr and "Traceback" not in proc.stderr


def test_the_model_endpoint_down_ends_the_run_in_bounded_time(
    tmp_path: Path, llm: ScriptedLLM
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    down = make_settings(tmp_path, llm, openai_base_url=dead, model="m")
    hanging = make_settings(tmp_path, llm, llm_timeout=1.0)
    llm.script(Reply(content=fenced("print(1)"), delay=5))
    for settings, says in ((down, "cannot reach"), (hanging, "did not answer within 1 s")):
        with TestClient(api.create_app(settings)) as c:
            start = time.monotonic()
            r = c.post("/run", json={"prompt": "anything"})
            assert time.monotonic() - start < 4.5
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "error" and body["error_kind"] == "llm"
        assert says in body["error"]


def test_docs_describe_every_field(tmp_path: Path, llm: ScriptedLLM) -> None:
    with TestClient(api.create_app(make_settings(tmp_path, llm))) as c:
        assert "swagger" in c.get("/docs").text.lower()
        schema = c.get("/openapi.json").json()
    assert {
        "/run",
        "/run/stream",
        "/runs",
        "/runs/{run_id}",
        "/runs/{run_id}/notebook",
        "/health",
    } <= set(schema["paths"])
    components = schema["components"]["schemas"]
    for name in ("RunRequest", "RunResult", "Attempt", "RunSummary", "RunPage", "Health"):
        matching = [c for n, c in components.items() if n.split("-")[0] == name]
        assert matching, name
        for component in matching:
            for field, prop in component["properties"].items():
                assert prop.get("description"), f"{name}.{field} has no description"
    run = schema["paths"]["/run"]["post"]
    assert {"200", "422", "429"} <= set(run["responses"])
    assert "text/event-stream" in run["responses"]["200"]["content"]


def test_uvicorn_can_load_the_module_level_app(
    tmp_path: Path, llm: ScriptedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", llm.base_url)
    monkeypatch.setenv("AUTOCODER_NOTEBOOKS_DIR", str(tmp_path / "nb"))
    monkeypatch.setenv("AUTOCODER_AUTOFILE_DIR", str(tmp_path / "af"))
    monkeypatch.setenv("AUTOCODER_POOL_SIZE", "0")
    monkeypatch.setenv("AUTOCODER_SANDBOX", SANDBOX)
    assert not hasattr(api.app.state, "service")  # nothing is built at import
    with TestClient(api.app) as c:
        assert c.get("/health").json()["llm_endpoint"] == llm.base_url
        assert (tmp_path / "nb" / ".autocoder" / "runs.sqlite").exists()


# ---------------------------------------------------------------------------------------------
# Shutdown


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.mark.timeout(90)
def test_sigterm_cancels_runs_and_leaves_no_kernel(
    cli_env: dict[str, str], llm: ScriptedLLM, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **cli_env,
        "AUTOCODER_PORT": str(port),
        "AUTOCODER_POOL_SIZE": "1",
        "AUTOCODER_SHUTDOWN_GRACE": "1",
        "AUTOCODER_NOTEBOOKS_DIR": str(tmp_path / "nb"),
    }
    proc = subprocess.Popen(
        [*autocoder_cmd(), "serve"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).json()["kernels_ready"] == 1:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        llm.script(fenced("import time\nprint('busy', flush=True)\ntime.sleep(60)"))
        kernels: set[int] = set()
        with (
            httpx.Client(base_url=url, timeout=30) as c,
            c.stream(
                "POST", "/run/stream", json={"prompt": "interrupted by shutdown", "timeout": 90}
            ) as r,
        ):
            events = []
            for event in events_of(r.iter_lines()):
                events.append(event)
                if event["event"] == "output" and not kernels:
                    kernels = _descendants(proc.pid)
                    proc.send_signal(signal.SIGTERM)
        assert kernels, "the run never produced output"
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, log
    assert "Traceback" not in log and "ERROR" not in log, log
    # The run ended as a result: recorded as cancelled, its stream closed by run_finished.
    run_id = events[0]["data"]["run_id"]
    assert events[-1]["event"] == "run_finished"
    assert events[-1]["data"]["data"]["error_kind"] == "cancelled"
    deadline = time.monotonic() + 10
    while any(alive(p) for p in kernels) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in kernels), "processes outlived the server"
    notebook = Path(events[-1]["data"]["data"]["notebook"])
    assert notebook.parent == (tmp_path / "nb").resolve() and run_id[16:] in notebook.name
    record = nbformat.read(notebook, as_version=4).metadata.autocoder
    assert record.status == "error" and record.error_kind == "cancelled"


def test_a_flood_through_the_server_answers_its_head_and_tail_and_says_what_was_cut(
    client: httpx.Client, llm: ScriptedLLM, live: LiveServer
) -> None:
    """`print('x' * 10**8)`: the answer keeps the output limit's worth, says how much was cut,
    and its notebook, written without nbformat, still validates."""
    llm.script(fenced("print('x' * 10**8)"))
    body = client.post("/run", json={"prompt": "flood", "max_attempts": 1}).json()

    assert body["status"] == "error"
    assert body["attempts"][0]["error_kind"] == "output_limit"
    limit = live.settings.max_output_bytes
    assert limit <= len(body["output"]) < limit + 1000
    assert body["output"].startswith("xxx") and body["output"].rstrip().endswith("xxx")
    assert re.search(r"\[[\d,]+ bytes of output cut\]", body["output"])
    download = client.get(f"/runs/{body['run_id']}/notebook")
    nbformat.validate(nbformat.reads(download.text, as_version=4))

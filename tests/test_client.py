"""The client library as a program uses it: against a live server with a token, real sandboxed
kernels and the scripted model; the synchronous client and its async twin."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from autocoder.client import APIError, AsyncClient, Client
from autocoder.testing import ScriptedLLM, fenced
from tests.conftest import LiveServer
from tests.test_api import make_settings

pytestmark = pytest.mark.timeout(120)

TOKEN = "client-token"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.show()"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, llm_server: ScriptedLLM) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("client"),
        llm_server,
        pool_size=1,
        max_sessions=4,
        max_concurrent_runs=4,
        api_token=TOKEN,
    )
    with LiveServer(settings) as server:
        yield server


@pytest.fixture
def ac(live: LiveServer) -> Iterator[Client]:
    with Client(live.url, token=TOKEN, timeout=60) as c:
        yield c


def session_status(live: LiveServer, session_id: str) -> str:
    r = httpx.get(f"{live.url}/sessions/{session_id}", headers={"Authorization": f"Bearer {TOKEN}"})
    return str(r.json()["status"])


def test_importing_the_client_loads_no_engine_and_no_jupyter() -> None:
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, autocoder.client; print(' '.join(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    ours = {m for m in loaded if m.startswith("autocoder")}
    assert ours == {"autocoder", "autocoder.client", "autocoder.errors"}
    heavy = ("jupyter_client", "zmq", "fastapi", "openai", "pydantic", "nbformat")
    assert not [m for m in loaded if m.split(".")[0] in heavy]


def test_execute_prints_draws_and_fails_as_data(ac: Client, llm: ScriptedLLM) -> None:
    done = ac.execute("print(6 * 7)")
    assert done.ok and done.output == "42\n" and done.origin == "code" and done.run_id
    plot = ac.execute(PLOT)
    assert plot.ok and plot.images() and plot.images()[0].startswith(PNG_MAGIC)
    failed = ac.execute("1 / 0", timeout=5)
    assert not failed.ok and failed.error_kind == "exception"
    assert "ZeroDivisionError" in failed.error
    assert llm.requests == []


def test_run_a_prompt_with_a_file_and_download_what_it_wrote(
    ac: Client, llm: ScriptedLLM, tmp_path: Path
) -> None:
    data = tmp_path / "numbers.txt"
    data.write_text("1\n2\n3\n")
    llm.script(
        fenced(
            "total = sum(int(x) for x in open('numbers.txt'))\n"
            "open('total.txt', 'w').write(str(total))\nprint(total)"
        )
    )
    done = ac.run("add up the numbers in numbers.txt", files=[data])
    assert done.ok and done.output == "6\n" and done.origin == "model" and done.attempts == 1
    written = next(f for f in done.files if f.name == "total.txt")
    assert ac.download(written) == b"6"


def test_a_session_keeps_state_and_closes_when_the_block_ends(
    ac: Client, live: LiveServer, llm: ScriptedLLM
) -> None:
    with ac.session(files={"rates.csv": b"r\n2\n"}) as s:
        assert s.execute("import csv\nrows = list(csv.reader(open('rates.csv')))").ok
        assert s.execute("print(rows[1][0])").output == "2\n"
        llm.script(fenced("print(len(rows))"))
        asked = s.run("how many rows are there?")
        assert asked.ok and asked.output == "2\n" and asked.session_id == s.id
        assert session_status(live, s.id) == "open"
    assert session_status(live, s.id) == "closed"
    with pytest.raises(APIError) as gone:
        s.execute("print(rows)")
    assert gone.value.status_code == 404 and "is closed" in gone.value.detail
    assert "NameError" in ac.execute("print(rows)").error  # nothing leaks out of a session


def test_errors_say_what_to_fix(ac: Client, live: LiveServer) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"
    with Client(nowhere) as down, pytest.raises(APIError) as refused:
        down.execute("print(1)")
    assert refused.value.status_code is None
    assert f"is `autocoder serve` running at {nowhere}?" in str(refused.value)

    with Client(live.url, token="wrong") as stranger, pytest.raises(APIError) as denied:
        stranger.execute("print(1)")
    assert denied.value.status_code == 401 and "AUTOCODER_API_TOKEN" in str(denied.value)

    with pytest.raises(APIError) as bad:
        ac.execute("print(1)", language="cobol")
    assert bad.value.status_code == 422 and "cobol" in bad.value.detail


async def test_the_async_twin_does_the_same(live: LiveServer, llm: ScriptedLLM) -> None:
    async with AsyncClient(live.url, token=TOKEN, timeout=60) as ac:
        done = await ac.execute("print(2 ** 10)")
        assert done.ok and done.output == "1024\n"
        plot = await ac.execute(PLOT)
        assert plot.images()[0].startswith(PNG_MAGIC)
        async with ac.session() as s:
            await s.execute("seen = {'a': 1}")
            assert (await s.execute("print(seen['a'])")).output == "1\n"
            llm.script(fenced("print(sorted(seen))"))
            assert (await s.run("list the keys of seen")).output == "['a']\n"
        assert session_status(live, s.id) == "closed"
        with pytest.raises(APIError) as bad:
            await ac.execute("   ")
        assert bad.value.status_code == 422 and "blank" in bad.value.detail

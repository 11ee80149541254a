"""An AI agent uses autocoder through MCP: `autocoder mcp` launched over stdio, as an MCP
client's configuration launches it, and the same tools at `/mcp` on a live `autocoder serve`.

The official `mcp` client drives both; kernels are real and sandboxed where the machine
allows it; the model is the scripted one on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, ImageContent, ResourceLink, TextContent
from pydantic import SecretStr

from autocoder.config import Settings
from autocoder.testing import ScriptedLLM, fenced
from tests.conftest import SECRET, LiveServer

pytestmark = pytest.mark.timeout(240)

TOKEN = "mcp-api-token-never-reaches-the-kernel"
START = 60  # seconds a server (and its kernels) may take to answer its first call
SHOW_ENV = "import os\nprint(sorted(os.environ.items()))"


@pytest.fixture
def mcp_env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """What an MCP client's configuration would give `autocoder mcp`: the model's key and
    an API token among it, which the code must never see."""
    return {
        **cli_env,
        "AUTOCODER_NOTEBOOKS_DIR": str(tmp_path / "notebooks"),
        "AUTOCODER_AUTOFILE_DIR": str(tmp_path / "autofile"),
        "AUTOCODER_POOL_SIZE": "1",
        "AUTOCODER_MAX_UPLOAD_MB": "1",
        "AUTOCODER_API_TOKEN": TOKEN,
    }


@asynccontextmanager
async def stdio_mcp(env: dict[str, str], cwd: Path) -> AsyncIterator[ClientSession]:
    """`autocoder mcp` as a client launches it, its stderr kept for when a test fails."""
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "autocoder", "mcp"], env=env, cwd=str(cwd)
    )
    with open(cwd / "mcp-stderr.log", "w") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as client,
        ):
            with anyio.fail_after(START):
                await client.initialize()
            yield client


def text_of(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


async def call(client: ClientSession, tool: str, **arguments: Any) -> CallToolResult:
    with anyio.fail_after(START):
        return await client.call_tool(tool, arguments)


async def test_an_agent_lists_the_tools_and_runs_code_that_prints_and_plots(
    mcp_env: dict[str, str], tmp_path: Path
) -> None:
    async with stdio_mcp(mcp_env, tmp_path) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        assert {"run_code", "run_prompt", "open_session", "close_session", "upload_file"} <= set(
            listed
        )
        assert {"list_files", "read_file"} <= set(listed)
        run_code = listed["run_code"]
        assert run_code.input_schema["required"] == ["code"]
        assert "maximum" in json.dumps(run_code.input_schema["properties"]["timeout"])
        assert run_code.output_schema is not None
        assert "status" in run_code.output_schema["properties"]
        assert "persist" in (listed["open_session"].description or "")

        plotted = await call(
            client,
            "run_code",
            code="import matplotlib.pyplot as plt\nprint(1 + 1)\nplt.plot([1, 2, 3])\nplt.show()",
        )
        assert not plotted.is_error, text_of(plotted)
        assert text_of(plotted).startswith("2\n")
        images = [c for c in plotted.content if isinstance(c, ImageContent)]
        assert len(images) == 1 and images[0].mime_type == "image/png"
        assert base64.b64decode(images[0].data).startswith(b"\x89PNG")
        data = plotted.structured_content
        assert data is not None
        assert data["status"] == "success" and data["images"] == 1 and data["attempts"] == 1
        assert data["origin"] == "code" and data["state_lost"] is False
        shown = json.dumps(data["outputs"])
        assert "image/png" in shown and images[0].data not in shown, "an image travels once"
        assert Path(data["notebook"]).is_file(), "every call is recorded as a notebook"

        # An exception in the code is a result marked as an error, with its traceback.
        raised = await call(client, "run_code", code="x = 1\nprint('before')\n1 / x_missing")
        assert raised.is_error
        said = text_of(raised)
        assert said.startswith("before") and "NameError" in said and "x_missing" in said
        assert raised.structured_content is not None
        assert raised.structured_content["error_kind"] == "exception"

        # Files the code writes come back listed and linked, and can be read.
        wrote = await call(client, "run_code", code="open('out.txt', 'w').write('made here')")
        links = [c for c in wrote.content if isinstance(c, ResourceLink)]
        run_id = wrote.structured_content["run_id"] if wrote.structured_content else ""
        assert [str(link.uri) for link in links] == [f"autocoder://runs/{run_id}/files/out.txt"]
        read = await call(client, "read_file", run_id=run_id, name="out.txt")
        assert text_of(read) == "made here"
        resource = await client.read_resource(f"autocoder://runs/{run_id}/files/out.txt")
        assert base64.b64decode(resource.contents[0].blob) == b"made here"  # type: ignore[union-attr]

        # The model's key and the API token are in the server's environment, not the code's.
        env = await call(client, "run_code", code=SHOW_ENV)
        assert not env.is_error, text_of(env)
        assert "PATH" in text_of(env)
        assert SECRET not in text_of(env) and TOKEN not in text_of(env)


async def test_state_persists_within_a_session_and_not_across(
    mcp_env: dict[str, str], tmp_path: Path
) -> None:
    async with stdio_mcp(mcp_env, tmp_path) as client:
        first = (await call(client, "open_session")).structured_content
        other = (await call(client, "open_session")).structured_content
        assert first and other and first["session_id"] != other["session_id"]
        one, two = first["session_id"], other["session_id"]

        assert not (await call(client, "run_code", code="x = 41", session_id=one)).is_error
        kept = await call(client, "run_code", code="print(x + 1)", session_id=one)
        assert text_of(kept).strip() == "42"
        assert kept.structured_content and kept.structured_content["session_id"] == one
        for elsewhere in ({"session_id": two}, {}):
            missing = await call(client, "run_code", code="print(x)", **elsewhere)
            assert missing.is_error and "NameError" in text_of(missing), elsewhere

        # A file put into the session is there for its code, read-only.
        given = base64.b64encode(b"a,b\n1,2\n").decode()
        up = await call(client, "upload_file", session_id=one, name="t.csv", content_base64=given)
        assert not up.is_error, text_of(up)
        read = await call(
            client, "run_code", code="print(open('t.csv').read().split()[1])", session_id=one
        )
        assert text_of(read).strip() == "1,2"
        listed = await call(client, "list_files", session_id=one)
        assert listed.structured_content is not None
        assert [f["name"] for f in listed.structured_content["files"]] == ["t.csv"]

        closed = await call(client, "close_session", session_id=one)
        assert closed.structured_content and closed.structured_content["status"] == "closed"
        after = await call(client, "run_code", code="print(x)", session_id=one)
        assert after.is_error and "closed" in text_of(after)
        assert (await call(client, "close_session", session_id=two)).structured_content


async def test_run_prompt_goes_through_a_retry(
    mcp_env: dict[str, str], tmp_path: Path, llm: ScriptedLLM
) -> None:
    llm.script(fenced("print(1 / 0)"), fenced("print('fixed')"))
    progress: list[tuple[float, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, message))

    async with stdio_mcp(mcp_env, tmp_path) as client:
        with anyio.fail_after(START):
            result = await client.call_tool(
                "run_prompt", {"prompt": "print something"}, progress_callback=on_progress
            )
    assert not result.is_error, text_of(result)
    data = result.structured_content
    assert data is not None
    assert data["status"] == "success" and data["code"].strip() == "print('fixed')"
    assert data["attempts"] == 2 and "attempt 2" in data["summary"]
    assert "ZeroDivisionError" in data["summary"]
    assert text_of(result).strip() == "fixed"
    assert len(llm.requests) == 2
    assert progress, "a run reports its progress"
    assert [p for p, _ in progress] == sorted({p for p, _ in progress}), "progress only grows"


async def test_bad_calls_get_clear_tool_errors(mcp_env: dict[str, str], tmp_path: Path) -> None:
    async with stdio_mcp(mcp_env, tmp_path) as client:
        unknown = await call(client, "run_code", code="1", session_id="session-none-such")
        assert unknown.is_error and "no session 'session-none-such'" in text_of(unknown)
        for bad in ({"code": 3}, {"code": "1", "timeout": -1}, {"code": "1", "timeout": 10**6}):
            refused = await call(client, "run_code", **bad)
            assert refused.is_error and "validation error" in text_of(refused), bad
        lang = await call(client, "run_code", code="1", language="cobol")
        assert lang.is_error and "cobol" in text_of(lang)
        for tool, blank_args in (("run_prompt", {"prompt": "   "}), ("run_code", {"code": " \n"})):
            blank = await call(client, tool, **blank_args)
            assert blank.is_error and "blank" in text_of(blank), tool

        sid = (await call(client, "open_session")).structured_content["session_id"]  # type: ignore[index]
        big = base64.b64encode(b"x" * (1024 * 1024 + 1)).decode()
        over = await call(client, "upload_file", session_id=sid, name="big.bin", content_base64=big)
        assert over.is_error and "over 1 MB (AUTOCODER_MAX_UPLOAD_MB)" in text_of(over)
        garbled = await call(client, "upload_file", session_id=sid, name="a", content_base64="@@")
        assert garbled.is_error and "not valid base64" in text_of(garbled)
        escape = await call(
            client, "upload_file", session_id=sid, name="../x", content_base64="eA=="
        )
        assert escape.is_error and "x" in text_of(escape)
        nothing = await call(client, "read_file", session_id=sid, name="none.txt")
        assert nothing.is_error and "has no file 'none.txt'" in text_of(nothing)
        neither = await call(client, "list_files")
        assert neither.is_error and "run_id or session_id" in text_of(neither)
        # The server is still fine.
        assert text_of(await call(client, "run_code", code="print('ok')")).strip() == "ok"


async def test_cancelling_a_call_stops_a_busy_loop_and_the_next_call_works(
    mcp_env: dict[str, str], tmp_path: Path
) -> None:
    async with stdio_mcp(mcp_env, tmp_path) as client:

        async def cancel_while_looping(**where: Any) -> None:
            looping = anyio.Event()

            async def on_progress(done: float, total: float | None, message: str | None) -> None:
                if message and "looping" in message:
                    looping.set()

            async def busy() -> None:
                code = "print('looping', flush=True)\nwhile True:\n    pass"
                await client.call_tool(
                    "run_code",
                    {"code": code, "timeout": 100, **where},
                    progress_callback=on_progress,
                )

            with anyio.fail_after(START):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(busy)
                    await looping.wait()
                    tg.cancel_scope.cancel()

        # The kernel was interrupted; the next call runs at once.
        await cancel_while_looping()
        assert text_of(await call(client, "run_code", code="print(2)")).strip() == "2"

        # In a session, the loop is interrupted and what the session held is still there.
        sid = (await call(client, "open_session")).structured_content["session_id"]  # type: ignore[index]
        await call(client, "run_code", code="kept = 'still here'", session_id=sid)
        await cancel_while_looping(session_id=sid)
        after = await call(client, "run_code", code="print(kept)", session_id=sid)
        assert text_of(after).strip() == "still here"

    records = [
        json.loads(p.read_text())
        for p in (tmp_path / "notebooks" / ".autocoder" / "records").glob("*.json")
    ]
    kinds = sorted(str(r.get("error_kind")) for r in records)
    assert kinds == ["None"] * 3 + ["cancelled"] * 2, "a cancelled call is recorded as cancelled"


@pytest.fixture
def served(settings: Settings) -> Any:
    with LiveServer(
        settings.model_copy(update={"api_token": SecretStr(TOKEN), "pool_size": 1})
    ) as server:
        yield server


@asynccontextmanager
async def http_mcp(url: str) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    timeout = httpx2.Timeout(30, read=300)
    async with (
        httpx2.AsyncClient(headers=headers, timeout=timeout) as http,
        streamable_http_client(f"{url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as client,
    ):
        with anyio.fail_after(START):
            await client.initialize()
        yield client


async def test_the_http_endpoint_serves_the_same_tools_behind_the_token(served: LiveServer) -> None:
    hello = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    accept = {"Accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(timeout=30) as plain:
        missing = await plain.post(f"{served.url}/mcp", json=hello, headers=accept)
        assert missing.status_code == 401 and "token" in missing.json()["detail"]
        foreign = await plain.post(
            f"{served.url}/mcp",
            json=hello,
            headers={**accept, "Authorization": f"Bearer {TOKEN}", "Host": "evil.example"},
        )
        assert foreign.status_code == 403 and "evil.example" in foreign.json()["detail"]

    async with http_mcp(served.url) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"run_code", "run_prompt", "open_session"} <= names
        env = await call(client, "run_code", code=SHOW_ENV)
        assert not env.is_error, text_of(env)
        assert TOKEN not in text_of(env) and SECRET not in text_of(env)

        sid = (await call(client, "open_session")).structured_content["session_id"]  # type: ignore[index]
        await call(client, "run_code", code="y = 'kept'", session_id=sid)
        kept = await call(client, "run_code", code="print(y)", session_id=sid)
        assert text_of(kept).strip() == "kept"
        # A file larger than any /run JSON body gets through: /mcp's limit is the upload's.
        blob = base64.b64encode(b"z" * 600_000).decode()
        up = await call(client, "upload_file", session_id=sid, name="z.bin", content_base64=blob)
        assert not up.is_error, text_of(up)
        size = await call(
            client, "run_code", code="import os; print(os.path.getsize('z.bin'))", session_id=sid
        )
        assert text_of(size).strip() == "600000"
        await call(client, "close_session", session_id=sid)
    # The API lists what the agent ran, like any run.
    runs = httpx.get(
        f"{served.url}/runs", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    ).json()
    assert runs["total"] == 4


def test_a_server_that_cannot_work_says_why_in_one_line(mcp_env: dict[str, str]) -> None:
    """An MCP client shows the server's stderr when it exits: one line naming the setting."""
    env = {**mcp_env, "AUTOCODER_KERNEL_PYTHON": "/nonexistent/python"}
    done = subprocess.run(
        [sys.executable, "-m", "autocoder", "mcp"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "autocoder: error: AUTOCODER_KERNEL_PYTHON" in done.stderr

"""What fuzzing and crash tests found in the HTTP door (issue 13), each as the story that broke.

A real uvicorn (LiveServer or `autocoder serve`), real kernels, the scripted model.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from fastapi.testclient import TestClient

from autocoder import api
from autocoder.errors import ConfigError
from autocoder.testing import ScriptedLLM, fenced
from tests.conftest import LiveServer, autocoder_cmd
from tests.test_api import events_of, make_settings

pytestmark = pytest.mark.timeout(90)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Who may ask


def test_a_rebound_name_or_a_foreign_origin_is_refused(tmp_path: Path, llm: ScriptedLLM) -> None:
    with LiveServer(make_settings(tmp_path, llm)) as live, httpx.Client(timeout=10) as c:
        port = live.url.rsplit(":", 1)[1]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
            assert c.get(f"{live.url}/runs", headers={"Host": host}).status_code == 200, host
        for host in (f"evil.example:{port}", "attacker.test", "127.0.0.1.evil.example"):
            r = c.get(f"{live.url}/runs", headers={"Host": host})
            assert r.status_code == 403 and "AUTOCODER_ALLOWED_HOSTS" in r.json()["detail"]
            r = c.post(f"{live.url}/run", headers={"Host": host}, json={"prompt": "steal"})
            assert r.status_code == 403
        r = c.post(
            f"{live.url}/run", headers={"Origin": "http://evil.example"}, json={"prompt": "x"}
        )
        assert r.status_code == 403 and "Origin" in r.json()["detail"]
        same = c.get(f"{live.url}/runs", headers={"Origin": f"http://localhost:{port}"})
        assert same.status_code == 200
    assert llm.requests == []


def test_a_name_can_be_allowed(tmp_path: Path, llm: ScriptedLLM) -> None:
    settings = make_settings(tmp_path, llm, allowed_hosts="autocoder.internal")
    with LiveServer(settings) as live:
        r = httpx.get(f"{live.url}/runs", headers={"Host": "autocoder.internal:8443"}, timeout=10)
        assert r.status_code == 200


def test_a_wrong_token_gets_401_whatever_the_body(tmp_path: Path, llm: ScriptedLLM) -> None:
    settings = make_settings(tmp_path, llm, api_token="s3cret-token")
    bodies: list[dict[str, Any]] = [
        {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
        {"content": b'{"prompt": 5}', "headers": {"Content-Type": "application/json"}},
        {"content": b"\xff\xfe", "headers": {"Content-Type": "text/plain"}},
        {"content": b"x" * 10, "headers": {"Content-Type": "multipart/form-data; boundary=b"}},
    ]
    with TestClient(api.create_app(settings)) as c:
        for body in bodies:
            for auth in ({}, {"Authorization": "Bearer wrong"}):
                headers = {**body["headers"], **auth}
                r = c.post("/run", content=body["content"], headers=headers)
                assert r.status_code == 401, (body, auth, r.text)
        good = {"Authorization": "bearer s3cret-token", "Content-Type": "application/json"}
        assert c.post("/run", content=b"{not json", headers=good).status_code == 422


def test_a_token_no_client_can_send_is_refused_at_start(tmp_path: Path, llm: ScriptedLLM) -> None:
    settings = make_settings(tmp_path, llm, api_token="pässwörd")
    with pytest.raises(ConfigError, match="ASCII"), TestClient(api.create_app(settings)):
        pass


# ---------------------------------------------------------------------------------------------
# Input the server must bound


def test_an_offset_beyond_any_history_is_a_422(tmp_path: Path, llm: ScriptedLLM) -> None:
    with TestClient(api.create_app(make_settings(tmp_path, llm))) as c:
        r = c.get("/runs", params={"offset": 9223372036854775808})
        assert r.status_code == 422, r.text
        assert c.get("/runs", params={"offset": 10**9}).status_code == 200
        offset = next(
            p
            for p in c.get("/openapi.json").json()["paths"]["/runs"]["get"]["parameters"]
            if p["name"] == "offset"
        )
        assert offset["schema"]["maximum"] == 10**9


def test_the_openapi_document_is_this_servers(tmp_path: Path, llm: ScriptedLLM) -> None:
    open_settings = make_settings(tmp_path, llm, max_prompt_chars=500, max_request_attempts=3)
    with TestClient(api.create_app(open_settings)) as c:
        doc = c.get("/openapi.json").json()
        assert "securitySchemes" not in doc.get("components", {})
        run = doc["paths"]["/run"]["post"]
        assert "security" not in run and "401" not in run["responses"]
        assert "413" in run["responses"]
        props = doc["components"]["schemas"]["RunRequest"]["properties"]
        assert props["prompt"]["maxLength"] == 500
        assert any(c.get("maximum") == 3 for c in props["max_attempts"]["anyOf"])
        assert c.head("/runs").status_code == 200 and c.head("/runs").content == b""
        assert c.head("/health").status_code == 200
    with TestClient(api.create_app(make_settings(tmp_path, llm, api_token="t0ken"))) as c:
        doc = c.get("/openapi.json").json()
        assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert doc["paths"]["/run"]["post"]["security"] == [{"bearer": []}]
        assert "401" in doc["paths"]["/runs"]["get"]["responses"]
        assert "security" not in doc["paths"]["/health"]["get"]


def test_serve_on_a_busy_port_says_so_in_one_line(cli_env: dict[str, str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [*autocoder_cmd(), "serve", "--port", str(port)],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Cancellation


def test_a_hung_up_stream_records_the_attempt_that_was_running(
    tmp_path: Path, llm: ScriptedLLM
) -> None:
    llm.script(fenced("import time\nprint('working', flush=True)\ntime.sleep(40)"))
    settings = make_settings(tmp_path, llm, pool_size=1)
    with LiveServer(settings) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        with c.stream("POST", "/run/stream", json={"prompt": "hang up", "timeout": 60}) as r:
            for event in events_of(r.iter_lines()):
                if event["event"] == "run_started":
                    run_id = event["data"]["run_id"]
                if event["event"] == "output":
                    break
        record = live.wait_for(
            "the cancelled run's record",
            lambda: (g := c.get(f"/runs/{run_id}")).status_code == 200 and g.json(),
        )
        live.wait_for("the run to end", lambda: live.health()["runs_running"] == 0)
    assert record["error_kind"] == "cancelled"
    [attempt] = record["attempts"]
    assert attempt["error_kind"] == "cancelled" and attempt["code"].startswith("import time")
    assert "working" in attempt["output"]
    assert Path(attempt["filename"]).read_text().startswith("import time")
    assert "0 attempt" not in record["error"]


@pytest.mark.timeout(120)
def test_shutdown_turns_queued_requests_away_at_once(
    cli_env: dict[str, str], llm: ScriptedLLM, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **cli_env,
        "AUTOCODER_PORT": str(port),
        "AUTOCODER_POOL_SIZE": "1",
        "AUTOCODER_MAX_CONCURRENT_RUNS": "1",
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
    queued: list[httpx.Response] = []
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
        # Every run sleeps: a queued request that got a slot would hold shutdown for 60 s.
        llm.script(*[fenced("import time\nprint('busy', flush=True)\ntime.sleep(60)")] * 3)
        with httpx.Client(base_url=url, timeout=60) as c:
            waiter = threading.Thread(
                target=lambda: queued.append(
                    httpx.post(f"{url}/run", json={"prompt": "queued"}, timeout=60)
                ),
                daemon=True,
            )
            with c.stream("POST", "/run/stream", json={"prompt": "first", "timeout": 90}) as r:
                lines = r.iter_lines()
                for event in events_of(lines):
                    if event["event"] == "output":
                        break
                waiter.start()
                deadline = time.monotonic() + 10
                while httpx.get(f"{url}/health", timeout=5).json()["runs_queued"] < 1:
                    assert time.monotonic() < deadline, "the second request never queued"
                    time.sleep(0.05)
                start = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                for _ in lines:
                    pass
            waiter.join(30)
        proc.wait(timeout=30)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read() if proc.stdout else ""
    assert queued and queued[0].status_code == 503, log
    assert "shutting down" in queued[0].json()["detail"]
    assert took < 10, (took, log)  # grace 1 s + cancel; a run given the slot would take 60 s
    assert proc.returncode == 0, log


# ---------------------------------------------------------------------------------------------
# Bodies over the limit


FORM = {"prompt": "sum it"}


def _by_httpx(url: str, files: list[tuple[str, bytes]]) -> tuple[int, str]:
    r = httpx.post(url, data=FORM, files=[("files", f) for f in files], timeout=60)
    return r.status_code, r.text


def _by_requests(url: str, files: list[tuple[str, bytes]]) -> tuple[int, str]:
    r = requests.post(url, data=FORM, files=[("files", f) for f in files], timeout=60)
    return r.status_code, r.text


def _by_urllib(url: str, files: list[tuple[str, bytes]]) -> tuple[int, str]:
    boundary = "autocoder-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n'
        f"{FORM['prompt']}\r\n".encode()
    ]
    for name, data in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"'
        parts.append(f"{head}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    request = urllib.request.Request(
        url,
        data=b"".join(parts),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _by_curl(url: str, paths: list[Path], *extra: str) -> tuple[int, str]:
    args = ["-F", f"prompt={FORM['prompt']}", *(a for p in paths for a in ("-F", f"files=@{p}"))]
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "60", *extra, *args, "-w", "\n%{http_code}", url],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr  # a reset is curl's exit 55 or 56
    body, _, status = out.stdout.rpartition("\n")
    return int(status), body


def test_uploads_over_the_limit_get_their_413_in_every_client(
    tmp_path: Path, llm: ScriptedLLM
) -> None:
    """A 26 MB file, or three of 10 MB, against AUTOCODER_MAX_UPLOAD_MB=25: httpx, requests,
    urllib and curl all read the 413 and its message. (The server used to close on a client
    still sending, which then saw a connection reset.)"""
    mb = 1024 * 1024
    one = [("big.csv", b"1,2,3\n" * (26 * mb // 6 + 1))]
    three = [(f"part{i}.csv", b"4,5,6\n" * (10 * mb // 6 + 1)) for i in range(3)]
    paths = []
    for name, data in one + three:
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    with LiveServer(make_settings(tmp_path, llm, max_upload_mb=25)) as live:
        url = f"{live.url}/run"
        answers: dict[str, Any] = {}
        for files, what in ((one, "one file"), (three, "three files")):
            answers[f"httpx, {what}"] = partial(_by_httpx, url, files)
            answers[f"requests, {what}"] = partial(_by_requests, url, files)
            answers[f"urllib, {what}"] = partial(_by_urllib, url, files)
        if shutil.which("curl"):
            answers["curl"] = partial(_by_curl, url, paths[:1])  # it asks Expect: 100-continue
            answers["curl, no Expect"] = partial(_by_curl, url, paths[:1], "-H", "Expect:")
            answers["curl, three files"] = partial(_by_curl, url, paths[1:], "-H", "Expect:")
        for client, post in answers.items():
            for _ in range(3):
                status, body = post()
                assert status == 413, (client, status, body)
                assert "AUTOCODER_MAX_UPLOAD_MB" in json.loads(body)["detail"], (client, body)
        assert live.health()["status"] == "ok"
    assert llm.requests == []


# ---------------------------------------------------------------------------------------------
# Slow clients


def _closed_by_server(sock: socket.socket, deadline: float) -> bool:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        sock.recv(1024)  # EOF (or an answer) means the server let go
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_slow_clients_are_cut_off_in_bounded_time(tmp_path: Path, llm: ScriptedLLM) -> None:
    settings = make_settings(tmp_path, llm, header_timeout=1.0, body_timeout=1.0)
    with LiveServer(settings) as live:
        host, port = live.url.removeprefix("http://").split(":")
        socks = [socket.create_connection((host, int(port)), timeout=10) for _ in range(300)]
        try:
            for i, s in enumerate(socks):
                if i % 3 == 1:  # headers, never finished
                    s.sendall(b"GET /runs HTTP/1.1\r\nHost: localhost\r\n")
                elif i % 3 == 2:  # a body that never comes
                    s.sendall(
                        b"POST /run HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                        b'\r\nContent-Length: 100\r\n\r\n{"prompt"'
                    )
            deadline = time.monotonic() + 15
            held = [s for s in socks if not _closed_by_server(s, deadline)]
            assert held == [], f"{len(held)} of 300 slow connections still held"
            # The server still answers a client that is not slow.
            assert live.health()["status"] == "ok"
        finally:
            for s in socks:
                s.close()
    assert llm.requests == []


def test_responses_are_sent_without_waiting_for_nagle(tmp_path: Path, llm: ScriptedLLM) -> None:
    """Keep-alive responses go out as written: TCP_NODELAY on every accepted connection
    (without it each response on a kept connection waited ~40 ms for a delayed ACK)."""
    with LiveServer(make_settings(tmp_path, llm)) as live, httpx.Client(base_url=live.url) as c:
        assert c.get("/runs").status_code == 200  # the connection stays open
        connections = list(live.server.server_state.connections)
        assert connections
        for protocol in connections:
            sock = protocol.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

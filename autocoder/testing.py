"""A scripted OpenAI-compatible server on 127.0.0.1, and a throwaway PostgreSQL cluster, for
tests and benchmarks.

It answers `/v1/chat/completions` with replies set in advance and records every request, so a
test can check what the model was told. It is a real HTTP server: the code under test talks
to it through the real `openai` client.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

MODEL = "scripted-model"


@dataclass
class Reply:
    """One scripted answer: content, or an HTTP error status, after an optional delay.

    Asked to stream (`"stream": true`), the server sends the content a word at a time, as
    chat completion chunks; with `resume` set it stops halfway until that event is set (at
    most RESUME_WAIT seconds), so a test can look at a reply while it is being written.
    """

    content: str = ""
    status: int = 200
    delay: float = 0.0
    resume: threading.Event | None = None


RESUME_WAIT = 60.0


def pieces(text: str) -> list[str]:
    """Text cut the way a model streams it: a word and the space before it at a time."""
    return re.findall(r"\s*\S+|\s+", text)


ReplyFn = Callable[[dict[str, Any]], "str | Reply"]


@dataclass
class ScriptedLLM:
    """Start with `.start()`, set `.replies` (or `.responder`), read `.requests`."""

    replies: deque[str | Reply] = field(default_factory=deque)
    responder: ReplyFn | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: [MODEL])
    _server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start() the server first"
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}/v1"

    def script(self, *replies: str | Reply) -> None:
        self.replies.clear()
        self.replies.extend(replies)
        self.requests.clear()

    def next_reply(self, body: dict[str, Any]) -> Reply:
        if self.replies:
            item = self.replies.popleft()
        elif self.responder is not None:
            item = self.responder(body)
        else:
            item = Reply(status=500, content="the script has no more replies")
        return Reply(content=item) if isinstance(item, str) else item

    def start(self) -> ScriptedLLM:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # As model servers do (uvicorn's asyncio sockets): without it, the body written
            # after the headers waits for the client's delayed ACK, up to 40 ms a reply.
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                return None

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chunk(self, payload: dict[str, Any] | str) -> None:
                data = payload if isinstance(payload, str) else json.dumps(payload)
                event = f"data: {data}\n\n".encode()
                self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                self.wfile.flush()

            def _stream(self, body: dict[str, Any], reply: Reply) -> None:
                """The reply as OpenAI's streaming API sends one: server-sent chunks."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                base = {
                    "id": f"chatcmpl-{len(owner.requests)}",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": body.get("model", MODEL),
                }
                parts = pieces(reply.content)
                half = len(parts) // 2
                for i, piece in enumerate(parts):
                    if i == half and reply.resume is not None:
                        reply.resume.wait(RESUME_WAIT)
                    delta = {"content": piece, **({"role": "assistant"} if i == 0 else {})}
                    choice = {"index": 0, "delta": delta, "finish_reason": None}
                    self._chunk({**base, "choices": [choice]})
                done = {"index": 0, "delta": {}, "finish_reason": "stop"}
                self._chunk({**base, "choices": [done]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    # As the reply without streaming counts it.
                    tokens = max(1, len(reply.content) // 4)
                    usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": 2}
                    self._chunk({**base, "choices": [], "usage": usage})
                self._chunk("[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    data = [{"id": m, "object": "model", "owned_by": "tests"} for m in owner.models]
                    self._send(200, {"object": "list", "data": data})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": "not found"}})
                    return
                owner.requests.append(body)
                if body.get("model") not in owner.models:
                    self._send(
                        404,
                        {
                            "error": {
                                "message": f"model {body.get('model')} not found",
                                "type": "invalid_request_error",
                            }
                        },
                    )
                    return
                reply = owner.next_reply(body)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.status != 200:
                    self._send(
                        reply.status, {"error": {"message": reply.content or "scripted error"}}
                    )
                    return
                if body.get("stream"):
                    self._stream(body, reply)
                    return
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(owner.requests)}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", MODEL),
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": reply.content},
                            }
                        ],
                        "usage": {
                            "prompt_tokens": 1,
                            "completion_tokens": max(1, len(reply.content) // 4),
                            "total_tokens": 2,
                        },
                    },
                )

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                """A client that hangs up mid-reply (a cancelled run) is not an error here."""

        server = Server(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, name="scripted-llm", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def fenced(code: str) -> str:
    """A reply the way chat models write one."""
    return f"Here is the code:\n\n```python\n{code.strip()}\n```\n"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here (or no psycopg); the message says which, in a line."""


def postgres_bindir() -> Path:
    """Where `initdb`, `pg_ctl` and `postgres` are: Debian's /usr/lib/postgresql/<v>/bin, or
    the PATH's. PostgresUnavailable otherwise."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name, reverse=True
    )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise PostgresUnavailable(
        "PostgreSQL server binaries not found (Debian: apt-get install postgresql)"
    )


@dataclass
class PostgresCluster:
    """A throwaway PostgreSQL cluster under a temp dir, on 127.0.0.1 and a free port, with no
    fsync: for tests and benchmarks. As root it runs as the `postgres` user (PostgreSQL refuses
    root). `start()` takes ~2 s; `database()` makes a fresh empty database (~0.3 s)."""

    root: Path | None = None
    port: int = 0
    _made: int = 0
    _data: Path | None = None
    _as_user: list[str] = field(default_factory=list)
    _bindir: Path = Path()

    def start(self) -> PostgresCluster:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise PostgresUnavailable(
                "psycopg is not installed (pip install 'autocoder[postgres]')"
            ) from None
        bindir = postgres_bindir()
        as_user: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="autocoder-pg-", dir="/tmp"))
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no postgres user") from None
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"]
        data = self.root / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        subprocess.run(
            [*as_user, str(bindir / "initdb"), "--no-sync", "-D", str(data), "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--locale=C"],
            check=True, capture_output=True, timeout=120, cwd=self.root,
        )  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        started = subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options,
             "-l", str(self.root / "log"), "-w", "-t", "60", "start"],
            capture_output=True, text=True, timeout=90, cwd=self.root,
        )  # fmt: skip
        if started.returncode != 0:
            log = (self.root / "log").read_text(errors="replace")[-2000:]
            self.stop()
            raise PostgresUnavailable(f"PostgreSQL did not start: {started.stderr.strip()} {log}")
        self._as_user, self._bindir, self._data = as_user, bindir, data
        return self

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        self._made += 1
        name = f"autocoder_{os.getpid()}_{self._made}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        data = self._data
        if data is not None:
            subprocess.run(
                [*self._as_user, str(self._bindir / "pg_ctl"), "-D", str(data),
                 "-m", "immediate", "-w", "-t", "30", "stop"],
                capture_output=True, timeout=60, cwd="/",
            )  # fmt: skip
            self._data = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


@dataclass
class KernelGateway:
    """A real Jupyter Kernel Gateway on 127.0.0.1 serving autocoder's kernelspecs.

    Started as the gateway's host would run it (`gateway.gateway_args`), with the kernelspecs
    installed under `root`, its runtime dir and the kernels' working dirs there too, and
    GET /api/kernels allowed so a test can see that no kernel was left. `stop()` ends it.
    """

    root: Path
    token: str = "gateway-test-token"
    max_kernels: int = 16
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)  # in place of ours of the same name
    url: str = ""
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> KernelGateway:
        # Start-up time: this module imports nothing of autocoder at its top, so that a
        # scripted model (a benchmark's, a test's) costs no kernel machinery.
        from autocoder.kernel.gateway import gateway_args
        from autocoder.kernel.local import install_kernelspecs

        install_kernelspecs(prefix=str(self.root / "prefix"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        given = {a.split("=")[0] for a in self.extra_args}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOCODER_", "OPENAI_"))}
        env.update(
            JUPYTER_PATH=str(self.root / "prefix" / "share" / "jupyter"),
            JUPYTER_RUNTIME_DIR=str(self.root / "runtime"),
            JUPYTER_DATA_DIR=str(self.root / "data"),
            JUPYTER_CONFIG_DIR=str(self.root / "config"),
            KG_AUTH_TOKEN=self.token,
            AUTOCODER_AUTOFILE_DIR=str(self.root / "autofile"),
            **self.extra_env,
        )
        argv = [
            *(sys.executable, "-m", "kernel_gateway", "--KernelGatewayApp.ip=127.0.0.1"),
            f"--KernelGatewayApp.port={port}",
            "--JupyterWebsocketPersonality.list_kernels=True",
            *(
                a
                for a in gateway_args(max_kernels=self.max_kernels)
                if a.split("=")[0] not in given
            ),
            *self.extra_args,
        ]
        log = open(self.root / "gateway.log", "ab")  # noqa: SIM115 (the process holds it)
        self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the kernel gateway exited: {self.log()[-2000:]}")
            try:
                if self._get("/api/kernelspecs", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the kernel gateway did not start: {self.log()[-2000:]}")
            time.sleep(0.1)

    def kernels(self) -> list[dict[str, Any]]:
        response = self._get("/api/kernels")
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def _get(self, path: str, timeout: float = 10) -> httpx.Response:
        headers = {"Authorization": f"token {self.token}"}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=timeout)

    def log(self) -> str:
        try:
            return (self.root / "gateway.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM: the gateway shuts its kernels down, then exits; SIGKILL after a while."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None

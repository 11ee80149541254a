"""A scripted OpenAI-compatible server on 127.0.0.1, for tests and benchmarks.

It answers `/v1/chat/completions` with replies set in advance and records every request, so a
test can check what the model was told. It is a real HTTP server: the code under test talks
to it through the real `openai` client.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "scripted-model"


@dataclass
class Reply:
    """One scripted answer: content, or an HTTP error status, after an optional delay."""

    content: str = ""
    status: int = 200
    delay: float = 0.0


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

            def log_message(self, *args: Any) -> None:
                return None

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

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

"""A client of an autocoder server, for programs and agents: run a prompt, run code as it is,
keep state in a session. It speaks HTTP only (httpx), so importing it starts no kernel and
loads nothing of the engine.

    from autocoder.client import Client

    with Client("http://127.0.0.1:5005", token=None) as ac:
        print(ac.execute("print(6 * 7)").output)            # 42, in a fresh sandboxed kernel
        with ac.session() as s:                              # one kernel kept between calls
            s.execute("import pandas as pd\\ndf = pd.DataFrame({'x': [1, 2, 3]})")
            print(s.execute("print(df.x.sum())").output)     # 6
        plot = ac.execute("import matplotlib.pyplot as plt\\nplt.plot([1, 4, 9])\\nplt.show()")
        png = plot.images()[0]                               # the PNG's bytes

`AsyncClient` is the same with `await` and `async with`. The code's own failures are data
(`Result.status`, `error`, `error_kind`); a request the server refuses, or a server that
cannot be reached, raises `autocoder.errors.APIError` with the status code and the server's
message.

Why two thin clients over one core rather than a sync wrapper of the async one (nbclient's
`run_sync`): each operation is written once, as a request to build and an answer to read
(`_Call`, no I/O), and each client only sends it, with `httpx.Client` or
`httpx.AsyncClient`. A wrapper would need an event loop of its own in a thread (a Jupyter
kernel already runs one in the main thread) and would cross threads on every call; here
neither client starts a thread.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import httpx

from autocoder.errors import APIError

__all__ = ["APIError", "AsyncClient", "AsyncSession", "Client", "File", "Result", "Session"]

DEFAULT_URL = "http://127.0.0.1:5005"
DEFAULT_TIMEOUT = 600.0
"""Seconds to wait for an answer: a run retries, and each attempt may run for minutes."""
CONNECT_TIMEOUT = 10.0
TOKEN_VARIABLE = "AUTOCODER_API_TOKEN"

Files = Mapping[str, bytes] | Iterable[str | os.PathLike[str]]
"""Files for the code's working directory: name → bytes, or paths to read (by base name)."""

T = TypeVar("T")


@dataclass(frozen=True)
class File:
    """A file the code wrote; `Client.download(file)` fetches it."""

    name: str
    size: int
    media_type: str
    url: str


@dataclass(frozen=True)
class Result:
    """What `/run` and `/execute` answer: the code's outcome, never an exception.

    `status` is "success" or "error"; then `error` says what went wrong (a traceback cleaned
    of colour codes) and `error_kind` why: exception, syntax, timeout, missing_module, ...
    `outputs` are nbformat v4 outputs with their MIME bundles; `images()` decodes the plots.
    """

    status: str
    output: str
    error: str
    error_kind: str | None
    code: str
    run_id: str
    origin: str
    language: str
    duration: float
    outputs: tuple[dict[str, Any], ...]
    files: tuple[File, ...]
    notebook: str
    filename: str
    prompt: str = ""
    model: str = ""
    session_id: str = ""
    state_lost: bool = False
    attempts: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The whole answer as the server sent it (every attempt's record included)."""

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def images(self, media_type: str = "image/png") -> list[bytes]:
        """The bytes of each displayed image of `media_type`, in order (plots: image/png)."""
        found = []
        for out in self.outputs:
            data = out.get("data") or {}
            if isinstance(data.get(media_type), str):
                found.append(base64.b64decode(data[media_type]))
        return found

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        return cls(
            status=data["status"],
            output=data.get("output", ""),
            error=data.get("error", ""),
            error_kind=data.get("error_kind"),
            code=data.get("code", ""),
            run_id=data["run_id"],
            origin=data.get("origin", "model"),
            language=data.get("language", "python"),
            duration=float(data.get("duration", 0.0)),
            outputs=tuple(data.get("outputs") or ()),
            files=tuple(
                File(**{k: f[k] for k in ("name", "size", "media_type", "url")})
                for f in data.get("files") or ()
            ),
            notebook=data.get("notebook", ""),
            filename=data.get("filename", ""),
            prompt=data.get("prompt", ""),
            model=data.get("model", ""),
            session_id=data.get("session_id", ""),
            state_lost=bool(data.get("state_lost", False)),
            attempts=len(data.get("attempts") or ()),
            raw=data,
        )


# --- the core: each operation as a request to build and an answer to read ---------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    method: str
    path: str
    read: Callable[[httpx.Response], T]
    json: dict[str, Any] | None = None
    data: dict[str, str] | None = None
    files: list[tuple[str, tuple[str, bytes]]] | None = None
    ok: tuple[int, ...] = (200,)
    gone_ok: bool = False  # a 404 is an answer too (closing a session that is closed)


def _result(response: httpx.Response) -> Result:
    return Result.from_json(response.json())


def _json(response: httpx.Response) -> dict[str, Any]:
    return response.json()  # type: ignore[no-any-return]


def _read_files(files: Files | None) -> list[tuple[str, tuple[str, bytes]]]:
    if not files:
        return []
    if isinstance(files, Mapping):
        return [("files", (name, bytes(content))) for name, content in files.items()]
    return [("files", (Path(p).name, Path(p).read_bytes())) for p in files]


def _post(
    path: str,
    fields: dict[str, Any],
    files: Files | None,
    read: Callable[[httpx.Response], T],
    ok: tuple[int, ...] = (200,),
) -> _Call[T]:
    """JSON, or multipart/form-data when there are files (the fields as text, as /run takes them)."""
    given = {k: v for k, v in fields.items() if v is not None}
    parts = _read_files(files)
    if not parts:
        return _Call("POST", path, read, json=given, ok=ok)
    return _Call("POST", path, read, data={k: str(v) for k, v in given.items()}, files=parts, ok=ok)


def _run(path: str, prompt: str, files: Files | None, **fields: Any) -> _Call[Result]:
    return _post(path, {"prompt": prompt, **fields}, files, _result)


def _execute(code: str, files: Files | None, **fields: Any) -> _Call[Result]:
    return _post("/execute", {"code": code, **fields}, files, _result)


def _open_session(files: Files | None, **fields: Any) -> _Call[dict[str, Any]]:
    return _post("/sessions", fields, files, _json, ok=(201,))


def _close_session(session_id: str) -> _Call[dict[str, Any]]:
    return _Call("DELETE", f"/sessions/{session_id}", _json, gone_ok=True)


def _download(file: File | str) -> _Call[bytes]:
    url = file.url if isinstance(file, File) else file
    return _Call("GET", url, lambda r: r.content)


class _Core:
    """What both clients share: where the server is, how to ask it, and how to read its refusals."""

    def __init__(self, base_url: str, token: str | None, timeout: float | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_VARIABLE) or None
        self.timeout = timeout

    def options(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return {
            "base_url": self.base_url,
            "headers": headers,
            "timeout": httpx.Timeout(self.timeout, connect=CONNECT_TIMEOUT),
        }

    def request(self, call: _Call[Any]) -> dict[str, Any]:
        return {"json": call.json, "data": call.data, "files": call.files}

    def answer(self, call: _Call[T], response: httpx.Response) -> T | None:
        if response.status_code in call.ok:
            return call.read(response)
        if call.gone_ok and response.status_code == 404:
            return None
        detail = _server_message(response)
        said = f"{call.method} {response.request.url} answered {response.status_code}: {detail}"
        if response.status_code == 401:
            said += f" (give Client(token=...) or set {TOKEN_VARIABLE})"
        if retry := response.headers.get("retry-after"):
            said += f" (retry after {retry} s)"
        raise APIError(
            said, status_code=response.status_code, detail=detail, url=str(response.request.url)
        )

    def failed(self, call: _Call[Any], error: httpx.TransportError) -> APIError:
        url = f"{self.base_url}{call.path}"
        if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
            said = f"cannot reach autocoder at {url} ({error}): is `autocoder serve` running at {self.base_url}?"
        elif isinstance(error, httpx.TimeoutException):
            said = (
                f"no answer from {url} within {self.timeout:g} s; a longer run needs a longer "
                "Client(timeout=...)"
            )
        else:
            said = f"the connection to {url} failed: {error}"
        return APIError(said, status_code=None, detail=str(error), url=url)


def _opened(session_id: str) -> str:
    if not session_id:
        raise APIError(
            "the session is not open: use `with client.session() as s:` (or `s.open()`)",
            status_code=None,
            detail="the session is not open",
            url="",
        )
    return session_id


def _server_message(response: httpx.Response) -> str:
    """The server's own words: a validation error's `message`, else its `detail`."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        said = body.get("message") or body.get("detail")
        if isinstance(said, str):
            return said
        if said is not None:
            return str(said)
    return str(body)


# --- the synchronous client ---------------------------------------------------------------------


class Client:
    """An autocoder server, called synchronously. Use as a context manager, or `close()` it.

    `token` defaults to AUTOCODER_API_TOKEN from the environment; `timeout` is the seconds
    to wait for one answer (None: no limit)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self._core = _Core(base_url, token, timeout)
        self._http = httpx.Client(**self._core.options())

    def _send(self, call: _Call[T]) -> T:
        try:
            response = self._http.request(call.method, call.path, **self._core.request(call))
        except httpx.TransportError as e:
            raise self._core.failed(call, e) from None
        return self._core.answer(call, response)  # type: ignore[return-value]

    def execute(
        self,
        code: str,
        *,
        language: str | None = None,
        timeout: float | None = None,
        files: Files | None = None,
    ) -> Result:
        """Run `code` as it is, once, in a fresh sandboxed kernel (`POST /execute`)."""
        return self._send(_execute(code, files, language=language, timeout=timeout))

    def run(
        self,
        prompt: str,
        *,
        files: Files | None = None,
        language: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        model: str | None = None,
        candidates: int | None = None,
    ) -> Result:
        """Have the model write code for `prompt`, run it, retry on failure (`POST /run`)."""
        fields = dict(language=language, max_attempts=max_attempts, timeout=timeout, model=model)
        return self._send(_run("/run", prompt, files, candidates=candidates, **fields))

    def session(
        self, *, timeout: float | None = None, model: str | None = None, files: Files | None = None
    ) -> Session:
        """A session, opened when its `with` block starts and closed when it ends: one kernel
        whose variables, imports and files are kept between its calls."""
        return Session(self, timeout=timeout, model=model, files=files)

    def download(self, file: File | str) -> bytes:
        """A file the code wrote (a `Result.files` entry, or its URL)."""
        return self._send(_download(file))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Session:
    """A session of a `Client`: `with client.session() as s:`; `s.id` is its id."""

    def __init__(self, client: Client, *, files: Files | None = None, **fields: Any) -> None:
        self._client = client
        self._files = files
        self._fields = fields
        self.id = ""

    def open(self) -> Session:
        self.id = self._client._send(_open_session(self._files, **self._fields))["session_id"]
        return self

    def execute(
        self, code: str, *, timeout: float | None = None, files: Files | None = None
    ) -> Result:
        """Run `code` as it is in the session's kernel: what earlier calls defined is there."""
        return self._client._send(_execute(code, files, session_id=self._id(), timeout=timeout))

    def run(
        self,
        prompt: str,
        *,
        files: Files | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        model: str | None = None,
    ) -> Result:
        """Have the model write code for `prompt`, told what the session holds, and run it."""
        fields = dict(max_attempts=max_attempts, timeout=timeout, model=model)
        return self._client._send(_run(f"/sessions/{self._id()}/run", prompt, files, **fields))

    def close(self) -> None:
        """Close the session (its notebook and files stay on the server); closing twice is fine."""
        if self.id:
            self._client._send(_close_session(self.id))

    def _id(self) -> str:
        return _opened(self.id)

    def __enter__(self) -> Session:
        return self.open()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --- the asynchronous client: the same operations, awaited --------------------------------------


class AsyncClient:
    """`Client`, with `await`: `async with AsyncClient() as ac: r = await ac.execute(...)`."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self._core = _Core(base_url, token, timeout)
        self._http = httpx.AsyncClient(**self._core.options())

    async def _send(self, build: Callable[[], _Call[T]]) -> T:
        # Building may read files from disk: in a thread, off the event loop.
        call = await asyncio.to_thread(build)
        try:
            response = await self._http.request(call.method, call.path, **self._core.request(call))
        except httpx.TransportError as e:
            raise self._core.failed(call, e) from None
        return self._core.answer(call, response)  # type: ignore[return-value]

    async def execute(
        self,
        code: str,
        *,
        language: str | None = None,
        timeout: float | None = None,
        files: Files | None = None,
    ) -> Result:
        """Run `code` as it is, once, in a fresh sandboxed kernel (`POST /execute`)."""
        return await self._send(lambda: _execute(code, files, language=language, timeout=timeout))

    async def run(
        self,
        prompt: str,
        *,
        files: Files | None = None,
        language: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        model: str | None = None,
        candidates: int | None = None,
    ) -> Result:
        """Have the model write code for `prompt`, run it, retry on failure (`POST /run`)."""
        fields = dict(language=language, max_attempts=max_attempts, timeout=timeout, model=model)
        return await self._send(
            lambda: _run("/run", prompt, files, candidates=candidates, **fields)
        )

    def session(
        self, *, timeout: float | None = None, model: str | None = None, files: Files | None = None
    ) -> AsyncSession:
        """A session, opened when its `async with` block starts and closed when it ends."""
        return AsyncSession(self, timeout=timeout, model=model, files=files)

    async def download(self, file: File | str) -> bytes:
        return await self._send(lambda: _download(file))

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class AsyncSession:
    """A session of an `AsyncClient`: `async with client.session() as s:`."""

    def __init__(self, client: AsyncClient, *, files: Files | None = None, **fields: Any) -> None:
        self._client = client
        self._files = files
        self._fields = fields
        self.id = ""

    async def open(self) -> AsyncSession:
        opened = await self._client._send(lambda: _open_session(self._files, **self._fields))
        self.id = opened["session_id"]
        return self

    async def execute(
        self, code: str, *, timeout: float | None = None, files: Files | None = None
    ) -> Result:
        sid = self._id()
        return await self._client._send(
            lambda: _execute(code, files, session_id=sid, timeout=timeout)
        )

    async def run(
        self,
        prompt: str,
        *,
        files: Files | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        model: str | None = None,
    ) -> Result:
        path = f"/sessions/{self._id()}/run"
        fields = dict(max_attempts=max_attempts, timeout=timeout, model=model)
        return await self._client._send(lambda: _run(path, prompt, files, **fields))

    async def close(self) -> None:
        if self.id:
            await self._client._send(lambda: _close_session(self.id))

    def _id(self) -> str:
        return _opened(self.id)

    async def __aenter__(self) -> AsyncSession:
        return await self.open()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

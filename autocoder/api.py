"""The HTTP door: FastAPI over the one engine. It only translates HTTP into runs and back.

`autocoder serve` calls `serve(settings)`; `uvicorn autocoder.api:app` works too, because
`app` holds no state until its lifespan starts: the settings, the kernel pool, the runner
and the run index are built there and kept on `app.state.service`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import logging
import math
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlparse

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from autocoder import __version__, sandbox
from autocoder.config import DEFAULT_OPENAI_URL, Settings, load_settings
from autocoder.errors import AutocoderError, ConfigError, KernelStartError
from autocoder.kernel import KernelPool
from autocoder.notebook import notebook_path
from autocoder.records import Event, RunResult
from autocoder.runner import Runner, new_run_id
from autocoder.store import RunStore, RunSummary

log = logging.getLogger(__name__)

T = TypeVar("T")

RUN_ID_PATTERN = r"^[0-9a-z][0-9a-z-]{0,63}$"
SSE_MEDIA_TYPE = "text/event-stream"
IPYNB_MEDIA_TYPE = "application/x-ipynb+json"
KEEPALIVE_SECONDS = 15.0
CANCEL_GRACE = 15.0
M_ARENA_MAX = -8
CLIENT_CLOSED_REQUEST = 499  # nginx's code: nobody reads it, but the access log says what happened


# ---------------------------------------------------------------------------------------------
# Request and response schemas


class RunRequest(BaseModel):
    """What `POST /run` takes. Only `prompt` is required, as in the original AutoCoder."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "Write a Python function to calculate the factorial of a number"}
            ]
        },
    )

    prompt: str = Field(
        min_length=1,
        description="The task, in plain English. At most AUTOCODER_MAX_PROMPT_CHARS characters.",
    )
    max_attempts: int | None = Field(
        None,
        ge=1,
        description="Attempts before giving up. Default AUTOCODER_MAX_ATTEMPTS; "
        "at most AUTOCODER_MAX_REQUEST_ATTEMPTS.",
    )
    timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds each attempt's code may run. Default AUTOCODER_TIMEOUT; "
        "at most AUTOCODER_MAX_REQUEST_TIMEOUT.",
    )
    model: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="The model to ask, by the endpoint's name for it. Default AUTOCODER_MODEL.",
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is blank")
        return prompt


class RunPage(BaseModel):
    """A page of run history, newest first."""

    runs: list[RunSummary] = Field(description="The runs on this page, newest first.")
    total: int = Field(description="How many runs match, on all pages.")
    limit: int = Field(description="The page size asked for.")
    offset: int = Field(description="How many newer runs were skipped.")


class Health(BaseModel):
    """Whether the service can take runs; answered without touching a kernel or the model."""

    status: Literal["ok", "degraded"] = Field(
        description="`degraded` (HTTP 503) when the pool cannot start kernels."
    )
    version: str = Field(description="autocoder's version.")
    kernels_ready: int = Field(description="Pre-started kernels waiting for a run.")
    pool_size: int = Field(
        description="How many kernels the pool keeps ready (AUTOCODER_POOL_SIZE)."
    )
    kernel_error: str | None = Field(description="Why the last kernel start failed, if it did.")
    llm_backend: Literal["openai", "local"] = Field(
        description="`openai`: an OpenAI-compatible endpoint is configured; `local`: the embedded model."
    )
    llm_endpoint: str | None = Field(
        description="The configured endpoint (OPENAI_BASE_URL), if any."
    )
    llm_model: str | None = Field(description="The configured model (AUTOCODER_MODEL), if any.")
    runs_running: int = Field(description="Runs in progress.")
    runs_queued: int = Field(description="Requests waiting for a run slot.")
    max_concurrent_runs: int = Field(description="AUTOCODER_MAX_CONCURRENT_RUNS.")
    max_queued_runs: int = Field(description="AUTOCODER_MAX_QUEUED_RUNS.")


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong.")


# ---------------------------------------------------------------------------------------------
# Admission: a bounded number of runs at once, a bounded queue, and a deadline for waiting


class Busy(Exception):
    """No run slot now and no room to wait (429), or none came within the queue timeout (503)."""

    def __init__(self, message: str, *, status_code: int, retry_after: int) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after


class ClientGone(Exception):
    """The client hung up before the answer was ready; whatever it asked for was cancelled."""


class RunCancelled(Exception):
    """The server cancelled the run (it is shutting down); the run is recorded as cancelled."""


class Slot:
    """The right to run; released exactly once, whoever ends the run."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._start = time.monotonic()
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._finished(time.monotonic() - self._start)


class Admission:
    """At most `limit` runs at once; `max_queued` more may wait, each up to `wait` seconds."""

    def __init__(self, limit: int, max_queued: int, wait: float) -> None:
        self.limit = limit
        self.max_queued = max_queued
        self.wait = wait
        self.running = 0
        self.queued = 0
        self._sem = asyncio.Semaphore(limit)
        self._mean_run = 2.0

    def retry_after(self) -> int:
        """A guess at when a slot frees up: mean run time × (queue length + 1) / slots."""
        return max(1, min(300, math.ceil(self._mean_run * (self.queued + 1) / self.limit)))

    async def acquire(self) -> Slot:
        if self._sem.locked() and self.queued >= self.max_queued:
            raise Busy(
                f"the server is full: {self.running} running and {self.queued} waiting "
                "(AUTOCODER_MAX_CONCURRENT_RUNS, AUTOCODER_MAX_QUEUED_RUNS); retry later",
                status_code=429,
                retry_after=self.retry_after(),
            )
        self.queued += 1
        waiter = asyncio.ensure_future(self._sem.acquire())
        try:
            await asyncio.wait({waiter}, timeout=self.wait)
        except asyncio.CancelledError:
            if not waiter.cancel():  # it already holds the semaphore
                self._sem.release()
            raise
        finally:
            self.queued -= 1
        if not waiter.done():
            waiter.cancel()
            raise Busy(
                f"no run slot came free within {self.wait:g} s (AUTOCODER_QUEUE_TIMEOUT); retry later",
                status_code=503,
                retry_after=self.retry_after(),
            )
        self.running += 1
        return Slot(self)

    def _finished(self, seconds: float) -> None:
        self.running -= 1
        self._mean_run = 0.8 * self._mean_run + 0.2 * seconds
        self._sem.release()


# ---------------------------------------------------------------------------------------------
# The service: what the lifespan builds and every request shares


@dataclass
class Job:
    """A run started on behalf of a request."""

    run_id: str
    task: asyncio.Task[RunResult]


@dataclass
class Service:
    """Everything the lifespan builds and the endpoints share; one per app, on app.state."""

    settings: Settings
    runner: Runner
    pool: KernelPool
    store: RunStore
    admission: Admission
    runs: set[asyncio.Task[RunResult]] = field(default_factory=set)
    draining: bool = False

    async def admit(self) -> Slot:
        """A run slot, after waiting in the queue if need be; Busy when there is none to have."""
        if self.draining:
            raise Busy("the server is shutting down", status_code=503, retry_after=5)
        return await self.admission.acquire()

    def launch(
        self, slot: Slot, req: RunRequest, on_event: Callable[[Event], None] | None = None
    ) -> Job:
        """Start a run that owns `slot`, as its own task: the request that started it cancels
        it when the client leaves, and shutdown cancels what is left."""
        run_id = new_run_id()
        task = asyncio.create_task(self._run(req, run_id, on_event))
        task.add_done_callback(lambda _: slot.release())
        self.runs.add(task)
        task.add_done_callback(self.runs.discard)
        return Job(run_id, task)

    async def _run(
        self, req: RunRequest, run_id: str, on_event: Callable[[Event], None] | None
    ) -> RunResult:
        try:
            result = await self.runner.run(
                req.prompt,
                max_attempts=req.max_attempts,
                timeout=req.timeout,
                model=req.model,
                on_event=on_event,
                run_id=run_id,
            )
        except asyncio.CancelledError:
            # The runner has written the cancelled run's notebook; index it from there.
            await asyncio.shield(self._index(self.store.index_notebook, run_id))
            raise
        await self._index(self.store.add, result)
        return result

    async def _index(self, method: Callable[[Any], object], arg: Any) -> None:
        """The index is a cache of the notebooks: failing to update it never fails a run."""
        try:
            await asyncio.to_thread(method, arg)
        except Exception:
            log.exception("could not update the run index %s", self.store.path)

    async def drain(self, grace: float) -> None:
        """Take no new runs; give those running `grace` seconds, then cancel them. A cancelled
        run still ends as a result (recorded, kernel freed), so its request ends normally."""
        self.draining = True
        if self.runs:
            await asyncio.wait(set(self.runs), timeout=grace)
        await self._cancel_runs()

    async def _cancel_runs(self) -> None:
        for task in self.runs:
            task.cancel()
        if self.runs:
            await asyncio.wait(set(self.runs), timeout=CANCEL_GRACE)

    async def close(self) -> None:
        """Cancel whatever still runs, then shut the pool and the index."""
        self.draining = True
        await self._cancel_runs()
        await self.runner.close()
        await asyncio.to_thread(self.store.close)


def get_service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


ServiceDep = Annotated[Service, Depends(get_service)]

_bearer = HTTPBearer(auto_error=False, description="AUTOCODER_API_TOKEN, when the server has one.")


def _token(settings: Settings) -> str:
    return settings.api_token.get_secret_value() if settings.api_token else ""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse to offer code execution beyond this machine without a token."""
    if not _is_loopback(settings.host) and not _token(settings):
        raise ConfigError(
            f"refusing to listen on {settings.host or 'all addresses'} without AUTOCODER_API_TOKEN: "
            "set it (clients then send 'Authorization: Bearer <token>'), or bind to 127.0.0.1 "
            "(AUTOCODER_HOST / --host)"
        )


def _arrived_on_loopback(request: Request) -> bool:
    """The local address the request came in on. Unix sockets and in-process clients count as local."""
    server = request.scope.get("server")
    if not server:
        return True
    try:
        return ipaddress.ip_address(str(server[0])).is_loopback
    except ValueError:
        return True


def require_token(
    request: Request,
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    token = _token(service.settings)
    if not token:
        # `uvicorn autocoder.api:app --host 0.0.0.0` bypasses serve()'s check; this one holds.
        if not _arrived_on_loopback(request):
            raise HTTPException(
                403, "this server has no AUTOCODER_API_TOKEN, so it answers only on loopback"
            )
        return
    given = credentials.credentials if credentials else ""
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise HTTPException(
            401,
            "missing or wrong token: send 'Authorization: Bearer <AUTOCODER_API_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def checked_request(req: RunRequest, service: ServiceDep) -> RunRequest:
    """The limits that depend on the server's settings, reported like any validation error."""
    s = service.settings
    errors = []
    if len(req.prompt) > s.max_prompt_chars:
        errors.append(
            _error(
                "prompt",
                f"the prompt has {len(req.prompt):,} characters; this server takes at most "
                f"{s.max_prompt_chars:,} (AUTOCODER_MAX_PROMPT_CHARS)",
            )
        )
    if req.max_attempts is not None and req.max_attempts > s.max_request_attempts:
        errors.append(
            _error(
                "max_attempts",
                f"at most {s.max_request_attempts} attempts (AUTOCODER_MAX_REQUEST_ATTEMPTS)",
            )
        )
    if req.timeout is not None and req.timeout > s.max_request_timeout:
        errors.append(
            _error(
                "timeout", f"at most {s.max_request_timeout:g} s (AUTOCODER_MAX_REQUEST_TIMEOUT)"
            )
        )
    if errors:
        raise RequestValidationError(errors)
    return req


def _error(name: str, msg: str) -> dict[str, Any]:
    return {"loc": ["body", name], "msg": msg, "type": "value_error"}


CheckedRequest = Annotated[RunRequest, Depends(checked_request)]
RunId = Annotated[
    str,
    PathParam(pattern=RUN_ID_PATTERN, description="A run id, as returned by `POST /run`."),
]


# ---------------------------------------------------------------------------------------------
# Waiting on behalf of a client that may leave


async def _disconnected(request: Request) -> None:
    """Return when the client has gone. The body is read by now, so only a disconnect can come."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, aw: Awaitable[T]) -> T:
    """Await `aw`, but cancel it and raise ClientGone as soon as the client hangs up."""
    work = asyncio.ensure_future(aw)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # shutdown gave up waiting on this request
        work.cancel()
        raise
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        raise ClientGone
    if work.cancelled():
        raise RunCancelled
    return work.result()


async def _cancel_when_gone(request: Request, task: asyncio.Task[Any]) -> None:
    await _disconnected(request)
    task.cancel()


def _sse(name: str, data: str, seq: int) -> str:
    return f"id: {seq}\nevent: {name}\ndata: {data}\n\n"


async def _event_stream(
    task: asyncio.Task[RunResult], events: asyncio.Queue[Event | None], watcher: asyncio.Task[None]
) -> AsyncIterator[str]:
    seq = 0
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                yield ": keepalive\n\n"
                continue
            if event is None:
                break
            seq += 1
            yield _sse(event.type, event.model_dump_json(), seq)
        if not task.cancelled() and (exc := task.exception()) is not None:
            if not isinstance(exc, AutocoderError):
                log.error("run failed", exc_info=exc)
            yield _sse("server_error", json.dumps({"detail": _fault(exc)}), seq + 1)
    finally:
        watcher.cancel()
        task.cancel()  # the client stopped reading; a finished task ignores this


def _fault(exc: BaseException) -> str:
    if isinstance(exc, ConfigError):
        return f"autocoder is misconfigured: {exc}"
    if isinstance(exc, AutocoderError):
        return str(exc)
    return "internal server error (see the server's log)"


# ---------------------------------------------------------------------------------------------
# Endpoints

router = APIRouter(dependencies=[Depends(require_token)])
public = APIRouter()

_RUN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The run's result (also when every attempt failed: see `status`). "
        "With `Accept: text/event-stream`, the run's events as server-sent events instead.",
        "content": {SSE_MEDIA_TYPE: {"schema": {"type": "string"}}},
    },
    401: {"model": ErrorBody, "description": "A token is required and was missing or wrong."},
    422: {"description": "The request is malformed or beyond the server's limits."},
    429: {
        "model": ErrorBody,
        "description": "Too many runs in progress and waiting; see Retry-After.",
    },
    503: {"model": ErrorBody, "description": "No run slot came free in time; see Retry-After."},
}
_STREAM_DOC = (
    "Events, each `event: <type>` with `data:` a JSON object `{type, run_id, attempt, data}`: "
    "`run_started`; per attempt `attempt_started`, `code_generated` (the code), `output` "
    "(each output as it appears; errors have `output_type: error`), `attempt_finished` (its "
    "status, error and error_kind); and `run_finished`, whose data is the result without the "
    "attempts. A failure of the server itself ends the stream with `server_error`. A comment "
    f"line is sent every {KEEPALIVE_SECONDS:g} s of silence. Closing the connection cancels the run."
)


@router.post(
    "/run",
    response_model=RunResult,
    responses=_RUN_RESPONSES,
    summary="Generate code for a prompt, run it, retry on failure",
    description="Answers when the run is over, HTTP 200 whether it succeeded or not; 5xx means "
    "autocoder itself failed. With `Accept: text/event-stream` it streams like `/run/stream`. "
    "Closing the connection cancels the run.",
)
async def run(req: CheckedRequest, request: Request, service: ServiceDep) -> Any:
    if SSE_MEDIA_TYPE in request.headers.get("accept", ""):
        return await _start_stream(req, request, service)
    slot = await _unless_disconnected(request, service.admit())
    job = service.launch(slot, req)
    try:
        return await _unless_disconnected(request, job.task)
    except RunCancelled:
        raise Busy(
            f"the server shut down before the run finished; run {job.run_id} was cancelled",
            status_code=503,
            retry_after=5,
        ) from None
    except ConfigError as e:
        if req.model:  # most likely the endpoint does not serve the model asked for
            raise RequestValidationError(
                [_error("model", f"the model endpoint cannot use the model {req.model!r}: {e}")]
            ) from e
        raise


@router.post(
    "/run/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": _STREAM_DOC,
            "content": {SSE_MEDIA_TYPE: {"schema": {"type": "string"}}},
        },
        **{k: v for k, v in _RUN_RESPONSES.items() if k != 200},
    },
    summary="Like POST /run, streaming the run's progress as server-sent events",
    description=_STREAM_DOC,
)
async def run_stream(
    req: CheckedRequest, request: Request, service: ServiceDep
) -> StreamingResponse:
    return await _start_stream(req, request, service)


async def _start_stream(req: RunRequest, request: Request, service: Service) -> StreamingResponse:
    slot = await _unless_disconnected(request, service.admit())
    events: asyncio.Queue[Event | None] = asyncio.Queue()
    task = service.launch(slot, req, on_event=events.put_nowait).task
    task.add_done_callback(lambda _: events.put_nowait(None))
    watcher = asyncio.create_task(_cancel_when_gone(request, task))
    return StreamingResponse(
        _event_stream(task, events, watcher),
        media_type=SSE_MEDIA_TYPE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/runs", summary="Run history, newest first")
async def list_runs(
    service: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Runs per page.")] = 20,
    offset: Annotated[int, Query(ge=0, description="How many newer runs to skip.")] = 0,
    status: Annotated[
        Literal["success", "error"] | None, Query(description="Only runs that ended so.")
    ] = None,
) -> RunPage:
    runs, total = await asyncio.to_thread(
        service.store.list, limit=limit, offset=offset, status=status
    )
    return RunPage(runs=runs, total=total, limit=limit, offset=offset)


@router.get(
    "/runs/{run_id}",
    response_model=RunResult,
    responses={404: {"model": ErrorBody, "description": "No such run."}},
    summary="One run's whole record, every attempt included",
)
async def get_run(run_id: RunId, service: ServiceDep) -> RunResult:
    result = await asyncio.to_thread(service.store.get, run_id)
    if result is None:
        raise HTTPException(404, f"no run {run_id!r}")
    return result


@router.get(
    "/runs/{run_id}/notebook",
    response_class=FileResponse,
    responses={
        200: {"description": "The notebook (nbformat v4).", "content": {IPYNB_MEDIA_TYPE: {}}},
        404: {"model": ErrorBody, "description": "No such run."},
    },
    summary="Download a run's notebook",
)
async def get_notebook(run_id: RunId, service: ServiceDep) -> FileResponse:
    root = service.settings.notebooks_dir
    path = notebook_path(root, run_id)
    inside = await asyncio.to_thread(
        lambda: path.is_file() and path.resolve().is_relative_to(root.resolve())
    )
    if not inside:
        raise HTTPException(404, f"no run {run_id!r}")
    return FileResponse(path, media_type=IPYNB_MEDIA_TYPE, filename=f"{run_id}.ipynb")


@public.get(
    "/health",
    responses={503: {"model": Health, "description": "Degraded: kernels cannot be started."}},
    summary="Is the service ready (kernels, model endpoint)? No token needed",
)
async def health(service: ServiceDep, response: Response) -> Health:
    s = service.settings
    pool = service.pool
    degraded = pool.size > 0 and pool.ready == 0 and pool.last_error is not None
    if degraded:
        response.status_code = 503
    endpoint = (s.openai_base_url or DEFAULT_OPENAI_URL) if s.uses_remote_endpoint else None
    return Health(
        status="degraded" if degraded else "ok",
        version=__version__,
        kernels_ready=pool.ready,
        pool_size=pool.size,
        kernel_error=pool.last_error,
        llm_backend="openai" if s.uses_remote_endpoint else "local",
        llm_endpoint=_without_credentials(endpoint) if endpoint else None,
        llm_model=s.model,
        runs_running=service.admission.running,
        runs_queued=service.admission.queued,
        max_concurrent_runs=s.max_concurrent_runs,
        max_queued_runs=s.max_queued_runs,
    )


def _without_credentials(url: str) -> str:
    parts = urlparse(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host).geturl()


# ---------------------------------------------------------------------------------------------
# Errors → status codes (the only place that knows about them)


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = [_explain(e) for e in exc.errors()]
    message = "; ".join(f"{_where(d['loc'])}: {d['msg']}" for d in detail)
    return JSONResponse({"detail": detail, "message": message}, status_code=422)


def _explain(error: dict[str, Any]) -> dict[str, Any]:
    """One validation error, without the echoed input, in words a curl user can act on."""
    loc, kind, msg = list(error.get("loc", ())), error.get("type", ""), str(error.get("msg", ""))
    if kind == "json_invalid":
        loc, msg = (
            ["body"],
            f"the body is not valid JSON ({error.get('ctx', {}).get('error', msg)})",
        )
    elif loc == ["body"]:
        msg += ': send a JSON object such as {"prompt": "..."} with Content-Type: application/json'
    return {"loc": loc, "msg": msg, "type": kind}


def _where(loc: list[Any]) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


async def _busy(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Busy)
    return JSONResponse(
        {"detail": str(exc)},
        status_code=exc.status_code,
        headers={"Retry-After": str(exc.retry_after)},
    )


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _our_fault(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AutocoderError)
    status = 503 if isinstance(exc, KernelStartError) else 500
    log.error("%s %s failed: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": _fault(exc)}, status_code=status)


class BodyLimit:
    """Refuse a request body bigger than any valid run request, before it is read into memory."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(scope.get("app"), "state", None)
        limit = getattr(state, "body_limit", None)
        if scope["type"] != "http" or limit is None:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _too_large(limit)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"the request body is over {limit:,} bytes")
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"the request body is over {limit:,} bytes"}, status_code=413)


# ---------------------------------------------------------------------------------------------
# The app


DESCRIPTION = """\
Turn a plain-English prompt into working Python code: a model writes it, a fresh sandboxed
Jupyter kernel runs it, failures go back to the model, and every run is saved as a notebook.

`POST /run` answers with the original AutoCoder contract (`status`, `filename`, `code`,
`output`, `error`) plus the run's record. When AUTOCODER_API_TOKEN is set, every endpoint but
`/health` (and these docs) needs `Authorization: Bearer <token>`.
"""


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Output floods arrive on pyzmq's I/O thread; glibc keeps what they freed in that thread's
    arena unless arenas are few. Measured over a 400-run soak: 106 MiB resident, not 299."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; its state is built when it starts, from `settings` or else the environment."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings or load_settings()
        check_exposure(s)
        limit_malloc_arenas()
        await asyncio.to_thread(sandbox.check_available, s)
        store = RunStore(s.notebooks_dir)
        await asyncio.to_thread(store.open)
        pool = KernelPool(s)
        service = Service(
            settings=s,
            runner=Runner(s, kernels=pool),
            pool=pool,
            store=store,
            admission=Admission(s.max_concurrent_runs, s.max_queued_runs, s.queue_timeout),
        )
        app.state.service = service
        # Any valid request fits: a prompt at the limit, every character escaped as \uXXXX\uXXXX.
        app.state.body_limit = s.max_prompt_chars * 12 + 64 * 1024
        pool.start()
        try:
            yield
        finally:
            await service.close()
            del app.state.service

    app = FastAPI(
        title="autocoder",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.include_router(router)
    app.include_router(public)
    app.add_middleware(BodyLimit)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Busy, _busy)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(AutocoderError, _our_fault)

    return app


app = create_app()


class _Server(uvicorn.Server):
    """uvicorn that lets the service drain when shutdown begins, so that runs still going after
    the grace period end as cancelled results rather than as cancelled requests."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float) -> None:
        super().__init__(config)
        self.autocoder_app = app
        self.grace = grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        service: Service | None = getattr(self.autocoder_app.state, "service", None)
        draining = asyncio.create_task(service.drain(self.grace)) if service else None
        await super().shutdown(sockets=sockets)
        if draining is not None:
            await draining


def serve(settings: Settings) -> None:
    """`autocoder serve`: uvicorn on AUTOCODER_HOST:AUTOCODER_PORT until SIGTERM or Ctrl-C.

    At shutdown, runs in progress get AUTOCODER_SHUTDOWN_GRACE seconds to finish; the rest
    are cancelled, recorded, and answered (503, or the end of their event stream).
    """
    check_exposure(settings)
    sandbox.check_available(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        # A backstop only: drain() has cancelled every run by then.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace + CANCEL_GRACE),
    )
    server = _Server(config, app, settings.shutdown_grace)
    try:
        server.run()
    except KeyboardInterrupt:
        # uvicorn re-raises the SIGINT/SIGTERM it handled once it has shut down cleanly.
        if not server.started:
            raise
    if not server.started:
        raise AutocoderError(
            f"the server did not start on {settings.host}:{settings.port} (see the log above)"
        )

"""The app: its lifespan builds the service; `serve()` runs it under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import logging
import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from autocoder import __version__, engine, languages
from autocoder.api import errors
from autocoder.api.admission import Admission, Busy
from autocoder.api.auth import PUBLIC_PATHS, check_exposure
from autocoder.api.routes import execute, files, health, pages, runs
from autocoder.api.routes import sessions as session_routes
from autocoder.api.schemas import request_components, session_components, session_run_components
from autocoder.api.service import CANCEL_GRACE, Service
from autocoder.api.timeouts import protocol_for
from autocoder.config import Settings, load_settings
from autocoder.errors import AutocoderError, ConfigError

log = logging.getLogger(__name__)

M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3
# Blocks this big or bigger are mapped apart and unmapped when freed (glibc's default, 128 KiB,
# rises on its own; see limit_malloc_growth).
MMAP_THRESHOLD = 256 * 1024


DESCRIPTION = """\
Turn a plain-English prompt into working Python code: a model writes it, a fresh sandboxed
Jupyter kernel runs it, failures go back to the model, and every run is saved as a notebook.

`POST /run` answers with the original AutoCoder contract (`status`, `filename`, `code`,
`output`, `error`) plus the run's record. `POST /sessions` opens a session whose kernel and
working directory are kept between prompts (`POST /sessions/{session_id}/run`).
When AUTOCODER_API_TOKEN is set, every endpoint but `/health` (and these docs) needs
`Authorization: Bearer <token>`.
"""


def limit_malloc_growth(arenas: int = 2, mmap_threshold: int = MMAP_THRESHOLD) -> None:
    """Keep what output floods freed from staying in the server's heap (glibc's malloc).

    - Few arenas: floods arrive on pyzmq's I/O thread, and glibc keeps what they freed in
      that thread's arena unless arenas are few (docs/security.md, "Soak": before kernels
      cut their own floods, a 400-run soak ended at 106 MiB resident with 2, 299 without).
    - A fixed mmap threshold: glibc raises its threshold to the size of each mapped block
      that is freed (up to 32 MiB), so after the first flood the megabyte-sized copies of a
      run's kept output (the record, the notebook, the answer's JSON) came from the heap and
      stayed there. Fixed, each block that size is its own mapping, unmapped when freed: six
      floods through `POST /run` cost +5 MB, not +21 to +26 MB (`python bench/flood.py`).
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, arenas)
        libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; its state is built when it starts, from `settings` or else the environment."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings or load_settings()
        check_exposure(s)
        limit_malloc_growth()
        async with engine.open_engine(s) as opened, contextlib.AsyncExitStack() as stack:
            service = Service(
                engine=opened,
                admission=Admission(s.max_concurrent_runs, s.max_queued_runs, s.queue_timeout),
            )
            # Left first: MCP calls still running end (cancelled, recorded) before the
            # service and the engine close.
            app.state.mcp = await stack.enter_async_context(_mcp_over_http(service))
            app.state.mcp_body_limit = _mcp_body_limit(s)
            app.state.service = service
            # Any valid request fits: a prompt (or code) at the limit, every character escaped
            # as \uXXXX\uXXXX.
            app.state.body_limit = max(s.max_prompt_chars, s.max_code_chars) * 12 + 64 * 1024
            # Files are checked one by one after parsing; this only stops a body that cannot pass.
            app.state.multipart_limit = (
                app.state.body_limit + s.max_upload_mb * 1024 * 1024 + (s.max_files + 8) * 1024
            )
            try:
                yield
            finally:
                app.state.mcp = None
                await stack.aclose()
                await service.close()
                del app.state.service

    app = FastAPI(
        title="autocoder",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by routes.pages from local assets, never a CDN
        redoc_url=None,
    )
    app.include_router(runs.router)
    app.include_router(execute.router)
    app.include_router(files.router)
    app.include_router(session_routes.router)
    app.include_router(health.router)
    # The MCP server over Streamable HTTP, on this app's engine (built in the lifespan),
    # behind auth.Guard like every other path.
    app.router.routes.append(Route("/mcp", endpoint=_McpEndpoint(), include_in_schema=False))
    pages.mount(app)
    errors.install(app)
    app.openapi = lambda: openapi_schema(app, settings or load_settings())  # type: ignore[method-assign]
    return app


@contextlib.asynccontextmanager
async def _mcp_over_http(service: Service) -> AsyncIterator[ASGIApp]:
    """The MCP door on the service's engine; its calls take run slots as `POST /run` does."""
    from autocoder.mcp.server import Door, Refused, http_app  # start-up time: only to serve

    @contextlib.asynccontextmanager
    async def slot() -> AsyncIterator[None]:
        try:
            taken = await service.admit()
        except Busy as e:
            raise Refused(f"{e} (retry after {e.retry_after} s)") from None
        try:
            yield
        finally:
            taken.release()

    async with http_app(Door(service.settings, slot, service.engine)) as mcp_app:
        yield mcp_app


def _mcp_body_limit(settings: Settings) -> int:
    from autocoder.mcp.server import request_body_limit  # start-up time, as above

    return request_body_limit(settings)


class _McpEndpoint:
    """`/mcp`: hands the request to the MCP app the lifespan built (503 before it has)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        mcp_app = getattr(scope["app"].state, "mcp", None)
        if mcp_app is None:
            await JSONResponse({"detail": "the server is starting"}, status_code=503)(
                scope, receive, send
            )
            return
        await mcp_app(scope, receive, send)


def openapi_schema(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The OpenAPI document of this server as configured: its limits, and a bearer scheme
    only when it has a token (auth.Guard enforces both; the document just says so)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    # /run and /execute read their bodies themselves (JSON or multipart), so their schemas
    # are added here.
    schema.setdefault("components", {}).setdefault("schemas", {}).update(request_components())
    schema["components"]["schemas"].update(session_components())
    session = schema["components"]["schemas"]["SessionRequest"]["properties"]
    _bound(session["timeout"], "maximum", settings.max_request_timeout)
    request = schema["components"]["schemas"]["RunRequest"]["properties"]
    request["prompt"]["maxLength"] = settings.max_prompt_chars
    request["prompt"]["pattern"] = r"\S"  # not blank (the model's validator says so in words)
    _bound(request["max_attempts"], "maximum", settings.max_request_attempts)
    _bound(request["candidates"], "maximum", settings.max_request_candidates)
    _bound(request["timeout"], "maximum", settings.max_request_timeout)
    execute = schema["components"]["schemas"]["ExecuteRequest"]["properties"]
    execute["code"]["maxLength"] = settings.max_code_chars
    execute["code"]["pattern"] = r"\S"
    _bound(execute["timeout"], "maximum", settings.max_request_timeout)
    for language in (request["language"], execute["language"]):
        for choice in language.get("anyOf", [language]):
            if choice.get("type") == "string":  # the languages this server has kernels for
                choice["enum"] = languages.installed(settings)
    schema["components"]["schemas"].update(session_run_components(schema["components"]["schemas"]))
    token = bool(settings.api_token)
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if token and path not in PUBLIC_PATHS:
                operation["security"] = [{"bearer": []}]
                responses["401"] = {
                    "description": "The token was missing or wrong.",
                    "content": {"application/json": {"schema": _ERROR_REF}},
                }
            responses["403"] = {
                "description": "The Host or Origin is not this server's (DNS rebinding), or "
                "a request without a token arrived on a non-loopback address.",
                "content": {"application/json": {"schema": _ERROR_REF}},
            }
            if "requestBody" in operation:
                responses["400"] = {
                    "description": "The body could not be decoded (not UTF-8 JSON).",
                    "content": {"application/json": {"schema": _ERROR_REF}},
                }
                responses["413"] = {
                    "description": "The body is larger than any valid request.",
                    "content": {"application/json": {"schema": _ERROR_REF}},
                }
            sse = responses.get("200", {}).get("content", {}).get("text/event-stream")
            if sse is not None:
                sse["schema"] = _SSE_EVENT
    if token:
        schema["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "AUTOCODER_API_TOKEN."}
        }
    app.openapi_schema = schema
    return schema


_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
# One server-sent event (OpenAPI before 3.2 has `schema` describe each event of a stream).
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "description": "The event's type (see the description)."},
        "id": {"type": "string", "description": "Its sequence number in this stream."},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "A JSON object `{type, run_id, attempt, data}`; for `server_error`, "
            "`{detail}`.",
        },
    },
}


def _bound(prop: dict[str, Any], key: str, value: float) -> None:
    """Put a bound on a nullable property, whichever way pydantic wrote it."""
    for choice in prop.get("anyOf", [prop]):
        if choice.get("type") in {"integer", "number"}:
            choice[key] = value


class _Server(uvicorn.Server):
    """uvicorn that lets the service drain when shutdown begins, so that runs still going after
    the grace period end as cancelled results rather than as cancelled requests."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float) -> None:
        super().__init__(config)
        self.autocoder_app = app
        self.grace = grace

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        # What the server imported and built to start (~250k objects with every extra: a
        # full collection of them takes ~100 ms) lives as long as it does: the collector
        # stops walking it, and a run no longer waits out a 100 ms pause now and then.
        gc.collect()
        gc.freeze()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        service: Service | None = getattr(self.autocoder_app.state, "service", None)
        draining = asyncio.create_task(service.drain(self.grace)) if service else None
        await super().shutdown(sockets=sockets)
        if draining is not None:
            await draining


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is one clear line (uvicorn would
    log it and exit before we could say anything)."""
    try:
        family, *_, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError as e:
        sock.close()
        hint = (
            " (is another server running there? choose --port)"
            if e.errno == errno.EADDRINUSE
            else ""
        )
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    return sock


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn options every server of this app uses: read deadlines for slow clients."""
    return {"http": protocol_for(settings.header_timeout, settings.body_timeout)}


def serve(settings: Settings) -> None:
    """`autocoder serve`: uvicorn on AUTOCODER_HOST:AUTOCODER_PORT until SIGTERM or Ctrl-C.

    At shutdown, runs in progress get AUTOCODER_SHUTDOWN_GRACE seconds to finish; the rest
    are cancelled, recorded, and answered (503, or the end of their event stream).
    """
    check_exposure(settings)
    engine.check(settings)
    sock = _listen(settings.host, settings.port)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        **server_options(settings),
        # A backstop only: drain() has cancelled every run by then.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace + CANCEL_GRACE),
    )
    server = _Server(config, app, settings.shutdown_grace)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn re-raises the SIGINT/SIGTERM it handled once it has shut down cleanly.
        if not server.started:
            raise
    finally:
        sock.close()
    if not server.started:
        raise AutocoderError(
            f"the server did not start on {settings.host}:{settings.port} (see the log above)"
        )

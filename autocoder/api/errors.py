"""Errors → status codes: the only place that knows about them."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from autocoder.api.admission import Busy
from autocoder.api.auth import Guard
from autocoder.errors import (
    AutocoderError,
    ConfigError,
    DiskFull,
    KernelStartError,
    StoreUnavailable,
)
from autocoder.sessions import SessionBusy, SessionGone, SessionsFull

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's code: nobody reads it, but the access log says what happened
INSUFFICIENT_STORAGE = 507


class ClientGone(Exception):
    """The client hung up before the answer was ready; whatever it asked for was cancelled."""


class RunCancelled(Exception):
    """The server cancelled the run (it is shutting down); the run is recorded as cancelled."""


def fault_message(exc: BaseException) -> str:
    if isinstance(exc, ConfigError):
        return f"autocoder is misconfigured: {exc}"
    if isinstance(exc, AutocoderError):
        return str(exc)
    return "internal server error (see the server's log)"


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
        msg += (
            ': send a JSON object such as {"prompt": "..."} ({"code": "..."} to /execute) '
            "with Content-Type: application/json"
        )
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


async def _session_refused(request: Request, exc: Exception) -> JSONResponse:
    """Unknown or closed: 404 (the message says which); busy: 409; too many open: 429."""
    if isinstance(exc, SessionsFull):
        return JSONResponse(
            {"detail": str(exc)}, status_code=429, headers={"Retry-After": str(exc.retry_after)}
        )
    return JSONResponse(
        {"detail": str(exc)}, status_code=409 if isinstance(exc, SessionBusy) else 404
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    """As FastAPI answers, except that a 405's `Allow` lists every method of the path: Starlette
    lists only those of one route, and `/sessions` (GET, POST) is two."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code != 405:
        return await http_exception_handler(request, exc)
    methods: set[str] = set()
    for route in _leaf_routes(request.app.routes):
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(methods))} if methods else None
    return JSONResponse({"detail": exc.detail}, status_code=405, headers=headers)


def _leaf_routes(routes: Any) -> Any:
    """The app's routes, with those of included routers (none has a prefix) in place."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaf_routes(inner.routes)
        else:
            yield route


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _our_fault(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AutocoderError)
    status = 503 if isinstance(exc, KernelStartError | StoreUnavailable) else 500
    if isinstance(exc, DiskFull):
        status = INSUFFICIENT_STORAGE
    log.error("%s %s failed: %s", request.method, request.url.path, exc)
    headers = {"Retry-After": "5"} if isinstance(exc, StoreUnavailable) else None
    return JSONResponse({"detail": fault_message(exc)}, status_code=status, headers=headers)


# How much of a refused body is read (and dropped) before the 413 is sent. A client that is
# still sending when the server closes gets a connection reset, not the answer (urllib always,
# the others when the reset lands before they read); past this, or AUTOCODER_BODY_TIMEOUT, it
# does. Reading costs no memory: a valid upload (held while it is checked) costs more.
DRAIN_BYTES = 256 * 1024 * 1024


class BodyLimit:
    """Refuse a request body bigger than any valid request, before it is read into memory.

    The 413 goes out once the client has sent the rest of its body, read and dropped up to
    DRAIN_BYTES, so that every client sees it; a client that asked `Expect: 100-continue`
    (curl) is answered before it sends anything."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(scope.get("app"), "state", None)
        limit = getattr(state, "body_limit", None)
        if scope["type"] != "http" or limit is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/form-data")
        if multipart:
            limit = getattr(state, "multipart_limit", limit)
        if scope["path"] == "/mcp":  # an MCP call may carry a file (upload_file), base64'd
            limit = getattr(state, "mcp_body_limit", limit)
        service = getattr(state, "service", None)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            waits = headers.get(b"expect", b"").lower() == b"100-continue"
            if not waits and int(declared) <= DRAIN_BYTES:
                await _drain(receive, DRAIN_BYTES)
            refusal = {"detail": _too_large(limit, multipart, service)}
            await JSONResponse(refusal, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                if message.get("more_body"):
                    await _drain(receive, DRAIN_BYTES)
                raise HTTPException(413, _too_large(limit, multipart, service))
            return message

        await self.app(scope, counted, send)


async def _drain(receive: Receive, bound: int) -> None:
    """Read and drop the rest of a request's body, up to `bound` bytes (or a disconnect)."""
    read = 0
    while read <= bound:
        message = await receive()
        read += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return


def _too_large(limit: int, multipart: bool, service: Any) -> str:
    """The 413's message, naming the setting that bounds what the body carries."""
    detail = f"the request body is over {limit:,} bytes"
    if service is not None:
        s = service.settings
        detail += (
            f"; a run's files may add up to {s.max_upload_mb} MB (AUTOCODER_MAX_UPLOAD_MB)"
            if multipart
            else f"; a prompt may have {s.max_prompt_chars:,} characters "
            f"(AUTOCODER_MAX_PROMPT_CHARS), code {s.max_code_chars:,} (AUTOCODER_MAX_CODE_CHARS)"
        )
    return detail


def install(app: FastAPI) -> None:
    """Every translation of an exception into a status code, and the body limit."""
    app.add_middleware(BodyLimit)
    app.add_middleware(Guard)  # outermost: nothing is read for a request that is refused
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Busy, _busy)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for refusal in (SessionGone, SessionBusy, SessionsFull):
        app.add_exception_handler(refusal, _session_refused)
    app.add_exception_handler(AutocoderError, _our_fault)

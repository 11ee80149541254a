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
        headers = dict(scope["headers"])
        if headers.get(b"content-type", b"").startswith(b"multipart/form-data"):
            limit = getattr(state, "multipart_limit", limit)
        declared = headers.get(b"content-length", b"")
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

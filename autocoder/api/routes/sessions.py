"""Sessions over HTTP: open one, run prompts in it, read its record, notebook and files, close it.

The engine is `autocoder.sessions`; this module only translates. Unknown or closed ids are
404 (the message says which), a second prompt while one runs is 409, too many open sessions
429 with Retry-After (see the errors module). Runs take a run slot like `POST /run` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from autocoder.api.admission import Slot
from autocoder.api.deps import (
    PageLimit,
    PageOffset,
    RunInputDep,
    ServiceDep,
    SessionId,
    SessionInputDep,
    field_error,
)
from autocoder.api.downloads import download
from autocoder.api.links import session_links
from autocoder.api.routes.files import FileName
from autocoder.api.routes.runs import (
    _STREAM_DOC,
    IPYNB_MEDIA_TYPE,
    answer,
    stream,
    wants_stream,
)
from autocoder.api.schemas import (
    ErrorBody,
    SessionPage,
    SessionRunResult,
    run_request_body,
    session_request_body,
)
from autocoder.api.service import Service
from autocoder.api.streaming import SSE_MEDIA_TYPE, unless_disconnected
from autocoder.errors import ConfigError
from autocoder.files import FileRefused, FilesTooLarge, InputFile, media_type, open_beneath
from autocoder.records import RunResult, SessionInfo
from autocoder.sessions import Session
from autocoder.store.base import StoredFile

router = APIRouter()  # auth.Guard checks the token before a body is read


def open_session(session_id: SessionId, service: ServiceDep) -> Session:
    """The open session the path names; resolved before the body is read, so a request for
    an unknown or closed session gets its 404 without uploading anything."""
    return service.sessions.open_session(session_id)


OpenSessionDep = Annotated[Session, Depends(open_session)]

_GONE: dict[int | str, dict[str, Any]] = {
    404: {
        "model": ErrorBody,
        "description": "No such session, or it is closed (the message says which).",
    }
}


@router.post(
    "/sessions",
    status_code=201,
    responses={
        201: {"description": "The session, open, with its kernel started."},
        422: {"description": "The request is malformed or beyond the server's limits."},
        429: {
            "model": ErrorBody,
            "description": "AUTOCODER_MAX_SESSIONS are open; see Retry-After.",
        },
        507: {"model": ErrorBody, "description": "The disk holding the records is full."},
    },
    summary="Open a session: one sandboxed kernel and working directory kept between prompts",
    description="The session's kernel keeps variables, imports and files from one prompt to "
    "the next. Files go as multipart/form-data `files` parts (read-only in its working "
    "directory). It closes after AUTOCODER_SESSION_IDLE_TIMEOUT without use, at "
    "AUTOCODER_SESSION_MAX_AGE, or on `DELETE`.",
    openapi_extra=session_request_body(),
)
async def create_session(given: SessionInputDep, service: ServiceDep) -> SessionInfo:
    session = await service.sessions.create(
        timeout=given.req.timeout, model=given.req.model, inputs=given.files
    )
    return session_links(await asyncio.to_thread(service.sessions.describe, session))


@router.get("/sessions", summary="Sessions, newest first (closed ones included)")
async def list_sessions(
    service: ServiceDep,
    limit: PageLimit = 20,
    offset: PageOffset = 0,
) -> SessionPage:
    sessions, total = service.sessions.listing(limit, offset)
    return SessionPage(sessions=sessions, total=total, limit=limit, offset=offset)


@router.get(
    "/sessions/{session_id}",
    responses={404: {"model": ErrorBody, "description": "No such session."}},
    summary="One session: its runs so far, its files, when it expires",
)
async def get_session(session_id: SessionId, service: ServiceDep) -> SessionInfo:
    session = service.sessions.find(session_id)
    return session_links(await asyncio.to_thread(service.sessions.describe, session))


@router.delete(
    "/sessions/{session_id}",
    responses=_GONE,
    summary="Close a session: its kernel is stopped, its record, notebook and files kept",
)
async def delete_session(session_id: SessionId, service: ServiceDep) -> SessionInfo:
    session = service.sessions.open_session(session_id)
    await service.sessions.end(session, "deleted")
    return session_links(await asyncio.to_thread(service.sessions.describe, session))


@router.post(
    "/sessions/{session_id}/run",
    response_model=SessionRunResult,
    responses={
        200: {
            "description": "The run's result, as `POST /run` gives it, plus `session_id` and "
            "`state_lost`. With `Accept: text/event-stream`, its events instead: " + _STREAM_DOC,
            "content": {SSE_MEDIA_TYPE: {"schema": {"type": "string"}}},
        },
        **_GONE,
        409: {"model": ErrorBody, "description": "The session is running another prompt."},
        422: {"description": "The request is malformed or beyond the server's limits."},
        429: {
            "model": ErrorBody,
            "description": "Too many runs in progress and waiting; see Retry-After.",
        },
        503: {"model": ErrorBody, "description": "No run slot came free in time; see Retry-After."},
        507: {"model": ErrorBody, "description": "The disk holding the records is full."},
    },
    summary="Run a prompt in a session: the code sees what earlier prompts left",
    description="The same fields as `POST /run` (JSON, or multipart/form-data with `files` "
    "parts, which join the session's working directory). The model is told the session's "
    "earlier prompts with the code that worked, its variables' names and types, and its "
    "files. A second prompt sent while one runs gets 409. Closing the connection cancels "
    "the run; the session stays.",
    openapi_extra=run_request_body("Session"),
)
async def run_in_session(
    session_id: SessionId,
    known: OpenSessionDep,
    given: RunInputDep,
    request: Request,
    service: ServiceDep,
) -> Any:
    if given.req.language not in (None, "python"):
        raise RequestValidationError(
            [field_error("language", "a session's kernel is Python; use POST /run for others")]
        )
    if given.req.candidates not in (None, 1):
        raise RequestValidationError(
            [
                field_error(
                    "candidates",
                    "a session's kernel keeps state, so its runs draw one candidate; "
                    "use POST /run for more",
                )
            ]
        )
    session, slot = await claim_and_admit(request, service, known.info.session_id, given.files)
    if wants_stream(request):
        return stream(request, service, slot, given.req, given.files, session)
    job = service.launch(slot, given.req, files=given.files, session=session)
    try:
        result = await answer(request, service, job)
    except ConfigError as e:
        if given.req.model:
            raise RequestValidationError(
                [
                    field_error(
                        "model", f"the model endpoint cannot use the model {given.req.model!r}: {e}"
                    )
                ]
            ) from e
        raise
    return _with_session(result, session)


async def claim_and_admit(
    request: Request, service: Service, session_id: str, files: Sequence[InputFile]
) -> tuple[Session, Slot]:
    """The session claimed for one run (404 unknown or closed, 409 busy; its new files
    checked: 413, 422), then a run slot; the claim is let go should no slot come."""
    sessions = service.sessions
    try:
        session = sessions.claim(session_id, files)
    except FilesTooLarge as e:
        raise HTTPException(413, str(e)) from None
    except FileRefused as e:
        raise RequestValidationError([field_error("files", str(e))]) from None
    try:
        slot = await unless_disconnected(request, service.admit())
    except BaseException:
        sessions.release(session)
        raise
    return session, slot


def _with_session(result: RunResult, session: Session) -> SessionRunResult:
    return SessionRunResult(
        **result.model_dump(exclude={"session_id"}),
        session_id=session.info.session_id,
        state_lost=session.lost_during(result.run_id),
    )


@router.get(
    "/sessions/{session_id}/notebook",
    response_class=Response,
    responses={
        200: {
            "description": "The session's notebook (nbformat v4): each prompt, then the code "
            "that worked; Run All reproduces the session's final state.",
            "content": {IPYNB_MEDIA_TYPE: {}},
        },
        404: {"model": ErrorBody, "description": "No such session."},
    },
    summary="Download a session's notebook",
)
async def get_session_notebook(session_id: SessionId, service: ServiceDep) -> Response:
    session = service.sessions.find(session_id)
    path = session.notebook_path()
    opened = await asyncio.to_thread(open_beneath, path.parent, path.name)
    if opened is None:
        raise HTTPException(404, f"session {session_id!r} has no notebook")
    return await download(
        StoredFile(opened.name, opened=opened), IPYNB_MEDIA_TYPE, f"{session_id}.ipynb"
    )


@router.get(
    "/sessions/{session_id}/files/{name:path}",
    response_class=Response,
    responses={
        200: {"description": "The file, as it is in the session's working directory now."},
        404: {"model": ErrorBody, "description": "No such session, or no such file in it."},
    },
    summary="Download a file from a session's working directory",
)
async def get_session_file(session_id: SessionId, name: FileName, service: ServiceDep) -> Response:
    """Served only from the session's own directory, opened once by descriptor (no `..`, no
    absolute name, no symlink): the session's code may be swapping names while it is served."""
    session = service.sessions.find(session_id)
    opened = await asyncio.to_thread(open_beneath, session.workdir, name)
    if opened is None:
        raise HTTPException(404, f"session {session_id!r} has no file {name!r}")
    return await download(StoredFile(opened.name, opened=opened), media_type(name))

"""Runs: start one (plain or streamed), the history, one run's record and notebook."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
from collections.abc import Iterator, Sequence
from typing import IO, Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse

from autocoder import bundle, languages
from autocoder.api.admission import Busy, Slot
from autocoder.api.deps import (
    PageLimit,
    PageOffset,
    RunId,
    RunInputDep,
    ServiceDep,
    field_error,
)
from autocoder.api.downloads import attachment, download
from autocoder.api.errors import RunCancelled
from autocoder.api.schemas import (
    CancelAccepted,
    ErrorBody,
    ExecuteRequest,
    LanguageInfo,
    RunPage,
    RunRequest,
    run_request_body,
)
from autocoder.api.service import Job, Service
from autocoder.api.streaming import (
    KEEPALIVE_SECONDS,
    SSE_MEDIA_TYPE,
    sse_response,
    unless_disconnected,
)
from autocoder.errors import ConfigError
from autocoder.files import InputFile
from autocoder.records import Event, RunResult
from autocoder.sessions import Session

IPYNB_MEDIA_TYPE = "application/x-ipynb+json"


router = APIRouter()  # auth.Guard checks the token before a body is read


_RUN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The run's result (also when every attempt failed: see `status`). "
        "With `Accept: text/event-stream`, the run's events as server-sent events instead.",
        "content": {SSE_MEDIA_TYPE: {"schema": {"type": "string"}}},
    },
    422: {"description": "The request is malformed or beyond the server's limits."},
    429: {
        "model": ErrorBody,
        "description": "Too many runs in progress and waiting; see Retry-After.",
    },
    503: {"model": ErrorBody, "description": "No run slot came free in time; see Retry-After."},
    507: {"model": ErrorBody, "description": "The disk holding the records is full."},
}
_STREAM_DOC = (
    "Events, each `event: <type>` with `data:` a JSON object `{type, run_id, attempt, data}`: "
    "`run_started` (with `max_attempts` and `timeout`); per attempt `attempt_started` (with "
    "`model` and `backend`), "
    "`token` (each piece of the model's reply as it is written, in `data.text`), "
    "`code_generated` (the code), `output` "
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
    "Closing the connection cancels the run. Files go as multipart/form-data: the same fields "
    "plus `files` parts; they are in the code's working directory, read-only.",
    openapi_extra=run_request_body(),
)
async def run(given: RunInputDep, request: Request, service: ServiceDep) -> Any:
    req = given.req
    slot = await unless_disconnected(request, service.admit())
    if wants_stream(request):
        return stream(request, service, slot, req, given.files)
    job = service.launch(slot, req, files=given.files)
    try:
        return await answer(request, service, job)
    except ConfigError as e:
        if req.model:  # most likely the endpoint does not serve the model asked for
            raise RequestValidationError(
                [
                    field_error(
                        "model", f"the model endpoint cannot use the model {req.model!r}: {e}"
                    )
                ]
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
    openapi_extra=run_request_body(),
)
async def run_stream(
    given: RunInputDep, request: Request, service: ServiceDep
) -> StreamingResponse:
    slot = await unless_disconnected(request, service.admit())
    return stream(request, service, slot, given.req, given.files)


def wants_stream(request: Request) -> bool:
    """`Accept: text/event-stream` asks a run's route for its events instead of its result."""
    return SSE_MEDIA_TYPE in request.headers.get("accept", "")


def stream(
    request: Request,
    service: Service,
    slot: Slot,
    req: RunRequest | ExecuteRequest,
    files: Sequence[InputFile],
    session: Session | None = None,
) -> StreamingResponse:
    """Start a run that owns `slot` (in `session`, claimed, when given) and answer its events
    as server-sent events: what /run/stream, /execute/stream and a session's run send."""
    events: asyncio.Queue[Event | None] = asyncio.Queue()
    task = service.launch(slot, req, on_event=events.put_nowait, files=files, session=session)
    return sse_response(request, task.task, events)


async def answer(request: Request, service: Service, job: Job) -> RunResult:
    """A started run's result, as its request's answer: the record of a run a client stopped
    (`POST /runs/{id}/cancel`); 503 when the server's shutdown cancelled it."""
    try:
        return await unless_disconnected(request, job.task)
    except RunCancelled:
        if (stopped := await service.stopped_result(job.run_id)) is not None:
            return stopped
        raise Busy(
            f"the server shut down before the run finished; run {job.run_id} was cancelled",
            status_code=503,
            retry_after=5,
        ) from None


@router.get("/languages", summary="The languages this server can run, and why not the others")
async def list_languages(service: ServiceDep) -> list[LanguageInfo]:
    found = await asyncio.to_thread(languages.availability, service.settings)
    return [LanguageInfo(**dataclasses.asdict(a)) for a in found]


@router.get("/runs", summary="Run history, newest first")
async def list_runs(
    service: ServiceDep,
    limit: PageLimit = 20,
    offset: PageOffset = 0,
    status: Annotated[
        Literal["success", "error"] | None, Query(description="Only runs that ended so.")
    ] = None,
    q: Annotated[
        str,
        Query(max_length=200, description="Only runs whose prompt contains this (any case)."),
    ] = "",
) -> RunPage:
    runs, total = await asyncio.to_thread(
        service.store.list, limit=limit, offset=offset, status=status, q=q
    )
    return RunPage(runs=runs, total=total, limit=limit, offset=offset)


@router.get(
    "/runs/{run_id}",
    response_model=RunResult,
    responses={404: {"model": ErrorBody, "description": "No such run."}},
    summary="One run's whole record, every attempt included",
)
async def get_run(run_id: RunId, service: ServiceDep) -> RunResult:
    result = await service.record(run_id)
    if result is None:
        raise HTTPException(404, f"no run {run_id!r}")
    return result


@router.get(
    "/runs/{run_id}/notebook",
    response_class=Response,
    responses={
        200: {"description": "The notebook (nbformat v4).", "content": {IPYNB_MEDIA_TYPE: {}}},
        404: {"model": ErrorBody, "description": "No such run."},
    },
    summary="Download a run's notebook",
)
async def get_notebook(run_id: RunId, service: ServiceDep) -> Response:
    stored = await asyncio.to_thread(service.store.notebook, run_id)
    if stored is None:
        raise HTTPException(404, f"no run {run_id!r}")
    return await download(stored, IPYNB_MEDIA_TYPE)


@router.get(
    "/runs/{run_id}/bundle",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "A zip of the run's notebook (`<name>.ipynb`) and the folder beside "
            "it (`<name>_files/`: the files the run was given and those its code wrote). "
            "Unpacked anywhere, the notebook re-runs: its first cell enters that folder.",
            "content": {bundle.ZIP_MEDIA_TYPE: {}},
        },
        404: {"model": ErrorBody, "description": "No such run."},
        507: {"model": ErrorBody, "description": "No disk space to build the zip."},
    },
    summary="Download a run as one zip: its notebook with its input and output files",
)
async def get_bundle(run_id: RunId, service: ServiceDep) -> StreamingResponse:
    try:
        made = await asyncio.to_thread(
            bundle.zip_run, service.store, service.settings.autofile_dir, run_id
        )
    except OSError as e:
        if e.errno in {errno.ENOSPC, errno.EDQUOT}:
            raise HTTPException(507, "no disk space left to build the zip; retry later") from e
        raise
    if made is None:
        raise HTTPException(404, f"no run {run_id!r}")
    spool, name = made
    return StreamingResponse(
        _read_through(spool),
        media_type=bundle.ZIP_MEDIA_TYPE,
        headers={"content-disposition": attachment(name)},
    )


def _read_through(spool: IO[bytes]) -> Iterator[bytes]:
    """The spooled zip in chunks (Starlette iterates this in a thread), then closed."""
    try:
        while chunk := spool.read(1 << 16):
            yield chunk
    finally:
        spool.close()


@router.post(
    "/runs/{run_id}/cancel",
    status_code=202,
    responses={404: {"model": ErrorBody, "description": "No run of that id is in progress."}},
    summary="Stop a run in progress: its kernel is interrupted, the run recorded as cancelled",
    description="The same as the client of the run hanging up, for a client that wants to "
    "stay and see the run end: its stream, if it has one, ends with `run_finished` "
    "(status `error`, error_kind `cancelled`), and `GET /runs/{run_id}` has the record.",
)
async def cancel_run(run_id: RunId, service: ServiceDep) -> CancelAccepted:
    if not service.cancel(run_id):
        raise HTTPException(404, f"run {run_id!r} is not in progress (finished, or unknown)")
    return CancelAccepted(run_id=run_id, detail="stopping: the run ends as cancelled")

"""Code given, run as it is: `POST /execute` and `/execute/stream`, for agents that write
their own code and want a sandboxed kernel to run it in.

The engine is `Engine.execute` (a run of one attempt, no model); this module only translates,
through /run's own machinery: admission, streaming, the answer to a stopped run. With
`session_id` the code runs in that session's kernel, claimed as a session's prompt is.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from autocoder.api.admission import Slot
from autocoder.api.deps import ExecuteInput, ExecuteInputDep, ServiceDep
from autocoder.api.routes.runs import _RUN_RESPONSES, answer, stream, wants_stream
from autocoder.api.routes.sessions import claim_and_admit
from autocoder.api.schemas import ErrorBody, ExecuteResult, run_request_body
from autocoder.api.service import Service
from autocoder.api.streaming import SSE_MEDIA_TYPE, unless_disconnected
from autocoder.records import RunResult
from autocoder.sessions import Session

router = APIRouter()  # auth.Guard checks the token before a body is read

_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_RUN_RESPONSES,
    404: {"model": ErrorBody, "description": "No such session, or it is closed (`session_id`)."},
    409: {"model": ErrorBody, "description": "The session is running other code or a prompt."},
}
_STREAM_DOC = (
    "Events, each `event: <type>` with `data:` a JSON object `{type, run_id, attempt, data}`: "
    "`run_started` (with `timeout` and `origin: code`), `attempt_started`, `code_generated` "
    "(the code given), `output` (each output as it appears; errors have `output_type: "
    "error`), `attempt_finished` (its status, error and error_kind), and `run_finished`, "
    "whose data is the result without the attempts. A failure of the server itself ends the "
    "stream with `server_error`. Closing the connection stops the code."
)
_DESCRIPTION = (
    "No model: the code runs as it is, once, in a fresh sandboxed kernel (or in the kernel "
    "of the session `session_id` names, which keeps variables, imports and files between "
    "calls), under the limits of `/run`. Answers when the code has finished, HTTP 200 "
    "whether it raised or not (`status`, `error`, `error_kind`: `exception`, `syntax`, "
    "`timeout`, ...); plots are `display_data` outputs with `image/png`. Recorded as a run "
    "(`GET /runs/{run_id}`, its notebook), with `origin: code`. Files go as "
    "multipart/form-data: the same fields plus `files` parts, read-only in the working "
    "directory. With `Accept: text/event-stream` it streams like `/execute/stream`. Closing "
    "the connection stops the code."
)


@router.post(
    "/execute",
    response_model=ExecuteResult,
    responses=_RESPONSES,
    summary="Run the code given, as it is: no model",
    description=_DESCRIPTION,
    openapi_extra=run_request_body(name="Execute"),
)
async def execute(given: ExecuteInputDep, request: Request, service: ServiceDep) -> Any:
    session, slot = await _admit(given, request, service)
    if wants_stream(request):
        return stream(request, service, slot, given.req, given.files, session)
    job = service.launch(slot, given.req, files=given.files, session=session)
    return _executed(await answer(request, service, job), session)


@router.post(
    "/execute/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": _STREAM_DOC,
            "content": {SSE_MEDIA_TYPE: {"schema": {"type": "string"}}},
        },
        **{k: v for k, v in _RESPONSES.items() if k != 200},
    },
    summary="Like POST /execute, streaming the code's progress as server-sent events",
    description=_STREAM_DOC,
    openapi_extra=run_request_body(name="Execute"),
)
async def execute_stream(
    given: ExecuteInputDep, request: Request, service: ServiceDep
) -> StreamingResponse:
    session, slot = await _admit(given, request, service)
    return stream(request, service, slot, given.req, given.files, session)


async def _admit(
    given: ExecuteInput, request: Request, service: Service
) -> tuple[Session | None, Slot]:
    """The session claimed, if one is named, and a run slot, as a session's prompt gets them."""
    if given.req.session_id is None:
        return None, await unless_disconnected(request, service.admit())
    return await claim_and_admit(request, service, given.req.session_id, given.files)


def _executed(result: RunResult, session: Session | None) -> ExecuteResult:
    lost = session is not None and session.lost_during(result.run_id)
    return ExecuteResult(**result.model_dump(), state_lost=lost)

"""Dependencies the routes take: the service, checked requests, path parameters."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError

from autocoder.api.schemas import RunRequest
from autocoder.api.service import Service

RUN_ID_PATTERN = r"^[0-9a-z][0-9a-z-]{0,63}$"


def get_service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


ServiceDep = Annotated[Service, Depends(get_service)]


def checked_request(req: RunRequest, service: ServiceDep) -> RunRequest:
    """The limits that depend on the server's settings, reported like any validation error."""
    s = service.settings
    errors = []
    if len(req.prompt) > s.max_prompt_chars:
        errors.append(
            field_error(
                "prompt",
                f"the prompt has {len(req.prompt):,} characters; this server takes at most "
                f"{s.max_prompt_chars:,} (AUTOCODER_MAX_PROMPT_CHARS)",
            )
        )
    if req.max_attempts is not None and req.max_attempts > s.max_request_attempts:
        errors.append(
            field_error(
                "max_attempts",
                f"at most {s.max_request_attempts} attempts (AUTOCODER_MAX_REQUEST_ATTEMPTS)",
            )
        )
    if req.timeout is not None and req.timeout > s.max_request_timeout:
        errors.append(
            field_error(
                "timeout", f"at most {s.max_request_timeout:g} s (AUTOCODER_MAX_REQUEST_TIMEOUT)"
            )
        )
    if errors:
        raise RequestValidationError(errors)
    return req


def field_error(name: str, msg: str) -> dict[str, Any]:
    return {"loc": ["body", name], "msg": msg, "type": "value_error"}


CheckedRequest = Annotated[RunRequest, Depends(checked_request)]
RunId = Annotated[
    str,
    PathParam(pattern=RUN_ID_PATTERN, description="A run id, as returned by `POST /run`."),
]

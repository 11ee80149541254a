"""Dependencies the routes take: the service, checked requests, path parameters."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from autocoder import languages
from autocoder.api.schemas import (
    SESSION_ID_PATTERN,
    ExecuteRequest,
    RunRequest,
    SessionRequest,
)
from autocoder.api.service import Service
from autocoder.files import FileRefused, FilesTooLarge, InputFile, check_inputs

RUN_ID_PATTERN = r"^[0-9a-z][0-9a-z-]{0,63}$"
M = TypeVar("M", bound=BaseModel)
R = TypeVar("R", RunRequest, ExecuteRequest)


def get_service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


ServiceDep = Annotated[Service, Depends(get_service)]


@dataclass
class RunInput:
    """A checked run request and the files it brought (none for a JSON body)."""

    req: RunRequest
    files: list[InputFile] = field(default_factory=list)


MULTIPART = "multipart/form-data"
FORM_FIELDS = ("prompt", "max_attempts", "attempts", "timeout", "model", "language", "candidates")
# A form has no null: an optional field sent as JSON's `null` is one not given.
FORM_NULLS = ("null",)


async def run_input(request: Request, service: ServiceDep) -> RunInput:
    """`POST /run`'s body: the JSON object it always took, or the same fields as
    multipart/form-data with one or more `files` parts. Everything is checked, files
    included, before a run exists, so a refused request leaves nothing behind."""
    if request.headers.get("content-type", "").startswith(MULTIPART):
        data, files = await _from_form(request, service)
        req = _validated(data, RunRequest)
    else:
        req, files = _validated(await _json_body(request), RunRequest), []
    return RunInput(checked_request(req, service), files)


async def _json_body(request: Request) -> Any:
    """As FastAPI reads a JSON body: parsed when the content type says JSON (or says nothing)."""
    body = await request.body()
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if not body:
        return None
    if ctype != "application/json" and not ctype.endswith("+json"):
        return body
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", e.pos),
                    "msg": "JSON decode error",
                    "ctx": {"error": e.msg},
                }
            ]
        ) from None
    except UnicodeDecodeError:
        raise RequestValidationError([field_error("body", "the body is not UTF-8")]) from None


def _validated(data: Any, model: type[M]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(
            [
                {k: v for k, v in {**err, "loc": ("body", *err["loc"])}.items() if k != "input"}
                for err in e.errors(include_url=False)
            ]
        ) from None


async def _from_form(
    request: Request,
    service: Service,
    fields: tuple[str, ...] = FORM_FIELDS,
    where: str = "/run (prompt, max_attempts, timeout, model, language, candidates, and `files` parts)",
    model: type[BaseModel] = RunRequest,
) -> tuple[dict[str, Any], list[InputFile]]:
    """The form's fields (not yet validated) and its files (checked)."""
    s = service.settings
    try:
        form = await request.form(max_files=s.max_files + 1, max_fields=len(fields) + 4)
    except StarletteHTTPException as e:
        if e.status_code == 413:  # errors.BodyLimit's refusal, which says what the limit is
            raise
        if "Too many files" in str(e.detail):
            raise HTTPException(
                422, f"at most {s.max_files} files per run (AUTOCODER_MAX_FILES)"
            ) from None
        raise HTTPException(e.status_code, f"the multipart body is malformed: {e.detail}") from None
    try:
        data: dict[str, Any] = {}
        uploads: list[UploadFile] = []
        for key, value in form.multi_items():
            if key == "files" and isinstance(value, UploadFile):
                uploads.append(value)
            elif key in fields and isinstance(value, str):
                if key in ("prompt", "code") or value not in FORM_NULLS:
                    data[key] = _form_value(key, value)
            else:
                raise RequestValidationError([field_error(key, f"not a field of {where}")])
        _validated(data, model)  # a bad field is reported before any file is read
        files = [InputFile(_upload_name(u), await u.read()) for u in uploads]
    finally:
        await form.close()
    try:
        check_inputs(files, s)
    except FilesTooLarge as e:
        raise HTTPException(413, str(e)) from None
    except FileRefused as e:
        raise RequestValidationError([field_error("files", str(e))]) from None
    return data, files


def _upload_name(upload: UploadFile) -> str:
    """The part's file name as sent. Starlette reads bytes that are not UTF-8 as Latin-1, a
    different name that check_name cannot tell apart; here they stay undecodable (as lone
    surrogates, the way Python spells such a name from disk) and check_name refuses them."""
    disposition = dict(upload.headers.raw).get(b"content-disposition")
    raw = parse_options_header(disposition)[1].get(b"filename") if disposition else None
    if raw is None:
        return upload.filename or ""
    return raw.decode("utf-8", "surrogateescape")


def _form_value(key: str, value: str) -> Any:
    """Form fields are text; the numbers /run takes are parsed here, strictly."""
    if key in {"max_attempts", "attempts", "candidates"}:
        return int(value) if value.strip().lstrip("-").isdigit() else value
    if key == "timeout":
        try:
            return float(value)
        except ValueError:
            return value
    return value


def checked_request(req: RunRequest, service: Service) -> RunRequest:
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
    if req.candidates is not None and req.candidates > s.max_request_candidates:
        errors.append(
            field_error(
                "candidates",
                f"at most {s.max_request_candidates} candidates (AUTOCODER_MAX_REQUEST_CANDIDATES)",
            )
        )
    req = _checked_common(req, service, errors)
    if errors:
        raise RequestValidationError(errors)
    return req


def _checked_common(req: R, service: Service, errors: list[dict[str, Any]]) -> R:
    """The timeout's bound and the language's kernel, for /run and /execute alike; `errors`
    gets what is wrong, and the request comes back with its language's canonical name."""
    s = service.settings
    if req.timeout is not None and req.timeout > s.max_request_timeout:
        errors.append(
            field_error(
                "timeout", f"at most {s.max_request_timeout:g} s (AUTOCODER_MAX_REQUEST_TIMEOUT)"
            )
        )
    if req.language is not None:
        try:
            req = req.model_copy(update={"language": languages.resolve(req.language, s).name})
        except languages.LanguageUnavailable as e:
            errors.append(field_error("language", str(e)))
    return req


def field_error(name: str, msg: str) -> dict[str, Any]:
    return {"loc": ["body", name], "msg": msg, "type": "value_error"}


RunInputDep = Annotated[RunInput, Depends(run_input)]


@dataclass
class ExecuteInput:
    """A checked `POST /execute` request and the files it brought (none for a JSON body)."""

    req: ExecuteRequest
    files: list[InputFile] = field(default_factory=list)


EXECUTE_FORM_FIELDS = ("code", "language", "session_id", "timeout")


async def execute_input(request: Request, service: ServiceDep) -> ExecuteInput:
    """`POST /execute`'s body, read as /run's is: a JSON object, or the same fields as
    multipart/form-data with `files` parts; all of it checked before anything runs."""
    if request.headers.get("content-type", "").startswith(MULTIPART):
        data, files = await _from_form(
            request,
            service,
            EXECUTE_FORM_FIELDS,
            "/execute (code, language, session_id, timeout, and `files` parts)",
            ExecuteRequest,
        )
        req = _validated(data, ExecuteRequest)
    else:
        req, files = _validated(await _json_body(request), ExecuteRequest), []
    s = service.settings
    errors = []
    if len(req.code) > s.max_code_chars:
        errors.append(
            field_error(
                "code",
                f"the code has {len(req.code):,} characters; this server takes at most "
                f"{s.max_code_chars:,} (AUTOCODER_MAX_CODE_CHARS)",
            )
        )
    req = _checked_common(req, service, errors)
    if req.session_id is not None and req.language not in (None, "python"):
        errors.append(field_error("language", "a session's kernel is Python"))
    if errors:
        raise RequestValidationError(errors)
    return ExecuteInput(req, files)


ExecuteInputDep = Annotated[ExecuteInput, Depends(execute_input)]
RunId = Annotated[
    str,
    PathParam(pattern=RUN_ID_PATTERN, description="A run id, as returned by `POST /run`."),
]


@dataclass
class SessionInput:
    """A checked `POST /sessions` request and the files it brought."""

    req: SessionRequest
    files: list[InputFile] = field(default_factory=list)


SESSION_FORM_FIELDS = ("timeout", "model")


async def session_input(request: Request, service: ServiceDep) -> SessionInput:
    """`POST /sessions`'s body: nothing, a JSON object, or the same fields as a form with
    `files` parts (all checked before the session exists)."""
    if request.headers.get("content-type", "").startswith(MULTIPART):
        data, files = await _from_form(
            request,
            service,
            SESSION_FORM_FIELDS,
            "/sessions (timeout, model, and `files` parts)",
            SessionRequest,
        )
    else:
        data, files = await _json_body(request), []
    req = _validated({} if data is None else data, SessionRequest)
    s = service.settings
    if req.timeout is not None and req.timeout > s.max_request_timeout:
        raise RequestValidationError(
            [
                field_error(
                    "timeout",
                    f"at most {s.max_request_timeout:g} s (AUTOCODER_MAX_REQUEST_TIMEOUT)",
                )
            ]
        )
    return SessionInput(req, files)


SessionInputDep = Annotated[SessionInput, Depends(session_input)]
SessionId = Annotated[
    str,
    PathParam(
        pattern=SESSION_ID_PATTERN, description="A session id, as returned by `POST /sessions`."
    ),
]

# Far beyond any history, well inside SQLite's 64-bit integers (2**63 overflowed into a 500).
MAX_OFFSET = 1_000_000_000
PageLimit = Annotated[int, Query(ge=1, le=100, description="How many to list, at most.")]
PageOffset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="How many newer ones to skip.")]

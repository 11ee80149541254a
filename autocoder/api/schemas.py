"""Request and response schemas of the HTTP API (separate from the engine's records)."""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from autocoder.records import RunResult, SessionInfo
from autocoder.store.base import RunSummary


class RunRequest(BaseModel):
    """What `POST /run` takes. Only `prompt` is required, as in the original AutoCoder."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        # A form field (or a JSON `Infinity`) could otherwise ask for no deadline at all.
        allow_inf_nan=False,
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
        # The CLI's flag is --attempts and the web form says "Attempts": that name is taken too.
        validation_alias=AliasChoices("max_attempts", "attempts"),
        description="Attempts before giving up. Default AUTOCODER_MAX_ATTEMPTS; "
        "at most AUTOCODER_MAX_REQUEST_ATTEMPTS. Also taken as `attempts`.",
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
    candidates: int | None = Field(
        None,
        ge=1,
        description="Programs drawn per attempt, each run in a fresh kernel; the answer is the "
        "result most of them agree on, and too little agreement makes the run `uncertain`. "
        "Default AUTOCODER_CANDIDATES (5 for the embedded model, 1 for a model endpoint); at "
        "most AUTOCODER_MAX_REQUEST_CANDIDATES. A session's run draws one.",
    )
    language: str | None = Field(
        None,
        min_length=1,
        max_length=40,
        description="The language to write and run the code in: `python` (the default), "
        "`bash`, `javascript`, `typescript` or `r`, as far as this server has their kernels "
        "(`GET /languages`). Sessions run Python only.",
    )

    @model_validator(mode="before")
    @classmethod
    def _one_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_attempts" in data and "attempts" in data:
            raise ValueError("give max_attempts or attempts (the same field), not both")
        return data

    @field_validator("max_attempts", "candidates", mode="before")
    @classmethod
    def _integral(cls, value: object) -> object:
        """JSON Schema counts 2.0 as an integer, and so do we."""
        return int(value) if isinstance(value, float) and value.is_integer() else value

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is blank")
        return prompt


SESSION_ID_PATTERN = r"^session-[0-9a-z-]{1,56}$"


class ExecuteRequest(BaseModel):
    """What `POST /execute` takes: code to run as it is, no model. Only `code` is required."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={"examples": [{"code": "print(6 * 7)"}]},
    )

    code: str = Field(
        min_length=1,
        description="The code, run as it is in one cell. At most AUTOCODER_MAX_CODE_CHARS "
        "characters.",
    )
    language: str | None = Field(
        None,
        min_length=1,
        max_length=40,
        description="The language of the code: `python` (the default), `bash`, `javascript`, "
        "`typescript` or `r`, as far as this server has their kernels (`GET /languages`). "
        "A session runs Python only.",
    )
    session_id: str | None = Field(
        None,
        pattern=SESSION_ID_PATTERN,
        description="Run in this session's kernel (`POST /sessions`), which keeps variables, "
        "imports and files from one call to the next; none: a fresh sandboxed kernel.",
    )
    timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds the code may run. Default AUTOCODER_TIMEOUT (a session's own "
        "timeout in a session); at most AUTOCODER_MAX_REQUEST_TIMEOUT.",
    )

    @field_validator("code")
    @classmethod
    def _not_blank(cls, code: str) -> str:
        if not code.strip():
            raise ValueError("the code is blank")
        return code


class ExecuteResult(RunResult):
    """What `POST /execute` answers: a run's result (`origin` is `code`), and in a session
    whether its state was lost."""

    state_lost: bool = Field(
        default=False,
        description="In a session: its variables and imports were lost during this call (its "
        "kernel died, or was restarted after a timeout); it goes on in a fresh kernel, files "
        "kept.",
    )


def run_request_body(prefix: str = "", name: str = "Run") -> dict[str, Any]:
    """The OpenAPI request body of /run: the JSON object, or the same fields as a form.

    The body is read by deps.run_input rather than by FastAPI (which takes one content type
    per route), so its schemas are declared here and added to the components by app.py.
    A session's run (prefix `Session`) has the same fields, its language Python only.
    """
    ref = "#/components/schemas/" + prefix + name
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": ref + "Request"}},
                "multipart/form-data": {"schema": {"$ref": ref + "Upload"}},
            },
        }
    }


def request_components() -> dict[str, Any]:
    """The schemas run_request_body refers to: /run's and /execute's."""
    found = {}
    for name, model in (("Run", RunRequest), ("Execute", ExecuteRequest)):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        found[f"{name}Request"] = schema
        found[f"{name}Upload"] = {
            "title": f"{name}Upload",
            "type": "object",
            "required": schema["required"],
            "additionalProperties": False,
            "properties": {
                **schema["properties"],  # the same objects: bounds set on one are on both
                "files": {
                    "type": "array",
                    "items": {"type": "string", "format": "binary"},
                    "description": "Files for the code, by their base names (at most "
                    "AUTOCODER_MAX_FILES; each and all together at most "
                    "AUTOCODER_MAX_UPLOAD_MB).",
                },
            },
        }
    return found


def session_run_components(components: dict[str, Any]) -> dict[str, Any]:
    """A session's run takes /run's fields (with the server's bounds already on them), its
    language Python only: the schemas `run_request_body("Session")` refers to."""
    found = {}
    for name in ("RunRequest", "RunUpload"):
        session = copy.deepcopy(components[name])
        session["title"] = "Session" + name
        session["properties"]["candidates"] = {
            **session["properties"]["candidates"],
            "anyOf": [{"type": "integer", "enum": [1]}, {"type": "null"}],
            "description": "A session's kernel keeps state: its runs draw one candidate.",
        }
        session["properties"]["language"] = {
            **session["properties"]["language"],
            "anyOf": [{"type": "string", "enum": ["python"]}, {"type": "null"}],
            "description": "A session's kernel is Python: `python`, or nothing.",
        }
        found["Session" + name] = session
    return found


class LanguageInfo(BaseModel):
    """A language autocoder knows, and whether this server can run it."""

    language: str = Field(description="Its name, as `POST /run` takes it in `language`.")
    title: str = Field(description="Its name as people write it.")
    available: bool = Field(description="Whether this server has its kernel.")
    kernel: str = Field(description="The kernelspec that runs it here.")
    reason: str | None = Field(
        default=None, description="Why it is not available, and what installs it."
    )


class RunPage(BaseModel):
    """A page of run history, newest first."""

    runs: list[RunSummary] = Field(description="The runs on this page, newest first.")
    total: int = Field(description="How many runs match, on all pages.")
    limit: int = Field(description="The page size asked for.")
    offset: int = Field(description="How many newer runs were skipped.")


class Health(BaseModel):
    """Whether the service can take runs; answered without touching a kernel or the model."""

    status: Literal["ok", "degraded"] = Field(
        description="`degraded` (HTTP 503) when the pool cannot start kernels, or the disk "
        "holding the records is low (`disk_error`)."
    )
    version: str = Field(description="autocoder's version.")
    kernels_ready: int = Field(description="Pre-started kernels waiting for a run.")
    pool_size: int = Field(
        description="How many kernels the pool keeps ready (AUTOCODER_POOL_SIZE)."
    )
    kernel_error: str | None = Field(
        description="Why the last kernel start failed, if it did, or why the kernel gateway "
        "(AUTOCODER_GATEWAY_URL) cannot give kernels now."
    )
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
    sessions_open: int = Field(0, description="Sessions open, each keeping a kernel.")
    max_sessions: int = Field(0, description="AUTOCODER_MAX_SESSIONS.")
    disk_free_mb: float = Field(
        0.0,
        description="Megabytes free on the fuller of the disks holding the records "
        "(AUTOCODER_NOTEBOOKS_DIR, AUTOCODER_AUTOFILE_DIR).",
    )
    disk_error: str | None = Field(
        None,
        description="Why that disk is a problem, naming the directory: low (less free than "
        "one run may write, AUTOCODER_MAX_RUN_DISK_MB, and its record), or full (runs are "
        "refused with 507).",
    )


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong.")


class SessionRequest(BaseModel):
    """What `POST /sessions` takes; everything is optional (an empty body opens a session)."""

    model_config = ConfigDict(
        strict=True, extra="forbid", json_schema_extra={"examples": [{"timeout": 30}]}
    )

    timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds each attempt's code may run, for every run of the session unless "
        "a run says otherwise. Default AUTOCODER_TIMEOUT; at most AUTOCODER_MAX_REQUEST_TIMEOUT.",
    )
    model: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="The model the session's runs ask, unless a run names another.",
    )


def session_request_body() -> dict[str, Any]:
    """The OpenAPI request body of POST /sessions (read by deps.session_input)."""
    ref = "#/components/schemas/"
    return {
        "requestBody": {
            "required": False,
            "content": {
                "application/json": {"schema": {"$ref": ref + "SessionRequest"}},
                "multipart/form-data": {"schema": {"$ref": ref + "SessionUpload"}},
            },
        }
    }


def session_components() -> dict[str, Any]:
    """The schemas session_request_body refers to."""
    schema = SessionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    upload = {
        "title": "SessionUpload",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **schema["properties"],
            "files": {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "description": "Files for the session's working directory, read-only, by their "
                "base names (at most AUTOCODER_MAX_FILES; each and all together at most "
                "AUTOCODER_MAX_UPLOAD_MB).",
            },
        },
    }
    return {"SessionRequest": schema, "SessionUpload": upload}


class SessionRunResult(RunResult):
    """A session's run: the result of `POST /run`, plus where it ran."""

    session_id: str = Field(description="The session the run belongs to.")
    state_lost: bool = Field(
        default=False,
        description="The session's variables and imports were lost during this run (its kernel "
        "died, or was restarted after a timeout); it goes on in a fresh kernel, files kept.",
    )


class SessionPage(BaseModel):
    """A page of sessions, newest first (closed ones included)."""

    sessions: list[SessionInfo] = Field(description="The sessions on this page, newest first.")
    total: int = Field(description="How many sessions there are, on all pages.")
    limit: int = Field(description="The page size asked for.")
    offset: int = Field(description="How many newer sessions were skipped.")


class CancelAccepted(BaseModel):
    """A run asked to stop: its stream (if any) ends with `run_finished`, status `error`,
    error_kind `cancelled`, once its kernel is interrupted and the run is recorded."""

    run_id: str = Field(description="The run that is being stopped.")
    detail: str = Field(description="What happens next.")

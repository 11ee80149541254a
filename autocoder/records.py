"""Plain typed data that crosses module boundaries: executions, attempts, runs, events."""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, Field

Origin = Literal["model", "code"]
"""Who wrote a run's code: the model, from the prompt (`POST /run`), or the caller, who gave
it to run as it is (`POST /execute`, `Engine.execute`)."""


def last_line(text: str, limit: int = 0) -> str:
    """What an error says in one line: its last that is not blank (a traceback ends with the
    exception), cut to `limit` characters when one is given."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last[: limit - 1] + "…" if limit and len(last) > limit else last


class ErrorKind(str, Enum):
    """Why an attempt failed; callers branch on this, never on message text."""

    SYNTAX = "syntax"
    EXCEPTION = "exception"
    TIMEOUT = "timeout"
    KERNEL_DIED = "kernel_died"
    EMPTY = "empty"
    OUTPUT_LIMIT = "output_limit"
    OUTPUT_LOST = "output_lost"
    UNCHECKED = "unchecked"
    LLM = "llm"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    MISSING_MODULE = "missing_module"
    DISK_LIMIT = "disk_limit"
    UNCERTAIN = "uncertain"
    EXAMPLE = "example"


class ErrorInfo(BaseModel):
    ename: str
    evalue: str
    traceback: list[str] = Field(default_factory=list)


class Execution(BaseModel):
    """What one piece of code did in a kernel."""

    outputs: list[dict[str, Any]] = Field(
        default_factory=list, description="nbformat v4 output dicts, in order."
    )
    stdout: str = ""
    stderr: str = ""
    text: str = Field(
        default="", description="stdout plus text/plain of results and displays: the answer."
    )
    error: ErrorInfo | None = None
    kind: ErrorKind | None = None
    duration: float = 0.0
    truncated: bool = False
    output_bytes: int = 0
    notice: str = Field(
        default="", description="What the executor has to say beyond the code's own outcome."
    )

    @property
    def ok(self) -> bool:
        return self.kind is None


class RunFile(BaseModel):
    """A file a run's code left in its working directory."""

    name: str = Field(description="Its path inside the run's directory, `/`-separated.")
    size: int = Field(description="Bytes.")
    media_type: str = Field(description="Guessed from the name.")
    url: str = Field(
        default="",
        description="Where the HTTP API serves it: `GET /runs/{run_id}/files/{name}` (a "
        "session's files: `GET /sessions/{session_id}/files/{name}`). Empty outside the API.",
    )


class Attempt(BaseModel):
    number: int = Field(description="1 for the first attempt.")
    status: Literal["success", "error"] = Field(description="`success` or `error`.")
    language: str = Field(default="python", description="The language of its code.")
    code: str = Field(default="", description="The code this attempt ran.")
    reply: str = Field(default="", description="The model's whole reply.")
    output: str = Field(
        default="", description="What the code printed, plus the text of its displayed results."
    )
    stderr: str = Field(default="", description="What the code wrote to stderr.")
    error: str = Field(default="", description="What went wrong, as sent back to the model.")
    error_kind: ErrorKind | None = Field(
        default=None, description="Why this attempt failed (see RunResult.error_kind)."
    )
    ename: str | None = Field(
        default=None, description="The exception's class name, when the code raised one."
    )
    outputs: list[dict[str, Any]] = Field(default_factory=list, exclude=True)
    truncated: bool = Field(
        default=False, description="Whether the output was cut at AUTOCODER_MAX_OUTPUT_BYTES."
    )
    duration: float = Field(default=0.0, description="Seconds this attempt took in all.")
    llm_duration: float = Field(default=0.0, description="Seconds the model took to answer.")
    tokens: int = Field(default=0, description="Tokens the model generated for this attempt.")
    exec_duration: float = Field(default=0.0, description="Seconds the code ran.")
    model: str = Field(default="", description="The model that wrote this attempt's code.")
    filename: str = Field(default="", description="This attempt's code file (on the server).")
    notice: str = Field(
        default="",
        description="In a session: that the session's state was lost during this attempt "
        "(its kernel died, or was restarted after a timeout), and what that means.",
    )
    candidate: int = Field(
        default=1,
        description="Which of its attempt's candidates this is (1 unless several programs "
        "were drawn for the attempt: AUTOCODER_CANDIDATES).",
    )
    group: int = Field(
        default=0,
        description="Which group of candidates that produced the same result this one is in: "
        "1 is the group the attempt's answer came from, 2 the next largest, and so on; 0 when "
        "its code did not run cleanly.",
    )
    temperature: float = Field(default=0.0, description="The temperature it was sampled at.")
    examples: int = Field(
        default=0,
        description="How many of the prompt's own worked examples (`f(2) == 4`, `>>> f(2)`) "
        "were run against this code's functions after it ran; on a success, all of them held. "
        "On an `exception` from an assert of the code's own, they were run after it and all "
        "held: that assert's expected value is the likelier mistake, and the retry is told so.",
    )
    others: list[Attempt] = Field(
        default_factory=list,
        description="The attempt's other candidates, in the order they were drawn, each with "
        "its group. This attempt's own fields are those of its chosen candidate (the first "
        "of the largest group that ran cleanly, else the first drawn).",
    )


class RunResult(BaseModel):
    """The original AutoCoder contract (status, filename, code, output, error) plus the record."""

    status: Literal["success", "error"] = Field(
        description="`success` when an attempt's code ran cleanly (and, with several candidates, enough of them agreed); `error` when every attempt failed, the candidates disagreed (`uncertain`), or the model endpoint failed (still HTTP 200)."
    )
    filename: str = Field(default="", description="The last attempt's code file.")
    code: str = Field(default="", description="The last attempt's code.")
    output: str = Field(
        default="",
        description="What the last attempt's code printed, plus the text of its displayed results.",
    )
    error: str = Field(
        default="", description="Why the run failed (the last attempt's error); empty on success."
    )
    error_kind: ErrorKind | None = Field(
        default=None,
        description="The kind of that failure: syntax, exception, missing_module (an import of a package the kernel does not have), timeout, kernel_died, empty (no code in the reply), output_limit, output_lost (the kernel could not send some of the output, so the attempt cannot count as a success), unchecked (ran clean only by dropping every assert after an earlier attempt failed one), llm (the model endpoint failed), cancelled, interrupted (the server running it stopped before it finished, as another replica found: PostgreSQL store only), uncertain (the code ran, but too few of the attempt's candidates produced the same result: `code` and `output` are those of the largest group, and `error` names the others), disk_limit (the code filled its working directory: AUTOCODER_MAX_RUN_DISK_MB).",
    )
    run_id: str = Field(
        description="The run's id, for `GET /runs/{run_id}` and `GET /runs/{run_id}/notebook`."
    )
    prompt: str = Field(
        default="", description="The prompt, as given (empty when the code was given)."
    )
    origin: Origin = Field(
        default="model",
        description="`model`: the model wrote the code from the prompt (`POST /run`); `code`: "
        "the code was given and run as it is, in one attempt, no model asked (`POST /execute`).",
    )
    language: str = Field(
        default="python",
        description="The language the code was written in and run as: python, bash, "
        "javascript, typescript or r (`GET /languages` says which this server runs).",
    )
    model: str = Field(default="", description="The model that wrote the code.")
    backend: str = Field(
        default="",
        description="`openai` (an OpenAI-compatible endpoint) or `local` (the embedded model).",
    )
    attempts: list[Attempt] = Field(default_factory=list, description="Every attempt, in order.")
    notebook: str = Field(
        default="",
        description="The run's notebook (on the server); download it from `/runs/{run_id}/notebook`.",
    )
    workdir: str = Field(
        default="",
        description="Where files the code wrote were kept (on the server), if it wrote any.",
    )
    files: list[RunFile] = Field(
        default_factory=list,
        description="Files the code wrote (the inputs given are not listed unless changed).",
    )
    outputs: list[dict[str, Any]] = Field(
        default_factory=list,
        description="The last attempt's outputs as nbformat v4 dicts: plots arrive as "
        "`display_data` with `data['image/png']` (base64). Bounded by AUTOCODER_MAX_OUTPUT_BYTES.",
    )
    started_at: str = Field(default="", description="When the run started (ISO 8601, UTC).")
    duration: float = Field(default=0.0, description="Seconds the whole run took.")
    session_id: str = Field(
        default="", description="The session this run was part of (`POST /sessions/{id}/run`)."
    )
    timeout: float | None = Field(
        default=None, description="Seconds each attempt's code could run (AUTOCODER_TIMEOUT)."
    )
    notice: str = Field(
        default="",
        description="What was left out of this record to keep it, for lack of disk space: "
        "files the code wrote, or outputs.",
    )
    candidates: int = Field(
        default=0,
        description="How many programs the last attempt drew and ran, each in a fresh kernel "
        "(AUTOCODER_CANDIDATES; 1 in a session).",
    )
    agreement: int = Field(
        default=0,
        description="How many of them produced the answer given (the same output and files); "
        "0 when none ran cleanly. `agreement` of `candidates` agree.",
    )


EventType = Literal[
    "run_started",
    "attempt_started",
    "token",
    "code_generated",
    "output",
    "attempt_finished",
    "run_finished",
]


class Event(BaseModel):
    """A step of a run as it happens (CLI progress, server-sent events)."""

    type: EventType
    run_id: str
    attempt: int | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class SessionRun(BaseModel):
    """One prompt of a session, as the session's record lists it."""

    run_id: str = Field(description="The run: `GET /runs/{run_id}` has its whole record.")
    prompt: str = Field(description="The prompt, as given (empty when the code was given).")
    origin: Origin = Field(
        default="model", description="`code` when the code was given rather than written."
    )
    status: Literal["success", "error"] = Field(description="How the run ended.")
    error_kind: ErrorKind | None = Field(default=None, description="Why it failed, if it did.")
    state_lost: bool = Field(
        default=False,
        description="The session's state (variables, imports) was lost during this run: its "
        "kernel died or was restarted after a timeout. Files in the working directory remain.",
    )
    started_at: str = Field(default="", description="When the run started (ISO 8601, UTC).")
    duration: float = Field(default=0.0, description="Seconds the run took.")


class SessionInfo(BaseModel):
    """A session: one sandboxed kernel and one working directory kept between prompts."""

    session_id: str = Field(description="The session's id, for `/sessions/{session_id}/...`.")
    status: Literal["open", "closed"] = Field(
        description="`open` while its kernel is kept; `closed` once it expired, was deleted, "
        "or the server stopped (its record, notebook and files stay)."
    )
    created_at: str = Field(description="When it was opened (ISO 8601, UTC).")
    last_used_at: str = Field(description="When its last run ended, or it was opened.")
    expires_at: str = Field(
        description="When it will be closed unless used again (AUTOCODER_SESSION_IDLE_TIMEOUT, "
        "never later than AUTOCODER_SESSION_MAX_AGE after it was opened)."
    )
    closed_at: str | None = Field(default=None, description="When it was closed.")
    closed_reason: str | None = Field(
        default=None,
        description="Why it was closed: `deleted`, `idle`, `max_age`, `shutdown` (the server "
        "stopped), `server_restart` (found open when the server started).",
    )
    model: str | None = Field(default=None, description="The model its runs ask by default.")
    timeout: float | None = Field(
        default=None, description="Seconds each attempt's code may run, by default."
    )
    notebook: str = Field(
        description="The session's notebook (on the server): each prompt, then the code that "
        "worked; `GET /sessions/{session_id}/notebook`."
    )
    workdir: str = Field(description="Its working directory (on the server).")
    running: str | None = Field(default=None, description="The run in progress, if any.")
    runs: list[SessionRun] = Field(default_factory=list, description="Its runs, in order.")
    files: list[RunFile] = Field(
        default_factory=list,
        description="Files in its working directory, with `GET /sessions/{session_id}/files/"
        "{name}` URLs (not kept in the record on disk: listed when asked).",
    )

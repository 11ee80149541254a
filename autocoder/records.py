"""Plain typed data that crosses module boundaries: executions, attempts, runs, events."""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorKind(str, Enum):
    """Why an attempt failed; callers branch on this, never on message text."""

    SYNTAX = "syntax"
    EXCEPTION = "exception"
    TIMEOUT = "timeout"
    KERNEL_DIED = "kernel_died"
    EMPTY = "empty"
    OUTPUT_LIMIT = "output_limit"
    LLM = "llm"
    CANCELLED = "cancelled"


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

    @property
    def ok(self) -> bool:
        return self.kind is None


class Attempt(BaseModel):
    number: int
    status: Literal["success", "error"]
    code: str = ""
    reply: str = Field(default="", description="The model's whole reply.")
    output: str = ""
    stderr: str = ""
    error: str = Field(default="", description="What went wrong, as sent back to the model.")
    error_kind: ErrorKind | None = None
    ename: str | None = None
    outputs: list[dict[str, Any]] = Field(default_factory=list, exclude=True)
    truncated: bool = False
    duration: float = 0.0
    llm_duration: float = 0.0
    tokens: int = Field(default=0, description="Tokens the model generated for this attempt.")
    exec_duration: float = 0.0
    model: str = ""
    filename: str = ""


class RunResult(BaseModel):
    """The original AutoCoder contract (status, filename, code, output, error) plus the record."""

    status: Literal["success", "error"]
    filename: str = Field(default="", description="The last attempt's code file.")
    code: str = ""
    output: str = ""
    error: str = ""
    error_kind: ErrorKind | None = None
    run_id: str
    prompt: str = ""
    model: str = ""
    backend: str = ""
    attempts: list[Attempt] = Field(default_factory=list)
    notebook: str = ""
    workdir: str = ""
    started_at: str = ""
    duration: float = 0.0


EventType = Literal[
    "run_started",
    "attempt_started",
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

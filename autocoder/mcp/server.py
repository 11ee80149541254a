"""autocoder's MCP tools over the one engine: run given code or a prompt, sessions, files.

`build_server(door)` makes the server; `serve_stdio(settings)` is `autocoder mcp` (it opens the
engine itself, as `autocoder run` does); `http_app(door)` is what `autocoder serve` mounts at
`/mcp` on the engine it already has. The tools only translate: arguments in; text, images,
structured results and tool errors out. What goes wrong in the code is a result marked
`isError` (the agent reads the traceback); what is wrong with the call (an unknown session,
a file over the limit, the server full) is a tool error whose text says what to fix.

Files are tools (`list_files`, `read_file`), and the same files are resources too
(`autocoder://runs/{run_id}/files/{name}`, `autocoder://sessions/{session_id}/files/{name}`),
which results link to. Tools first, because a model can call a tool in every MCP client,
while most clients (Claude Desktop, Cursor, the agent frameworks) only let the user attach a
resource, not the model read one; clients that do read resources get them for free.

Long calls send progress notifications (the seconds elapsed, and what the run is doing);
a client's cancellation cancels the run once, as a hang-up does on `POST /run`: the kernel
is interrupted, the run recorded as cancelled, and the next call works.

No `from __future__ import annotations` here: the SDK reads the tools' annotations at run
time, and their bounds come from the settings, known only inside `build_server`.
"""

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import (
    BlobResourceContents,
    CallToolResult,
    ContentBlock,
    EmbeddedResource,
    ImageContent,
    ResourceLink,
    TextContent,
    ToolAnnotations,
)
from pydantic import BaseModel, Field
from starlette.types import ASGIApp

from autocoder import __version__, bundle, files, languages
from autocoder.config import Settings
from autocoder.engine import Engine, check, open_engine
from autocoder.errors import AutocoderError
from autocoder.files import FilesTooLarge, InputFile, media_type, open_beneath
from autocoder.records import Event, RunFile, RunResult
from autocoder.sessions import Session, SessionBusy

log = logging.getLogger(__name__)

PROGRESS_EVERY = 2.0  # seconds between progress notifications while a call runs
NOTIFY_TIMEOUT = 5.0  # a notification the client does not take in this long is dropped
CANCEL_GRACE = 15.0  # how long a cancelled run gets to interrupt its kernel and record itself
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
TEXT_TYPES = ("application/json", "application/xml", "application/x-yaml")


class Refused(Exception):
    """A call the server will not take now (no run slot came free); the message says why."""


Slot = Callable[[], AbstractAsyncContextManager[object]]


@dataclass
class Door:
    """What the tools use: the engine (opened by `serve_stdio`, or the API's), and the run
    slots calls take (the API's admission over HTTP; a bounded semaphore over stdio)."""

    settings: Settings
    slot: Slot
    engine: Engine | None = None

    @property
    def opened(self) -> Engine:
        if self.engine is None:
            raise ToolError("the server is starting or stopping; retry in a moment")
        return self.engine


def local_slots(settings: Settings) -> Slot:
    """AUTOCODER_MAX_CONCURRENT_RUNS calls run at once; the others wait up to
    AUTOCODER_QUEUE_TIMEOUT, then get a tool error (a stdio server has one client, but an
    agent may fire many calls at once)."""
    semaphore = asyncio.Semaphore(settings.max_concurrent_runs)

    @asynccontextmanager
    async def slot() -> AsyncIterator[None]:
        try:
            with anyio.fail_after(settings.queue_timeout):
                await semaphore.acquire()
        except TimeoutError:
            raise Refused(
                f"{settings.max_concurrent_runs} calls are running and none ended within "
                f"{settings.queue_timeout:g} s (AUTOCODER_MAX_CONCURRENT_RUNS, "
                "AUTOCODER_QUEUE_TIMEOUT); retry later"
            ) from None
        try:
            yield
        finally:
            semaphore.release()

    return slot


# --- results -----------------------------------------------------------------------------------


class FileInfo(BaseModel):
    """A file a run or a session holds."""

    name: str = Field(description="Its path in the working directory, `/`-separated.")
    size: int = Field(description="Bytes.")
    media_type: str = Field(description="Guessed from the name.")
    uri: str = Field(description="Read it with `read_file`, or as this resource.")


class CodeRun(BaseModel):
    """What `run_code` and `run_prompt` answer (the fields of `POST /execute` and `/run`)."""

    status: str = Field(description="`success`, or `error` when the code failed.")
    output: str = Field(description="What the code printed, plus the text of its results.")
    error: str = Field(description="The cleaned traceback or why it failed; empty on success.")
    error_kind: str | None = Field(
        description="exception, syntax, timeout, kernel_died, output_limit, disk_limit, "
        "missing_module, cancelled, llm, uncertain, example, ... (null on success)."
    )
    code: str = Field(description="The code that ran (for run_prompt, the model's last).")
    language: str = Field(description="The language it ran as.")
    run_id: str = Field(description="The run's id: its files are `autocoder://runs/{run_id}/...`.")
    session_id: str | None = Field(description="The session it ran in, if any.")
    notebook: str = Field(description="The run's notebook, on the server.")
    duration: float = Field(description="Seconds the run took.")
    images: int = Field(description="How many images it displayed (sent as image content).")
    files: list[FileInfo] = Field(description="Files the code wrote or changed.")
    outputs: list[dict[str, Any]] = Field(
        description="Its outputs as nbformat v4 dicts (rich MIME bundles); an image's data "
        "is in the image content, named here by its place among the images."
    )
    origin: str = Field(
        description="`code`: given and run as it is; `model`: written for a prompt."
    )
    state_lost: bool = Field(
        description="In a session: its variables were lost during this call (its kernel died "
        "or was restarted after a timeout); files are kept."
    )
    started_at: str = Field(description="When it started (ISO 8601, UTC).")
    timeout: float | None = Field(description="Seconds the code could run.")
    attempts: int = Field(description="How many attempts the run made (1 for run_code).")
    summary: str = Field(description="One line about the attempts.")


class SessionOpened(BaseModel):
    session_id: str = Field(description="Pass it to run_code, run_prompt and the file tools.")
    expires_at: str = Field(description="When it closes unless used (ISO 8601, UTC).")


class SessionClosed(BaseModel):
    session_id: str
    status: str = Field(description="`closed`.")
    runs: int = Field(description="How many runs it had.")
    notebook: str = Field(description="Its notebook, on the server (kept).")


class FileList(BaseModel):
    files: list[FileInfo]


def _run_uri(run_id: str, name: str) -> str:
    return f"autocoder://runs/{run_id}/files/{name}"


def _session_uri(session_id: str, name: str) -> str:
    return f"autocoder://sessions/{session_id}/files/{name}"


def _file_info(f: RunFile, uri: str) -> FileInfo:
    return FileInfo(name=f.name, size=f.size, media_type=f.media_type, uri=uri)


def _summary(result: RunResult) -> str:
    """`succeeded on attempt 2 of 2 (1: exception ZeroDivisionError)`, or how it failed."""
    n = len(result.attempts)
    earlier = [
        f"{a.number}: {a.error_kind.value if a.error_kind else a.status}"
        + (f" {a.ename}" if a.ename else "")
        for a in result.attempts[:-1]
    ]
    said = f" ({'; '.join(earlier)})" if earlier else ""
    if result.status == "success":
        return f"succeeded on attempt {n} of {n}{said}"
    kind = result.error_kind.value if result.error_kind else "error"
    return f"failed after {n} attempt(s): {kind}{said}"


def _images(result: RunResult) -> list[ImageContent]:
    found = []
    for out in result.outputs:
        data = out.get("data") or {}
        kind = next((k for k in IMAGE_TYPES if k in data), None)
        if kind is not None:
            found.append(ImageContent(type="image", data=str(data[kind]).strip(), mime_type=kind))
    return found


def _without_images(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The outputs with each image's base64 named instead: it travels once, as an image."""
    shown, n = [], 0
    for out in outputs:
        data = out.get("data") or {}
        kinds = [k for k in IMAGE_TYPES if k in data]
        if kinds:
            n += 1
            out = {**out, "data": {**data, **{k: f"(image {n}, in the content)" for k in kinds}}}
        shown.append(out)
    return shown


def _answer(result: RunResult, files_of: list[FileInfo], state_lost: bool) -> CallToolResult:
    """Text (what it printed, then the traceback), each image, a link per file; the fields
    as structured content; `isError` when the code failed."""
    images = _images(result)
    text = result.output
    if result.status != "success" and result.error:
        text = f"{text.rstrip()}\n\n{result.error}".lstrip("\n")
    if not text.strip():
        text = "(no output)" if not images else f"({len(images)} image(s), below)"
    content: list[ContentBlock] = [TextContent(type="text", text=text)]
    content.extend(images)
    content.extend(
        ResourceLink(
            type="resource_link", uri=f.uri, name=f.name, mime_type=f.media_type, size=f.size
        )
        for f in files_of
    )
    structured = CodeRun(
        status=result.status,
        output=result.output,
        error=result.error,
        error_kind=result.error_kind.value if result.error_kind else None,
        code=result.code,
        language=result.language,
        run_id=result.run_id,
        session_id=result.session_id or None,
        notebook=result.notebook,
        duration=result.duration,
        images=len(images),
        files=files_of,
        outputs=_without_images(result.outputs),
        origin=result.origin,
        state_lost=state_lost,
        started_at=result.started_at,
        timeout=result.timeout,
        attempts=len(result.attempts),
        summary=_summary(result),
    )
    return CallToolResult(
        content=content,
        structured_content=structured.model_dump(mode="json"),
        is_error=result.status != "success",
    )


# --- progress and cancellation -------------------------------------------------------------


class Reporter:
    """Progress notifications for one call: the seconds elapsed as the progress (it only
    grows, as MCP requires) and what the run is doing as the message; sent every
    PROGRESS_EVERY seconds and at each step, each send bounded. A client that asked for no
    progress gets none (the SDK drops them)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.message = "waiting for a kernel"
        self.started = time.monotonic()
        self.last = 0.0
        self.wake = asyncio.Event()

    def on_event(self, event: Event) -> None:
        d, n = event.data, event.attempt
        if event.type == "attempt_started" and d.get("max_attempts", 1) > 1:
            self.say(f"attempt {n}/{d['max_attempts']}: the model is writing code")
        elif event.type == "code_generated":
            self.say(f"attempt {n}: running the code")
        elif event.type == "attempt_finished" and d.get("status") != "success":
            self.say(f"attempt {n} failed ({d.get('error_kind')})")
        elif event.type == "output" and d.get("output_type") == "stream":
            lines = str(d.get("text", "")).strip().splitlines()
            if lines:
                self.say(f"printed: {lines[-1][:200]}")

    def say(self, message: str) -> None:
        self.message = message
        self.wake.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), PROGRESS_EVERY)
            self.wake.clear()
            progress = max(round(time.monotonic() - self.started, 1), self.last + 0.1)
            self.last = progress
            try:
                with anyio.move_on_after(NOTIFY_TIMEOUT):
                    await self.ctx.report_progress(progress, None, self.message)
            except Exception as e:  # the client went away: the call ends on its own
                log.debug("progress not sent: %s", e)
                return


EventSink = Callable[[Event], None]


async def _owned(
    ctx: Context,
    work: Callable[[EventSink], Awaitable[RunResult]],
    started: Callable[[asyncio.Task[RunResult]], None],
) -> RunResult:
    """Run `work` as its own task (handed to `started`), its events feeding the call's
    progress. When the client cancels the call, the run is cancelled once (a second cancel
    would land in its cleanup) and given CANCEL_GRACE seconds to interrupt its kernel and
    record itself, shielded from the SDK's cancel scope, before the cancellation goes on."""
    reporter = Reporter(ctx)
    task = asyncio.ensure_future(work(reporter.on_event))
    started(task)
    beat = asyncio.create_task(reporter.run())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done() and not task.cancelling():
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait({task}, timeout=CANCEL_GRACE)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the cancellation is what this call ends with
        raise
    finally:
        beat.cancel()


@contextlib.contextmanager
def _refusals() -> Any:
    """What is wrong with a call, as a tool error the agent can act on."""
    try:
        yield
    except (ToolError, asyncio.CancelledError):
        raise
    except (AutocoderError, Refused, languages.LanguageUnavailable) as e:
        raise ToolError(str(e)) from None


# --- the server --------------------------------------------------------------------------------


def _limits(settings: Settings) -> str:
    packages = ", ".join(files.importable_packages(_kernel_python(settings))) or "none"
    network = "allowed" if settings.allow_network else "no network"
    confined = "a sandboxed" if settings.sandbox == "bwrap" else "an unsandboxed"
    return (
        f"Python 3 in {confined} Jupyter (IPython) kernel: {network}, "
        f"{settings.memory_mb} MB of memory, {settings.max_run_disk_mb} MB of disk in its "
        f"working directory, {settings.timeout:g} s per call by default (at most "
        f"{settings.max_request_timeout:g} s), output cut at {settings.max_output_bytes:,} "
        f"bytes. Installed beyond the standard library: {packages}; nothing can be "
        "pip-installed. Plots (matplotlib) come back as PNG images."
    )


def _kernel_python(settings: Settings) -> str | None:
    return str(settings.kernel_python) if settings.kernel_python else None


INSTRUCTIONS = """\
autocoder runs code in sandboxed Jupyter kernels and records every run as a notebook.
Use run_code to execute Python you wrote; run_prompt to have autocoder's own model write and
debug code for a task. Without a session each call starts from nothing (a fresh kernel);
open_session gives a kernel whose variables, imports and files persist across calls.
"""


def build_server(door: Door, **options: Any) -> MCPServer:
    """The MCP server whose tools use `door`; `options` go to MCPServer (its lifespan)."""
    settings = door.settings
    limits = _limits(settings)
    installed = languages.installed(settings)
    upload_limit = settings.max_upload_mb * 1024 * 1024
    Timeout = Annotated[
        float | None,
        Field(
            gt=0,
            le=settings.max_request_timeout,
            description=f"Seconds the code may run (default {settings.timeout:g}; at most "
            f"{settings.max_request_timeout:g}). Past it the kernel is interrupted.",
        ),
    ]
    Language = Annotated[
        str,
        Field(
            description="The language to run. A session's kernel is Python.",
            json_schema_extra={"enum": installed},
        ),
    ]
    SessionId = Annotated[
        str | None,
        Field(
            description="Run in this session (from open_session): what earlier calls defined "
            "is there. Omitted: a fresh kernel that keeps nothing afterwards."
        ),
    ]
    RunId = Annotated[str | None, Field(description="A run's id, from a run's result.")]
    OfSession = Annotated[str | None, Field(description="A session's id, from open_session.")]
    server = MCPServer(
        "autocoder",
        version=__version__,
        instructions=INSTRUCTIONS + limits,
        log_level="WARNING",
        **options,
    )

    # Each session's call in progress. A client that cancels a call does not wait for its
    # end, and sends the next one at once: that one waits (bounded) for the cancelled call
    # to interrupt the kernel and let go of the session, rather than finding it busy.
    calls: dict[str, asyncio.Task[RunResult]] = {}

    async def claim(session_id: str | None, language: str) -> Session | None:
        if session_id is None:
            return None
        if languages.resolve(language, settings).name != "python":
            raise ToolError("a session's kernel is Python; run other languages without one")
        sessions = door.opened.sessions
        try:
            return sessions.claim(session_id)
        except SessionBusy:
            ending = calls.get(session_id)
            if ending is None or not ending.cancelling():
                raise
        await asyncio.wait({ending}, timeout=CANCEL_GRACE)
        return sessions.claim(session_id)

    def track(session_id: str | None) -> Callable[[asyncio.Task[RunResult]], None]:
        def started(task: asyncio.Task[RunResult]) -> None:
            if session_id is not None:
                calls[session_id] = task
                task.add_done_callback(lambda _: calls.pop(session_id, None))

        return started

    @asynccontextmanager
    async def taken(session: Session | None) -> AsyncIterator[None]:
        """A run slot for a call. The run ends a session's claim (and may release it before
        it returns, to another call); only a call that never got to run releases it here."""
        started = False
        try:
            async with door.slot():
                started = True
                yield
        finally:
            if session is not None and not started:
                door.opened.sessions.release(session)

    def finished(result: RunResult, session: Session | None) -> CallToolResult:
        listed = [_file_info(f, _run_uri(result.run_id, f.name)) for f in result.files]
        return _answer(result, listed, session is not None and session.lost_during(result.run_id))

    @server.tool(
        description="Run the given code and return what it printed, its error (the traceback, "
        "as a result marked isError: fix the code and call again), each plot as a PNG image, "
        "and the files it wrote. " + limits + " Every call is recorded as a notebook.",
        annotations=ToolAnnotations(title="Run code", open_world_hint=False),
    )
    async def run_code(
        code: Annotated[
            str,
            Field(
                min_length=1,
                max_length=settings.max_code_chars,
                description="The code to run, as one cell.",
            ),
        ],
        ctx: Context,
        language: Language = "python",
        session_id: SessionId = None,
        timeout: Timeout = None,
    ) -> Annotated[CallToolResult, CodeRun]:
        engine = door.opened
        if not code.strip():
            raise ToolError("the code is blank")
        with _refusals():
            lang = languages.resolve(language, settings).name
            session = await claim(session_id, lang)

            async def work(on_event: EventSink) -> RunResult:
                async with taken(session):
                    return await engine.execute(
                        code, language=lang, session=session, timeout=timeout, on_event=on_event
                    )

            result = await _owned(ctx, work, track(session_id))
        return finished(result, session)

    @server.tool(
        description="Have autocoder's model write code for a task in plain English, run it, "
        "and retry with the error until it works (or the attempts run out). Returns the final "
        "code, its output, plots as PNG images, its files, and a one-line summary of the "
        "attempts; a result marked isError when every attempt failed. " + limits,
        annotations=ToolAnnotations(title="Run a prompt", open_world_hint=False),
    )
    async def run_prompt(
        prompt: Annotated[
            str,
            Field(
                min_length=1,
                max_length=settings.max_prompt_chars,
                description="The task, in plain English.",
            ),
        ],
        ctx: Context,
        language: Language = "python",
        session_id: SessionId = None,
        max_attempts: Annotated[
            int | None,
            Field(
                ge=1,
                le=settings.max_request_attempts,
                description=f"Attempts at most (default {settings.max_attempts}).",
            ),
        ] = None,
    ) -> Annotated[CallToolResult, CodeRun]:
        engine = door.opened
        if not prompt.strip():
            raise ToolError("the prompt is blank")
        with _refusals():
            lang = languages.resolve(language, settings).name
            session = await claim(session_id, lang)
            options: dict[str, Any] = {} if session else {"language": lang}

            async def work(on_event: EventSink) -> RunResult:
                async with taken(session):
                    return await engine.run(
                        prompt,
                        session=session,
                        max_attempts=max_attempts,
                        on_event=on_event,
                        **options,
                    )

            result = await _owned(ctx, work, track(session_id))
        if result.error_kind is not None and result.error_kind.value == "llm" and not result.code:
            raise ToolError(result.error)
        return finished(result, session)

    @server.tool(
        description="Open a session: one sandboxed Python kernel and working directory kept "
        "between calls, so variables, imports and files persist (pass its session_id to "
        "run_code, run_prompt, upload_file). It closes after "
        f"{settings.session_idle_timeout:g} s unused, at the latest after "
        f"{settings.session_max_age:g} s, or with close_session. At most "
        f"{settings.max_sessions} are open at once.",
        annotations=ToolAnnotations(title="Open a session", open_world_hint=False),
    )
    async def open_session() -> SessionOpened:
        engine = door.opened
        with _refusals():
            session = await engine.sessions.create()
        return SessionOpened(session_id=session.info.session_id, expires_at=session.info.expires_at)

    @server.tool(
        description="Close a session: its kernel stops and its state is gone; its notebook "
        "and files stay readable (list_files, read_file).",
        annotations=ToolAnnotations(title="Close a session", idempotent_hint=True),
    )
    async def close_session(
        session_id: Annotated[str, Field(description="From open_session.")],
    ) -> SessionClosed:
        engine = door.opened
        with _refusals():
            session = engine.sessions.open_session(session_id)
            await engine.sessions.end(session, "deleted")
        info = session.info
        return SessionClosed(
            session_id=info.session_id,
            status=info.status,
            runs=len(info.runs),
            notebook=info.notebook,
        )

    @server.tool(
        description="Put a file into a session's working directory, read-only, for the code "
        f"to open by its name. At most {settings.max_upload_mb} MB; the name may not be "
        "taken already.",
        annotations=ToolAnnotations(title="Upload a file", open_world_hint=False),
    )
    async def upload_file(
        session_id: Annotated[str, Field(description="From open_session.")],
        name: Annotated[str, Field(description="The file's name, e.g. data.csv.")],
        content_base64: Annotated[str, Field(description="The file's bytes, base64-encoded.")],
    ) -> FileInfo:
        engine = door.opened
        if len(content_base64) > math.ceil(upload_limit / 3) * 4 + 4:
            raise ToolError(
                f"the file {name!r} is over {settings.max_upload_mb} MB (AUTOCODER_MAX_UPLOAD_MB)"
            )
        try:
            data = base64.b64decode(content_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ToolError("content_base64 is not valid base64") from None
        with _refusals():
            given = [InputFile(name, data)]
            session = engine.sessions.claim(session_id, given)
            try:
                await asyncio.to_thread(session.place, given)
                await asyncio.to_thread(bundle.keep_inputs_beside, session.notebook_path(), given)
            finally:
                engine.sessions.release(session)
        return FileInfo(
            name=name,
            size=len(data),
            media_type=media_type(name),
            uri=_session_uri(session_id, name),
        )

    @server.tool(
        description="List the files a run wrote (run_id, from a result) or that a session's "
        "working directory holds (session_id). Give one of the two.",
        annotations=ToolAnnotations(title="List files", read_only_hint=True),
    )
    async def list_files(run_id: RunId = None, session_id: OfSession = None) -> FileList:
        engine = door.opened
        with _refusals():
            if (run_id is None) == (session_id is None):
                raise ToolError("give run_id or session_id (one of them)")
            if run_id is not None:
                result = await asyncio.to_thread(engine.store.get, run_id)
                if result is None:
                    raise ToolError(f"no run {run_id!r}")
                return FileList(
                    files=[_file_info(f, _run_uri(run_id, f.name)) for f in result.files]
                )
            assert session_id is not None
            session = engine.sessions.find(session_id)
            listed = await asyncio.to_thread(session.list_files)
            return FileList(files=[_file_info(f, _session_uri(session_id, f.name)) for f in listed])

    @server.tool(
        description="Read a file a run wrote (run_id) or a session holds (session_id): text "
        "comes back as text, images as images, anything else as a base64 blob. At most "
        f"{settings.max_upload_mb} MB.",
        annotations=ToolAnnotations(title="Read a file", read_only_hint=True),
    )
    async def read_file(
        name: Annotated[str, Field(description="As list_files gives it.")],
        run_id: RunId = None,
        session_id: OfSession = None,
    ) -> CallToolResult:
        with _refusals():
            if (run_id is None) == (session_id is None):
                raise ToolError("give run_id or session_id (one of them)")
            data, uri = await _read(door, name, run_id, session_id)
        return CallToolResult(content=[_file_content(name, data, uri)])

    @server.resource(
        "autocoder://runs/{run_id}/files/{+name}",
        name="run_file",
        description="A file a run's code wrote.",
        mime_type="application/octet-stream",
    )
    async def run_file(run_id: str, name: str) -> bytes:
        return await _read_resource(door, name, run_id, None)

    @server.resource(
        "autocoder://sessions/{session_id}/files/{+name}",
        name="session_file",
        description="A file in a session's working directory.",
        mime_type="application/octet-stream",
    )
    async def session_file(session_id: str, name: str) -> bytes:
        return await _read_resource(door, name, None, session_id)

    return server


async def _read(
    door: Door, name: str, run_id: str | None, session_id: str | None
) -> tuple[bytes, str]:
    """A run's or a session's file, opened by descriptor beneath its own directory (never
    by a path the code could have swapped), within the size limit."""
    engine = door.opened
    limit = door.settings.max_upload_mb * 1024 * 1024
    if run_id is not None:
        stored = await asyncio.to_thread(engine.store.output_file, run_id, name)
        if stored is None:
            raise ToolError(f"run {run_id!r} has no file {name!r}")
        opened, data = stored.opened, stored.data
        uri = _run_uri(run_id, name)
    else:
        assert session_id is not None
        session = engine.sessions.find(session_id)
        opened = await asyncio.to_thread(open_beneath, session.workdir, name)
        if opened is None:
            raise ToolError(f"session {session_id!r} has no file {name!r}")
        data = None
        uri = _session_uri(session_id, name)
    if opened is not None:
        with opened:
            if opened.size > limit:
                raise FilesTooLarge(
                    f"the file {name!r} has {opened.size:,} bytes; at most "
                    f"{door.settings.max_upload_mb} MB are read (AUTOCODER_MAX_UPLOAD_MB)"
                )
            data = await asyncio.to_thread(opened.read)
    assert data is not None
    if len(data) > limit:
        raise FilesTooLarge(f"the file {name!r} is over {door.settings.max_upload_mb} MB")
    return data, uri


async def _read_resource(
    door: Door, name: str, run_id: str | None, session_id: str | None
) -> bytes:
    try:
        with _refusals():
            data, _ = await _read(door, name, run_id, session_id)
    except ToolError as e:
        raise ResourceError(str(e)) from None
    return data


def _file_content(name: str, data: bytes, uri: str) -> ContentBlock:
    kind = media_type(name)
    if kind in IMAGE_TYPES:
        return ImageContent(type="image", data=base64.b64encode(data).decode(), mime_type=kind)
    if kind.startswith("text/") or kind in TEXT_TYPES or kind.endswith("+json"):
        try:
            return TextContent(type="text", text=data.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    blob = BlobResourceContents(uri=uri, mime_type=kind, blob=base64.b64encode(data).decode())
    return EmbeddedResource(type="resource", resource=blob)


# --- the ways in -------------------------------------------------------------------------------


def serve_stdio(settings: Settings) -> None:
    """`autocoder mcp`: the server over stdin/stdout until the client closes stdin.

    The engine opens inside the transport: the SDK points fd 1 at stderr while it serves,
    so kernels started from here cannot write into the protocol's stream. Logging goes to
    stderr only.
    """
    check(settings)  # what cannot work is one line and exit 2 now, not a dead server later
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="autocoder: %(message)s")
    door = Door(settings, local_slots(settings))

    @asynccontextmanager
    async def lifespan(server: MCPServer) -> AsyncIterator[None]:
        async with open_engine(settings) as engine:
            door.engine = engine
            try:
                yield
            finally:
                door.engine = None

    anyio.run(build_server(door, lifespan=lifespan).run_stdio_async)


@asynccontextmanager
async def http_app(door: Door) -> AsyncIterator[ASGIApp]:
    """The Streamable HTTP endpoint as an ASGI app, serving until the block ends (calls
    still running then are cancelled, and recorded as such). Host, Origin and token are
    the API's to check (its Guard runs first), so the SDK's own Host check is off."""
    server = build_server(door)
    server.streamable_http_app(
        max_request_body_size=request_body_limit(door.settings),
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    async with server.session_manager.run():
        yield StreamableHTTPASGIApp(server.session_manager)


def request_body_limit(settings: Settings) -> int:
    """The largest request an MCP call may send: a file at the upload limit, base64-encoded,
    or code or a prompt at their limits with every character escaped (as /run counts)."""
    upload = math.ceil(settings.max_upload_mb * 1024 * 1024 / 3) * 4
    text = 12 * max(settings.max_code_chars, settings.max_prompt_chars)
    return max(upload, text) + 256 * 1024

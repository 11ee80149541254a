"""Sessions: one sandboxed kernel and one working directory kept between prompts.

A session is not a second engine. Each prompt is an ordinary `Runner.run`, handed the
session's kernel through `SessionKernels` (an executor provider that gives every run the
same kernel and never shuts it down) and told what the session holds: the earlier prompts
with the code that worked, the user's names and their short types (read in the kernel by the
magic's own logic, `namespace.probe_code`), and the files in the working directory, within
AUTOCODER_SESSION_CONTEXT_CHARS characters.

Failed attempts. Before a run's first attempt the session takes a snapshot of the kernel's
name bindings (a shallow copy of the user namespace); before each retry, and after a run that
failed, the bindings are put back: names the failed code added are removed, names it rebound
get their old objects again. Objects it changed in place (`df.drop(..., inplace=True)`,
`xs.append(...)`) and files it wrote stay changed: copying arbitrary objects deeply would cost
memory without bound.

Lost state. A kernel that dies, or that is restarted because it did not stop after a timeout,
takes the session's variables and imports with it. The attempt says so (`notice`), the model
is told, the run's entry says `state_lost`, the session's notebook gets a `%reset -f` cell at
that point (so Run All still reproduces the final state), and the session goes on in the
fresh kernel. Nothing is replayed: files in the working directory remain, names do not.

One run at a time. A second prompt sent while one runs is refused (`SessionBusy`, HTTP 409)
rather than queued: a queue would hold a run slot, and a client, for a wait nobody bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autocoder import bundle, disk
from autocoder import files as files_mod
from autocoder import llm as llm_mod
from autocoder.config import Settings
from autocoder.errors import AutocoderError
from autocoder.files import InputFile
from autocoder.kernel.client import INTERRUPT_GRACE, Kernel
from autocoder.kernel.output import OutputCallback
from autocoder.kernel.pool import KernelSource
from autocoder.namespace import parse_probe, probe_code, task_with_names
from autocoder.notebook import (
    KERNELSPEC,
    Notebook,
    code_cell,
    language_info,
    markdown_cell,
    md_escape,
    new_notebook,
    notebook_json,
    notebook_output,
    number_cells,
    record_path,
    setup_cell,
    write_atomic,
)
from autocoder.prompts import SESSION_PROMPT, system_prompt_for
from autocoder.records import (
    ErrorKind,
    Execution,
    RunFile,
    RunResult,
    SessionInfo,
    SessionRun,
)
from autocoder.runner import EventSink, Runner, new_run_id

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 10.0
MAX_FILES_TOLD = 40
REAP_INTERVAL = 5.0

_SNAPSHOT = "get_ipython()._autocoder_saved = dict(get_ipython().user_ns)"
_RESTORE = """\
ip = get_ipython()
saved = getattr(ip, "_autocoder_saved", None)
if saved is not None:
    for name in [n for n in ip.user_ns if n not in saved]:
        del ip.user_ns[name]
    ip.user_ns.update(saved)
"""
_FORGET = "get_ipython().__dict__.pop('_autocoder_saved', None)"


def _isolated(source: str) -> str:
    """`source` run in a namespace of its own, so it leaves no name in the user's."""
    return f"exec({source!r}, {{'get_ipython': get_ipython}})"


class SessionError(AutocoderError):
    """A request about a session that cannot be served as asked."""


class SessionGone(SessionError, LookupError):
    """No such session (`known` False), or one that is closed (`known` True; `reason` says why)."""

    def __init__(self, message: str, *, known: bool) -> None:
        super().__init__(message)
        self.known = known


class SessionBusy(SessionError):
    """The session is running another prompt."""


class SessionsFull(SessionError):
    """AUTOCODER_MAX_SESSIONS are open; `retry_after` is when the first may expire."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def new_session_id() -> str:
    return "session-" + new_run_id()


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds")


def session_notebook_path(notebooks_dir: Path, session_id: str) -> Path:
    return notebooks_dir / f"{session_id}.ipynb"


def _lost_notice(why: str) -> str:
    return (
        f"The session's state was lost: {why}. The variables and imports of earlier tasks are "
        "gone (files in the working directory remain); the code now runs in a fresh kernel, "
        "so it must load or compute again whatever it needs."
    )


class SessionKernels:
    """The executor provider a session's run uses: the session's kernel, every time."""

    fresh = False  # the session's state: one candidate per attempt

    def __init__(self, session: Session) -> None:
        self.session = session

    async def acquire(self) -> SessionExecutor:
        return SessionExecutor(self.session)

    async def release(self, executor: SessionExecutor) -> None:
        """The kernel stays with the session; what this run changed in the working directory
        is copied out for the run's record (the runner keeps `executor.workdir`)."""
        executor.workdir = await asyncio.to_thread(self.session.copy_changes)

    async def close(self) -> None:
        return None


class SessionExecutor:
    """One run's view of the session's kernel (see the module docstring for retries)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        # None while the run goes on: the runner never places files in, nor moves, the
        # session's own directory; release() points it at the copy of the run's changes.
        self.workdir: Path | None = None

    async def execute(
        self,
        code: str,
        *,
        timeout: float,
        max_output_bytes: int | None = None,
        on_output: OutputCallback | None = None,
    ) -> Execution:
        return await self.session.execute_attempt(
            code, timeout=timeout, max_output_bytes=max_output_bytes, on_output=on_output
        )

    async def reset(self) -> None:
        """The next attempt starts from the bindings the run started with."""
        await self.session.restore()


class Session:
    """One open (or closed) session. `Sessions` owns it; its kernel is closed only by `close`."""

    def __init__(
        self,
        settings: Settings,
        info: SessionInfo,
        root: Path,
        kernels: KernelSource | None = None,
    ) -> None:
        self.settings = settings
        # Where its kernel comes from: the pool of the Sessions that owns it.
        self.kernels = kernels or KernelSource(settings)
        self.info = info
        self.root = root
        self.workdir = Path(info.workdir)
        self.kernel: Kernel | None = None
        self.created = time.time()
        self.last_used = self.created
        self.claimed = False
        self.task: asyncio.Task[Any] | None = None
        self._lost: list[str] = []
        self._before: dict[str, tuple[int, int]] = {}
        self._holding_snapshot = False

    def notebook_path(self) -> Path:
        return Path(self.info.notebook)

    @property
    def is_open(self) -> bool:
        return self.info.status == "open"

    # --- time ---------------------------------------------------------------------------------

    def deadline(self) -> float:
        """When the session expires (wall clock): idle timeout from its last use, capped by age."""
        s = self.settings
        return min(self.last_used + s.session_idle_timeout, self.created + s.session_max_age)

    def expiry_reason(self, now: float) -> str | None:
        if now >= self.created + self.settings.session_max_age:
            return "max_age"
        if now >= self.last_used + self.settings.session_idle_timeout:
            return "idle"
        return None

    def touch(self) -> None:
        self.last_used = time.time()
        self.info.last_used_at = _iso(self.last_used)
        self.info.expires_at = _iso(self.deadline())

    # --- the kernel ---------------------------------------------------------------------------

    async def start(self) -> None:
        kernel = self.kernels.kernel("python", self.workdir)
        self.kernel = kernel
        await kernel.start()

    async def _run_quietly(self, code: str) -> Execution | None:
        """Session bookkeeping in the kernel; a kernel replaced meanwhile counts as lost state."""
        kernel = self.kernel
        if kernel is None:
            return None
        before = kernel.restarts
        result = await kernel.execute(code, timeout=PROBE_TIMEOUT)
        if kernel.restarts != before:
            await self.state_lost("the kernel stopped answering and was restarted")
        return result

    async def names(self) -> list[tuple[str, str]]:
        result = await self._run_quietly(probe_code())
        return (parse_probe(result.stdout) or []) if result is not None else []

    async def snapshot(self) -> None:
        self._holding_snapshot = True
        await self._run_quietly(_isolated(_SNAPSHOT))

    async def restore(self) -> None:
        if self._holding_snapshot:
            await self._run_quietly(_isolated(_RESTORE))

    async def forget_snapshot(self) -> None:
        """The snapshot holds the objects the run replaced; they are freed here."""
        if self._holding_snapshot:
            self._holding_snapshot = False
            await self._run_quietly(_isolated(_FORGET))

    async def execute_attempt(
        self,
        code: str,
        *,
        timeout: float,
        max_output_bytes: int | None,
        on_output: OutputCallback | None,
    ) -> Execution:
        kernel = self.kernel
        assert kernel is not None, "a session's kernel is started before its runs"
        before = kernel.restarts
        try:
            result = await kernel.execute(
                code, timeout=timeout, max_output_bytes=max_output_bytes, on_output=on_output
            )
        except asyncio.CancelledError:
            # The run was cancelled mid-attempt: the code may still be running in the kernel.
            await asyncio.shield(self._settle(before))
            raise
        if kernel.restarts != before:
            why = (
                "the kernel died"
                if result.kind is ErrorKind.KERNEL_DIED
                else "the code did not stop after the timeout, so the kernel was restarted"
            )
            result.notice = await self.state_lost(why)
        return result

    async def _settle(self, restarts_before: int) -> None:
        """Stop code a cancel left running: interrupt, then wait (bounded) for the kernel to
        take the next request; one that does not is restarted by `execute` itself."""
        kernel = self.kernel
        if kernel is None or kernel.km is None:
            return
        await kernel.interrupt()
        with contextlib.suppress(Exception):
            await kernel.execute("pass", timeout=INTERRUPT_GRACE)
        if kernel.restarts != restarts_before:
            await self.state_lost("the interrupted code did not stop, so the kernel was restarted")

    async def state_lost(self, why: str) -> str:
        self._lost.append(why)
        await asyncio.to_thread(self._adopt_files)
        if self._holding_snapshot:
            # The fresh kernel's (empty) namespace is what later attempts start from.
            with contextlib.suppress(Exception):
                if self.kernel is not None:
                    await self.kernel.execute(_isolated(_SNAPSHOT), timeout=PROBE_TIMEOUT)
        return _lost_notice(why)

    def _adopt_files(self) -> None:
        """A sandboxed kernel may run as a throwaway uid that owns the working directory; files
        the previous kernel wrote are handed to the new one, so it can still change them."""
        if os.geteuid() != 0:
            return
        try:
            owner = self.workdir.stat().st_uid
        except OSError:
            return
        # By descriptor, never by path: a name swapped for a symlink is changed, not its target.
        with contextlib.suppress(OSError):
            for _, dirnames, filenames, dir_fd in os.fwalk(self.workdir, follow_symlinks=False):
                for name in dirnames + filenames:
                    with contextlib.suppress(OSError):
                        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                        if st.st_uid not in {0, owner}:
                            os.chown(name, owner, owner, dir_fd=dir_fd, follow_symlinks=False)

    async def close(self) -> None:
        await self.stop_kernel()
        await asyncio.to_thread(self.settle_files)

    async def stop_kernel(self) -> None:
        """The kernel only: its working directory stays as it is, for the next one."""
        kernel, self.kernel = self.kernel, None
        if kernel is not None:
            await kernel.shutdown()

    def settle_files(self) -> None:
        """Its files from its disk budget (a tmpfs) to the disk, where a closed session keeps
        them; as many as leave room for the records, smallest first."""
        kept = disk.settle(self.workdir)
        if kept.dropped:
            log.warning(
                "session %s: %s", self.info.session_id, kept.words(self.settings.autofile_dir)
            )

    # --- files --------------------------------------------------------------------------------

    @property
    def losses(self) -> int:
        """How many times the session's kernel state was lost so far."""
        return len(self._lost)

    def lost_during(self, run_id: str) -> bool:
        """Whether the state was lost during the run `run_id` (its entry in the session says)."""
        entry = next((r for r in self.info.runs if r.run_id == run_id), None)
        return bool(entry and entry.state_lost)

    def lost_since(self, losses: int) -> str | None:
        """Why the state was last lost, if it was since there were `losses` losses."""
        return self._lost[-1] if len(self._lost) > losses else None

    def note_files(self) -> None:
        """From now on, what the code makes or changes is the run's own files (`copy_changes`)."""
        self._before = self.file_stamps()

    def file_stamps(self) -> dict[str, tuple[int, int]]:
        return {rel: (st.st_size, st.st_mtime_ns) for rel, st in files_mod.walk_files(self.workdir)}

    def copy_changes(self) -> Path | None:
        """A new directory holding the files this run made or changed, or None if it changed none."""
        now = self.file_stamps()
        changed = [rel for rel, stamp in now.items() if self._before.get(rel) != stamp]
        if not changed:
            return None
        work_root = self.settings.autofile_dir / ".work"
        work_root.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix="session-run-", dir=work_root))
        for rel in changed[: files_mod.MAX_LISTED]:
            dest = target / rel
            # The session's kernel is alive and may be swapping names: copied by descriptor.
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                files_mod.copy_beneath(self.workdir, rel, dest)
            except OSError:
                dest.unlink(missing_ok=True)  # never half a file (a full disk)
        return target

    def list_files(self) -> list[RunFile]:
        """The files in the session's working directory (their URLs are the API's to make)."""
        return files_mod.list_outputs(self.workdir)

    def place(self, inputs: Sequence[InputFile]) -> None:
        self.check_new_files(inputs)
        files_mod.place(inputs, self.workdir)

    def check_new_files(self, inputs: Sequence[InputFile]) -> None:
        if inputs:
            files_mod.check_free(inputs, self.workdir)

    # --- what the model is told ---------------------------------------------------------------

    def context(
        self,
        prompt: str,
        names: list[tuple[str, str]],
        history: list[tuple[SessionRun, str]],
        inputs: Sequence[InputFile],
        lost: str | None = None,
    ) -> str:
        """The task as the model gets it, within AUTOCODER_SESSION_CONTEXT_CHARS characters
        (the prompt and the listing of names come first; older tasks are left out first)."""
        budget = self.settings.session_context_chars
        tail = task_with_names(prompt, names)
        if inputs:
            tail += "\n\n" + files_mod.describe(inputs)
        parts: list[str] = []
        stamps = self.file_stamps()
        fresh = {f.name for f in inputs}
        listed = [
            f"- {rel} ({files_mod._size(size)})"
            for rel, (size, _) in sorted(stamps.items())
            if rel not in fresh
        ]
        if listed:
            more = len(listed) - MAX_FILES_TOLD
            listed = listed[:MAX_FILES_TOLD] + ([f"- ... and {more} more"] if more > 0 else [])
            parts.append("Files in the working directory:\n" + "\n".join(listed))
        room = budget - len(tail) - sum(len(p) for p in parts)
        told: list[str] = []
        for number, (run, code) in reversed(list(enumerate(history, 1))):
            said = run.prompt.strip() if run.origin == "model" else "(code the user ran)"
            if run.status == "success":
                shown = llm_mod.cut_middle(code.strip(), max(200, budget // 4))
                item = f"Task {number}: {said}\n```python\n{shown}\n```"
            else:
                item = f"Task {number} (failed; its changes were undone): {said}"
            if run.state_lost:
                item += "\n(The session's state was lost during this task: names from before it are gone.)"
            if len(item) > room:
                told.append(f"({number} earlier task(s) not shown)")
                break
            room -= len(item)
            told.append(item)
        if told:
            parts.insert(
                0,
                "Earlier in this session, oldest first, each task with the code that did it:\n\n"
                + "\n\n".join(reversed(told)),
            )
        if lost:
            parts.insert(0, f"Note: {_lost_notice(lost)}")
        return "\n\n".join([*parts, tail]) if parts else tail


class Sessions:
    """Every session of one server (or of one `autocoder chat`), and the reaper that expires them.

    Records live in `<notebooks>/.autocoder/sessions/<id>.json`, the notebook beside the runs'
    notebooks, the files in `<autofile>/sessions/<id>/files`. Use as `async with`.
    """

    def __init__(self, settings: Settings, runner: Runner, kernels: KernelSource) -> None:
        self.settings = settings
        self.runner = runner
        self.kernels = kernels
        self.records_dir = settings.notebooks_dir / ".autocoder" / "sessions"
        self.files_root = settings.autofile_dir / "sessions"
        self.sessions: dict[str, Session] = {}
        self._opening = 0
        self._reaper: asyncio.Task[None] | None = None
        self._system_prompt: str | None = None
        self._closing = False

    async def __aenter__(self) -> Sessions:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Read the records; any still open was left by a server that stopped: it is closed."""
        await asyncio.to_thread(self._load)
        self._reaper = asyncio.create_task(self._reap())

    def _load(self) -> None:
        self.records_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.records_dir.glob("session-*.json")):
            try:
                info = SessionInfo.model_validate_json(path.read_bytes())
            except (OSError, ValueError) as e:
                log.warning("skipping the unreadable session record %s: %s", path, e)
                continue
            session = Session(self.settings, info, self.files_root / info.session_id, self.kernels)
            if info.status == "open":
                # A server killed with it open left its files in their disk budget.
                session.settle_files()
                info.status = "closed"
                info.closed_at = _iso(time.time())
                info.closed_reason = "server_restart"
                info.running = None
                self._save(session)
            self.sessions[info.session_id] = session

    async def close(self) -> None:
        """Close every open session (the server stops); their records say so."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for session in list(self.sessions.values()):
            if session.is_open:
                await self.end(session, "shutdown")

    @property
    def open_count(self) -> int:
        return sum(1 for s in self.sessions.values() if s.is_open) + self._opening

    def retry_after(self) -> int:
        soonest = min(
            (s.deadline() for s in self.sessions.values() if s.is_open and not s.claimed),
            default=time.time() + 60,
        )
        return max(1, min(3600, int(soonest - time.time()) + 1))

    async def create(
        self,
        *,
        timeout: float | None = None,
        model: str | None = None,
        inputs: Sequence[InputFile] = (),
    ) -> Session:
        """Open a session with a started kernel; SessionsFull over AUTOCODER_MAX_SESSIONS."""
        files_mod.check_inputs(inputs, self.settings)
        if self._closing:
            raise SessionsFull("the server is shutting down", retry_after=5)
        await asyncio.to_thread(disk.check_room, self.settings)
        if self.settings.max_sessions == 0:
            raise SessionsFull(
                "this server keeps no sessions (AUTOCODER_MAX_SESSIONS=0); use POST /run",
                retry_after=3600,
            )
        if self.open_count >= self.settings.max_sessions:
            raise SessionsFull(
                f"{self.settings.max_sessions} sessions are open, the most this server keeps "
                "(AUTOCODER_MAX_SESSIONS); close one (DELETE /sessions/{id}) or retry later",
                retry_after=self.retry_after(),
            )
        self._opening += 1
        try:
            sid = new_session_id()
            while sid in self.sessions:  # two in the same second
                sid = f"session-{new_run_id()}{secrets.token_hex(1)}"
            now = time.time()
            info = SessionInfo(
                session_id=sid,
                status="open",
                created_at=_iso(now),
                last_used_at=_iso(now),
                expires_at=_iso(now),
                model=model,
                timeout=timeout,
                notebook=str(session_notebook_path(self.settings.notebooks_dir.resolve(), sid)),
                workdir=str((self.files_root / sid / "files").resolve()),
            )
            session = Session(self.settings, info, self.files_root / sid, self.kernels)
            session.created = session.last_used = now
            session.touch()
            await asyncio.to_thread(session.workdir.mkdir, parents=True, exist_ok=True)
            # One disk budget for the session's whole life, whichever kernels it has.
            await asyncio.to_thread(disk.confine_workdir, self.settings, session.workdir)
            if inputs:
                await asyncio.to_thread(files_mod.place, inputs, session.workdir)
                await asyncio.to_thread(bundle.keep_inputs_beside, session.notebook_path(), inputs)
            try:
                await session.start()
            except BaseException:
                await asyncio.shield(session.close())
                raise
            session.touch()  # idle from when it can be used, not from before its kernel started
            self.sessions[sid] = session
        finally:
            self._opening -= 1
        await asyncio.to_thread(self._write, session)
        return session

    def find(self, session_id: str) -> Session:
        """A session open or closed; SessionGone(known=False) when there never was one."""
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionGone(f"no session {session_id!r}", known=False)
        return session

    def open_session(self, session_id: str) -> Session:
        """An open session; SessionGone saying whether it is unknown or closed, and why."""
        session = self.find(session_id)
        if not session.is_open:
            raise SessionGone(_closed_message(session.info), known=True)
        return session

    def claim(self, session_id: str, inputs: Sequence[InputFile] = ()) -> Session:
        """Reserve the session for one run (SessionBusy if another has it); `release` undoes it."""
        session = self.open_session(session_id)
        if session.claimed:
            running = f" (run {session.info.running})" if session.info.running else ""
            raise SessionBusy(
                f"session {session_id!r} is running another prompt{running}; send the next "
                "one when it has finished"
            )
        files_mod.check_inputs(inputs, self.settings)
        session.check_new_files(inputs)
        session.claimed = True
        return session

    def release(self, session: Session) -> None:
        session.claimed = False

    def listing(self, limit: int, offset: int) -> tuple[list[SessionInfo], int]:
        ordered = sorted(
            self.sessions.values(), key=lambda s: (s.info.created_at, s.info.session_id)
        )
        ordered.reverse()
        page = ordered[offset : offset + limit]
        return [s.info.model_copy(deep=True) for s in page], len(ordered)

    def describe(self, session: Session) -> SessionInfo:
        """The record with the files listed now."""
        info = session.info.model_copy(deep=True)
        info.files = session.list_files()
        return info

    async def run(
        self,
        session: Session,
        prompt: str,
        *,
        max_attempts: int | None = None,
        timeout: float | None = None,
        model: str | None = None,
        on_event: EventSink | None = None,
        run_id: str | None = None,
        inputs: Sequence[InputFile] = (),
        code: str | None = None,
    ) -> RunResult:
        """Run one prompt in a claimed session (see `claim`); the claim ends with the run.

        With `code` (and `prompt` empty) that code runs as it is, as `Runner.run` runs given
        code: the model is not told the session's context, nor asked; a failure's changes to
        the session's names are undone as a failed prompt's are."""
        assert session.claimed, "claim() the session first"
        if not session.is_open:  # closed while this run waited for a slot
            self.release(session)
            raise SessionGone(_closed_message(session.info), known=True)
        run_id = run_id or new_run_id()
        session.info.running = run_id
        session.task = asyncio.current_task()
        lost_before = session.losses
        try:
            if self._system_prompt is None and code is None:
                base = await asyncio.to_thread(system_prompt_for, self.settings)
                self._system_prompt = f"{base}\n{SESSION_PROMPT}"
            if session.kernel is None or not await session.kernel.is_alive():
                await self._revive(session)
            if inputs:
                await asyncio.to_thread(session.place, inputs)
                await asyncio.to_thread(bundle.keep_inputs_beside, session.notebook_path(), inputs)
            # What the run's code makes or changes from here on is the run's own files.
            await asyncio.to_thread(session.note_files)
            task = None
            if code is None:  # what the model is told
                names = await session.names()
                history = await asyncio.to_thread(self._history, session)
                lost = session.lost_since(lost_before)
                task = session.context(prompt, names, history, inputs, lost)
            await session.snapshot()
            result: RunResult | None = None
            try:
                result = await self.runner.run(
                    prompt,
                    max_attempts=max_attempts,
                    timeout=timeout or session.info.timeout,
                    model=model or session.info.model,
                    on_event=on_event,
                    run_id=run_id,
                    system_prompt=self._system_prompt,
                    kernels=SessionKernels(session),
                    task=task,
                    session_id=session.info.session_id,
                    code=code,
                )
            finally:
                await asyncio.shield(self._after_run(session, run_id, result, lost_before))
            return result
        finally:
            session.info.running = None
            session.task = None
            session.touch()
            self.release(session)
            await asyncio.shield(asyncio.to_thread(self._write, session))
            if session.expiry_reason(time.time()) == "max_age":
                await asyncio.shield(self.end(session, "max_age"))

    async def _revive(self, session: Session) -> None:
        """The kernel stopped between prompts (it ran out of CPU time, say): a fresh one."""
        await session.stop_kernel()
        await session.start()
        await session.state_lost("the session's kernel had stopped since the last prompt")

    async def _after_run(
        self, session: Session, run_id: str, result: RunResult | None, lost_before: int
    ) -> None:
        try:
            if result is None or result.status != "success":
                await session.restore()
            await session.forget_snapshot()
        except Exception:
            log.exception("session %s: could not settle its kernel", session.info.session_id)
        if result is None:
            # Cancelled: the runner wrote the record; read it back for the session's list.
            result = await asyncio.to_thread(self._read_result, run_id)
        if result is None:
            return
        session.info.runs.append(
            SessionRun(
                run_id=result.run_id,
                prompt=result.prompt,
                origin=result.origin,
                status=result.status,
                error_kind=result.error_kind,
                state_lost=session.losses > lost_before,
                started_at=result.started_at,
                duration=result.duration,
            )
        )

    def _read_result(self, run_id: str) -> RunResult | None:
        try:
            return RunResult.model_validate_json(
                record_path(self.settings.notebooks_dir, run_id).read_bytes()
            )
        except (OSError, ValueError):
            return None

    def _history(self, session: Session) -> list[tuple[SessionRun, str]]:
        """Each earlier run with the code that worked ('' for a failed one)."""
        history = []
        for run in session.info.runs:
            result = self._read_result(run.run_id)
            history.append((run, result.code if result and run.status == "success" else ""))
        return history

    async def end(self, session: Session, reason: str) -> None:
        """Close a session: its kernel stopped (a run in progress is cancelled first), its
        record and notebook kept."""
        if not session.is_open:
            return
        session.info.status = "closed"
        session.info.closed_at = _iso(time.time())
        session.info.closed_reason = reason
        task = session.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            if not task.cancelling():  # a second cancel would cut its own cleanup short
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(task), 30)
        await session.close()
        await asyncio.to_thread(self._save, session)

    async def _reap(self) -> None:
        tick = max(0.1, min(REAP_INTERVAL, self.settings.session_idle_timeout / 4))
        while True:
            await asyncio.sleep(tick)
            now = time.time()
            for session in list(self.sessions.values()):
                if not session.is_open or session.claimed:
                    continue
                reason = session.expiry_reason(now)
                if reason is not None:
                    try:
                        await self.end(session, reason)
                    except Exception:
                        log.exception("could not close session %s", session.info.session_id)

    # --- records and the notebook -------------------------------------------------------------

    def _save(self, session: Session) -> None:
        info = session.info.model_copy(update={"files": []})
        with _unless_disk_full(session):
            write_atomic(
                self.records_dir / f"{info.session_id}.json", info.model_dump_json(indent=1)
            )

    def _write(self, session: Session) -> None:
        self._save(session)
        results = [self._read_result(run.run_id) for run in session.info.runs]
        beside = bundle.folder_beside(session.notebook_path())
        nb = build_session_notebook(
            session.info, results, files_folder=beside.name if beside.is_dir() else None
        )
        with _unless_disk_full(session):
            write_atomic(Path(session.info.notebook), notebook_json(nb))


@contextlib.contextmanager
def _unless_disk_full(session: Session) -> Iterator[None]:
    """A session's record and notebook are written again after each run: one that finds the
    disk full is said in the log, and its runs' own records answer for them meanwhile."""
    try:
        yield
    except OSError as e:
        if not disk.no_space(e):
            raise
        log.warning("session %s: its record was not updated: %s", session.info.session_id, e)


def _closed_message(info: SessionInfo) -> str:
    why = {
        "deleted": "it was deleted",
        "idle": "it expired after AUTOCODER_SESSION_IDLE_TIMEOUT without use",
        "max_age": "it expired at AUTOCODER_SESSION_MAX_AGE",
        "shutdown": "the server stopped",
        "server_restart": "the server restarted",
    }.get(info.closed_reason or "", "it was closed")
    return (
        f"session {info.session_id!r} is closed ({why}, at {info.closed_at}); its notebook "
        "and files are still there; open a new session to go on"
    )


def build_session_notebook(
    info: SessionInfo, results: Sequence[RunResult | None], files_folder: str | None = None
) -> Notebook:
    """The session as one story: each prompt, then the code that worked with its outputs.

    Failed prompts are markdown (their changes were undone); where the state was lost a
    `%reset -f` cell stands, so Restart & Run All reproduces the session's final state. A
    session given files has them in `files_folder` beside the notebook, and the first code
    cell enters it, as Jupyter starts the kernel in the notebook's folder.
    """
    nb = new_notebook()
    nb["metadata"]["kernelspec"] = dict(KERNELSPEC)
    nb["metadata"]["language_info"] = language_info()
    nb["metadata"]["autocoder"] = {
        "session_id": info.session_id,
        "created_at": info.created_at,
        "status": info.status,
        "runs": [run.run_id for run in info.runs],
        "workdir": info.workdir,
    }
    where = (
        f"the files the session was given are in the folder `{files_folder}` beside this "
        "notebook, and the first cell makes it the working directory"
        if files_folder
        else f"run them in a kernel whose working directory holds the session's files "
        f"(`{info.workdir}`)"
    )
    cells = nb["cells"]
    cells.append(
        markdown_cell(
            f"# Session `{info.session_id}`\n\nOpened {info.created_at} · {len(info.runs)} "
            f"prompt(s). Each prompt is followed by the code that did it; Run All gets back to "
            f"where the session ended ({where})."
        )
    )
    if files_folder:
        cells.append(setup_cell("python", files_folder))
    count = 0
    for number, (run, result) in enumerate(zip(info.runs, results, strict=False), 1):
        quoted = "\n".join("> " + md_escape(line) for line in run.prompt.splitlines() or [""])
        if run.origin == "code":
            quoted = "Code given, run as it is."
        state = "succeeded" if run.status == "success" else "failed"
        cells.append(
            markdown_cell(
                f"**{'Prompt' if run.origin == 'model' else 'Code'} {number}** · run "
                f"`{run.run_id}` · {state}\n\n{quoted}",
                metadata={"autocoder": {"run_id": run.run_id, "status": run.status}},
            )
        )
        if run.state_lost:
            cells.append(
                markdown_cell(
                    "The session's state was lost during this prompt (its kernel died or was "
                    "restarted after a timeout): what earlier cells defined is gone from here on."
                )
            )
            count += 1
            cells.append(code_cell("%reset -f", execution_count=count))
        if run.status != "success" or result is None:
            kind = run.error_kind.value if run.error_kind else "error"
            cells.append(
                markdown_cell(f"It failed ({kind}); its changes to the session were undone.")
            )
            continue
        count += 1
        cell = code_cell(
            result.code.rstrip("\n"),
            metadata={"autocoder": {"run_id": run.run_id}},
            execution_count=count,
            outputs=[notebook_output(out, execution_count=count) for out in result.outputs],
        )
        cells.append(cell)
    return number_cells(nb)

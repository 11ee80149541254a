"""The service: what the lifespan builds and every request shares."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from autocoder.api.admission import Admission, Busy, Slot
from autocoder.api.schemas import ExecuteRequest, RunRequest
from autocoder.api.streaming import cancel_once
from autocoder.config import Settings
from autocoder.engine import Engine
from autocoder.files import InputFile
from autocoder.kernel.pool import KernelPool
from autocoder.records import Event, RunResult
from autocoder.runner import new_run_id
from autocoder.sessions import Session, Sessions
from autocoder.store import Store

log = logging.getLogger(__name__)

CANCEL_GRACE = 15.0


@dataclass
class Job:
    """A run started on behalf of a request."""

    run_id: str
    task: asyncio.Task[RunResult]


@dataclass
class Service:
    """What the endpoints share, one per app on app.state: the engine the lifespan opened,
    the admission of runs, and the runs going on."""

    engine: Engine
    admission: Admission
    runs: set[asyncio.Task[RunResult]] = field(default_factory=set)
    # The runs in progress by id, for a client that asks to stop one.
    running: dict[str, asyncio.Task[RunResult]] = field(default_factory=dict)
    draining: bool = False

    @property
    def settings(self) -> Settings:
        return self.engine.settings

    @property
    def pool(self) -> KernelPool:
        return self.engine.pool

    @property
    def store(self) -> Store:
        return self.engine.store

    @property
    def sessions(self) -> Sessions:
        return self.engine.sessions

    async def admit(self) -> Slot:
        """A run slot, after waiting in the queue if need be; Busy when there is none to have."""
        if self.draining:
            raise Busy("the server is shutting down", status_code=503, retry_after=5)
        return await self.admission.acquire()

    def launch(
        self,
        slot: Slot,
        req: RunRequest | ExecuteRequest,
        on_event: Callable[[Event], None] | None = None,
        files: Sequence[InputFile] = (),
        session: Session | None = None,
    ) -> Job:
        """Start a run that owns `slot`, as its own task: the request that started it cancels
        it when the client leaves, and shutdown cancels what is left. With `session` (claimed
        by the caller) the run happens in the session's kernel, and ends the claim. An
        ExecuteRequest runs its code as given (`Engine.execute`), a RunRequest its prompt."""
        run_id = new_run_id()
        task = asyncio.create_task(self._run(req, run_id, on_event, files, session))
        task.add_done_callback(lambda _: slot.release())
        self.runs.add(task)
        task.add_done_callback(self.runs.discard)
        self.running[run_id] = task
        task.add_done_callback(lambda _: self.running.pop(run_id, None))
        return Job(run_id, task)

    def cancel(self, run_id: str) -> bool:
        """Stop a run in progress as a client hang-up does (its kernel interrupted, the run
        recorded as cancelled); False when no run of that id is in progress here."""
        task = self.running.get(run_id)
        if task is None or task.done():
            return False
        cancel_once(task)
        return True

    async def _run(
        self,
        req: RunRequest | ExecuteRequest,
        run_id: str,
        on_event: Callable[[Event], None] | None,
        files: Sequence[InputFile] = (),
        session: Session | None = None,
    ) -> RunResult:
        if isinstance(req, ExecuteRequest):
            return await self.engine.execute(
                req.code,
                language=req.language or "python",
                session=session,
                timeout=req.timeout,
                files=files,
                run_id=run_id,
                on_event=on_event,
            )
        options = (
            {}
            if session is not None
            else {"language": req.language or "python", "candidates": req.candidates}
        )
        return await self.engine.run(
            req.prompt,
            run_id=run_id,
            session=session,
            listed_model=req.model or "",
            max_attempts=req.max_attempts,
            timeout=req.timeout,
            model=req.model,
            on_event=on_event,
            inputs=files,
            **options,
        )

    async def stopped_result(self, run_id: str) -> RunResult | None:
        """The record of a run a client stopped (`cancel`), as its request's answer; None when
        the server's shutdown cancelled it instead (that request gets a 503)."""
        if self.draining:
            return None
        return await asyncio.to_thread(self.store.get, run_id)

    async def drain(self, grace: float) -> None:
        """Take no new runs; give those running `grace` seconds, then cancel them. A cancelled
        run still ends as a result (recorded, kernel freed), so its request ends normally."""
        self.draining = True
        # Waiters fail now: none may take the slot a cancelled run frees.
        self.admission.close()
        if self.runs:
            await asyncio.wait(set(self.runs), timeout=grace)
        await self._cancel_runs()

    async def _cancel_runs(self) -> None:
        for task in self.runs:
            cancel_once(task)
        if self.runs:
            await asyncio.wait(set(self.runs), timeout=CANCEL_GRACE)

    async def close(self) -> None:
        """Cancel whatever still runs (the engine closes the rest when the lifespan ends)."""
        self.draining = True
        self.admission.close()
        await self._cancel_runs()

"""The engine, assembled once: what every door (the API, `autocoder run` and `chat`) opens.

`open_engine(settings)` checks that kernels can be had, removes what a killed autocoder left
behind, opens the run store, starts the kernel pool, the runner and the sessions, and keeps a
shared store's lease (reclaiming the kernels of replicas that died); leaving it closes them
in the reverse order. `Engine.run` is a run as the store sees it: begun under the lease,
run, then stored; `Engine.execute` is the same for code the caller gives (no model). The
doors only translate: requests and flags in, status codes and exit codes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from autocoder.config import Settings
from autocoder.files import InputFile
from autocoder.kernel import pool as kernel_pool
from autocoder.kernel.leftovers import sweep_leftovers, workdirs_root
from autocoder.kernel.pool import KernelPool
from autocoder.records import RunResult
from autocoder.runner import EventSink, Runner, new_run_id
from autocoder.sessions import Session, SessionError, Sessions
from autocoder.store import Store, open_store

log = logging.getLogger(__name__)

Reclaim = Callable[[list[str]], Awaitable[list[str]]]


def check(settings: Settings) -> None:
    """Before anything starts: kernels can be had and the store can be reached, or one line
    (an AutocoderError) says why not. Blocks."""
    kernel_pool.check(settings)
    open_store(settings).check()


@dataclass
class Engine:
    """What a door uses: the settings, the store, the kernel pool, the runner, the sessions."""

    settings: Settings
    store: Store
    pool: KernelPool
    runner: Runner
    sessions: Sessions
    _lease: asyncio.Task[None] | None = field(default=None, repr=False)

    async def run(
        self,
        prompt: str,
        *,
        run_id: str | None = None,
        session: Session | None = None,
        listed_model: str = "",
        **options: Any,
    ) -> RunResult:
        """Run `prompt` (in `session`, claimed by the caller, when given) as a run of the store:
        begun (under a shared store's lease, so another replica marks it interrupted should
        this process die) and listed with `listed_model` until it ends, then stored. A
        cancelled run was recorded by the runner; it is indexed from that record. `options`
        are `Runner.run`'s (`Sessions.run`'s in a session)."""
        run_id = run_id or new_run_id()
        await self._index(self.store.begin, run_id, prompt, listed_model)
        try:
            if session is None:
                result = await self.runner.run(prompt, run_id=run_id, **options)
            else:
                result = await self.sessions.run(session, prompt, run_id=run_id, **options)
        except asyncio.CancelledError:
            await asyncio.shield(self._index(self.store.index_record, run_id))
            raise
        await self._index(self.store.add, result)
        return result

    async def execute(
        self,
        code: str,
        *,
        language: str = "python",
        session: Session | None = None,
        timeout: float | None = None,
        files: Sequence[InputFile] = (),
        run_id: str | None = None,
        on_event: EventSink | None = None,
    ) -> RunResult:
        """Run `code` as it is given — no model is asked or started — and answer the same
        `RunResult` a run does, recorded and indexed like one (history, notebook, record),
        its `origin` "code" and its `prompt` empty.

        It is a run of one attempt through the run loop (`Runner.run(code=...)`): a fresh
        sandboxed kernel of `language`, or `session`'s kernel (claimed by the caller with
        `sessions.claim`, as for `run`; a session runs Python only, and a failure's changes to
        its names are undone as a failed prompt's are). No retries, one candidate.
        `timeout` is the seconds the code may run (default AUTOCODER_TIMEOUT); `files` are
        placed in its working directory, read-only; `on_event` gets the run's events
        (`run_started`, `attempt_started`, `code_generated`, `output`, `attempt_finished`,
        `run_finished`) as `/run/stream` sends them. The code's own failures are in the
        result (`status`, `error`, `error_kind`); files.FileRefused for files that break a
        limit, DiskFull when the record cannot be written, SessionGone for a closed session.
        """
        options: dict[str, Any] = {"language": language} if session is None else {}
        if session is not None and language != "python":
            self.sessions.release(session)
            raise SessionError(f"a session's kernel runs Python, not {language}")
        return await self.run(
            "",
            run_id=run_id,
            session=session,
            code=code,
            timeout=timeout,
            inputs=files,
            on_event=on_event,
            **options,
        )

    async def _index(self, method: Callable[..., object], *args: Any) -> None:
        """The index is a cache of the records: failing to update it never fails a run."""
        try:
            await asyncio.to_thread(method, *args)
        except Exception:
            log.exception("could not update the run index %s", self.store.where)

    def keep_lease(self) -> None:
        """Heartbeat a shared store until `close()`, reclaiming dead replicas' kernels."""
        self._lease = asyncio.create_task(keep_lease(self.store, self.pool.reclaim))

    async def close(self) -> None:
        """Stop the lease, close the sessions, then the runner (and the pool), then the store."""
        if self._lease is not None:
            self._lease.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease
        await self.sessions.close()
        await self.runner.close()
        await asyncio.to_thread(self.store.close)


@contextlib.asynccontextmanager
async def open_engine(settings: Settings, *, pool_size: int | None = None) -> AsyncIterator[Engine]:
    """The engine of `settings`, open until the block ends. `pool_size` kernels (the
    setting's AUTOCODER_POOL_SIZE by default; a one-off run wants none) start ahead of time."""
    await asyncio.to_thread(check, settings)
    await asyncio.to_thread(sweep_leftovers, workdirs_root(settings))
    store = open_store(settings)
    await asyncio.to_thread(store.open)
    # Kernels started on a gateway are noted in the store: if this replica dies, another
    # one deletes them there (docs/scale.md).
    pool = KernelPool(settings, pool_size, ledger=store)
    runner = Runner(settings, kernels=pool, ledger=store)
    sessions = Sessions(settings, runner, pool)
    engine = Engine(settings, store, pool, runner, sessions)
    try:
        await sessions.open()
        pool.start()
        engine.keep_lease()
        yield engine
    finally:
        await engine.close()


async def keep_lease(store: Store, reclaim: Reclaim) -> None:
    """Heartbeat a shared store every third of its lease until cancelled (a store without a
    lease returns at once). Kernels that replicas which died left behind go to `reclaim`,
    which deletes them and says which are gone; the rest come back at the next beat. A
    failed beat or reclaim is logged and tried again then (the database or the gateway may
    be back)."""
    lease = store.lease
    if lease is None:
        return
    while True:
        await asyncio.sleep(lease / 3)
        try:
            kernels = await asyncio.to_thread(store.heartbeat)
        except Exception as e:
            log.warning("run store %s: heartbeat failed: %s", store.where, e)
            continue
        if not kernels:
            continue
        try:
            gone = await reclaim(kernels)
            await asyncio.to_thread(store.kernels_ended, gone)
        except Exception as e:
            log.warning("could not reclaim kernels %s: %s", ", ".join(kernels), e)

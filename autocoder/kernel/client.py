"""One kernel's conversation: start, execute under a deadline, interrupt, replace, shut down.

A `Kernel` owns one kernel from a backend (`kernel.backend`): it runs code under a deadline,
interrupts it after a timeout, replaces a hung or dead kernel, and turns every way code can fail
into data. It never knows where the kernel runs; `kernel.pool` chooses the backend. Kernels are
never shared between runs; the pool keeps some started ahead of time so a run does not wait.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import queue
import time
import uuid
import weakref
from pathlib import Path

from autocoder import disk, languages
from autocoder.config import Settings
from autocoder.errors import KernelStartError
from autocoder.kernel.backend import (
    Backend,
    KernelChannels,
    KernelHandle,
    KernelLedger,
    KernelRequest,
)
from autocoder.kernel.leftovers import owner_tag, workdirs_root
from autocoder.kernel.output import (
    OutputCallback,
    OutputCollector,
    kind_of,
    without_unknown_source,
)
from autocoder.records import ErrorInfo, ErrorKind, Execution

log = logging.getLogger(__name__)

INTERRUPT_GRACE = 2.0
# A stream's cut note comes when the kernel's cell has ended (output_cap's post_execute), its
# held tail right after: an interrupt then could land in the middle of sending that tail.
CUT_NOTE_GRACE = 1.0
REPLY_TIMEOUT = 2.0
SETTLE_QUIET = 0.05
SETTLE_MAX = 1.0
POLL_INTERVAL = 0.25

_live: weakref.WeakSet[Kernel] = weakref.WeakSet()


class Kernel:
    """A started kernel that belongs to one run. Use as `async with pool.new_kernel(s) as k`.

    `workdir`: the kernel's working directory (a new one under the work root by default); a
    backend without a local working directory gives its kernels none.
    """

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        *,
        language: str = "python",
        workdir: Path | None = None,
        ledger: KernelLedger | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.language = languages.get(language)
        self.id = f"{owner_tag()}-{uuid.uuid4().hex[:12]}"
        self.workdir: Path | None = None
        if backend.local_workdir:
            self.workdir = (workdir or workdirs_root(settings) / self.id).resolve()
        self.ledger = ledger
        self.km: KernelHandle | None = None
        self.kc: KernelChannels | None = None
        self.restarts = 0
        # Whether this kernel mounted the disk budget on its workdir (a session's own
        # directory has one already, which the session keeps).
        self._confined = False

    async def __aenter__(self) -> Kernel:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def start(self) -> None:
        """Start the kernel and wait until it answers, or raise KernelStartError."""
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._confined = disk.confine_workdir(self.settings, self.workdir) or self._confined
        request = KernelRequest(self.settings, self.language, self.id, self.workdir, self.ledger)
        self.km = self.backend.new(request)
        _live.add(self)
        try:
            self.kc = await self.km.start()
        except BaseException:
            self.km = None
            _live.discard(self)
            self._drop_empty_workdir()
            raise

    async def is_alive(self) -> bool:
        return self.km is not None and await self.km.is_alive()

    async def execute(
        self,
        code: str,
        *,
        timeout: float,
        max_output_bytes: int | None = None,
        on_output: OutputCallback | None = None,
    ) -> Execution:
        """Run `code`; a timeout, a dead kernel or an output flood ends it and becomes data.

        After a timeout the kernel is interrupted; if it is not idle again within a short
        grace (code that swallows KeyboardInterrupt, or blocks in C) it is replaced by a
        fresh one, as it is after it dies.
        """
        if self.kc is None:
            raise KernelStartError("the kernel session is not started")
        collector = OutputCollector(max_output_bytes or self.settings.max_output_bytes, on_output)
        start = time.monotonic()
        msg_id = self.kc.execute(self.language.wrap(code), store_history=False, allow_stdin=False)
        outcome = await self._drain(msg_id, collector, start + timeout)
        if outcome == "cut" and collector.cut_at_source:
            grace = min(start + timeout, time.monotonic() + CUT_NOTE_GRACE)
            settled = await self._drain(msg_id, collector, grace)
            if settled in {"idle", "died"}:
                outcome = settled
        if outcome == "idle" and self.language.late_output:
            await self._settle(msg_id, collector)
        if outcome == "idle" and collector.error is None:
            await self._reply_error(msg_id, collector)
        if outcome in {"timeout", "cut"}:
            collector.stopped = True
            await self.interrupt()
            if await self._drain(msg_id, collector, time.monotonic() + INTERRUPT_GRACE) != "idle":
                await self.replace()
        elif outcome == "died":
            death = self.kernel_log()
            collector.error = ErrorInfo(
                ename="KernelDied",
                evalue=self.exit_status(),
                traceback=[death] if death else [],
            )
            await self.replace()
        kind = kind_of(outcome, collector)
        if kind is ErrorKind.EXCEPTION and disk.full(self.workdir):
            kind = ErrorKind.DISK_LIMIT
        return collector.execution(kind, time.monotonic() - start)

    async def _drain(self, msg_id: str, collector: OutputCollector, deadline: float) -> str:
        """Collect iopub messages of `msg_id` until idle ('idle'), or 'timeout', 'died', 'cut'."""
        kc = self.kc
        assert kc is not None
        interrupted_for_flood = collector.over
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            try:
                msg = await kc.get_iopub_msg(timeout=min(remaining, POLL_INTERVAL))
            except queue.Empty:
                if not await self.is_alive():
                    return "died"
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status":
                if msg["content"].get("execution_state") == "idle":
                    return "idle"
                continue
            collector.add(msg)
            if collector.over and not interrupted_for_flood:
                return "cut"

    async def _settle(self, msg_id: str, collector: OutputCollector) -> None:
        """Collect what a kernel publishes after it said idle (Deno sends the last of its
        console output after idle): until iopub is quiet for SETTLE_QUIET, at most SETTLE_MAX."""
        kc = self.kc
        assert kc is not None
        end = time.monotonic() + SETTLE_MAX
        while (remaining := end - time.monotonic()) > 0:
            try:
                msg = await kc.get_iopub_msg(timeout=min(remaining, SETTLE_QUIET))
            except queue.Empty:
                return
            if msg.get("parent_header", {}).get("msg_id") == msg_id and msg["msg_type"] != "status":
                collector.add(msg)

    async def _reply_error(self, msg_id: str, collector: OutputCollector) -> None:
        """Some kernels only print an error and mark the reply `status: error`: that counts too."""
        kc = self.kc
        assert kc is not None
        deadline = time.monotonic() + REPLY_TIMEOUT
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = await kc.get_shell_msg(timeout=remaining)
            except queue.Empty:
                return
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            content = msg.get("content", {})
            if content.get("status") == "error":
                content = without_unknown_source(content)
                collector.error = ErrorInfo(
                    ename=str(content.get("ename", "") or "Error"),
                    evalue=str(content.get("evalue", "")),
                    traceback=[str(t) for t in content.get("traceback") or []],
                )
            return

    def kernel_log(self, limit: int = 2000) -> str:
        """The end of what the kernel process wrote to stderr (why it died, often)."""
        return self.km.kernel_log(limit) if self.km is not None else ""

    def exit_status(self) -> str:
        """How the kernel ended, in words (a segfault and `os._exit` differ here)."""
        return self.km.exit_status() if self.km is not None else "the kernel process exited"

    async def interrupt(self) -> None:
        """SIGINT to the kernel, as Jupyter's interrupt button sends it; never raises."""
        if self.km is not None:
            await self.km.interrupt()

    async def reset(self) -> None:
        """Give the next attempt a clean namespace without the cost of a new kernel."""
        if self.kc is None:
            return
        code = self.language.reset_code
        if code == "":
            return  # nothing an attempt leaves can reach the next one
        if code is None:
            await self.replace()  # no cheap reset in this kernel: a fresh one
            return
        msg_id = self.kc.execute(code, silent=True, store_history=False)
        collector = OutputCollector(4096)
        outcome = await self._drain(msg_id, collector, time.monotonic() + 5)
        if outcome != "idle" or collector.error is not None:
            await self.replace()

    async def replace(self) -> None:
        """Swap a hung or dead kernel for a fresh one; the working directory stays."""
        self.restarts += 1
        await self._stop_kernel()
        await self.start()

    async def end_processes(self) -> None:
        """SIGKILL to the kernel, then the wait until its processes are gone: from then on
        nothing of it can change its working directory. shutdown() does the rest."""
        if self.km is not None:
            await self.km.end_processes()

    async def shutdown(self) -> None:
        """Stop the kernel; its workdir goes too when nothing was written there (files written
        to its disk budget are copied to the disk, unless the caller took the workdir)."""
        await self._stop_kernel()
        await asyncio.to_thread(self._drop_empty_workdir)

    def release_workdir(self) -> None:
        """The caller takes the workdir as it is, its disk budget included (`disk.keep`): this
        kernel will not touch it again."""
        self._confined = False

    def _drop_empty_workdir(self) -> None:
        if self.workdir is not None:
            if self._confined:
                self._confined = False
                disk.settle(self.workdir)  # a plain directory on the disk from here on
            with contextlib.suppress(OSError):
                self.workdir.rmdir()

    async def _stop_kernel(self) -> None:
        km = self.km
        self.km = self.kc = None
        if km is not None:
            await km.stop()
        _live.discard(self)

    def kill_now(self) -> None:
        """Synchronous last resort at interpreter exit or on a signal."""
        if self.km is not None:
            self.km.kill_now()


@atexit.register
def kill_all_kernels() -> None:
    """No kernel outlives the program, whatever way it ends."""
    for kernel in list(_live):
        kernel.kill_now()

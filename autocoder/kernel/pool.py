"""Where runs get their kernels: the ordered list of backends, the provider that takes the
first one serving a request, and the pool that keeps kernels started ahead of time.

The order says what is preferred: the gateway when one is configured (it serves Python), the
fork server for IPython kernels where it can run, and exec'd kernels, which serve everything.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from autocoder import languages
from autocoder.config import Settings
from autocoder.errors import KernelStartError
from autocoder.kernel.backend import Backend, KernelLedger
from autocoder.kernel.client import Kernel
from autocoder.kernel.fork import ForkBackend
from autocoder.kernel.gateway import GatewayBackend
from autocoder.kernel.local import ExecBackend

log = logging.getLogger(__name__)

BACKENDS: tuple[type[Backend], ...] = (GatewayBackend, ForkBackend, ExecBackend)


def choose(settings: Settings, language: str = "python") -> Backend:
    """The first backend of BACKENDS that serves `language` under `settings`."""
    lang = languages.get(language)
    for backend in BACKENDS:
        chosen = backend()
        if chosen.why_not(lang, settings) is None:
            return chosen
    raise KernelStartError(f"no kernel backend serves {lang.title} here")  # exec serves all


def new_kernel(
    settings: Settings,
    language: str = "python",
    *,
    workdir: Path | None = None,
    ledger: KernelLedger | None = None,
) -> Kernel:
    """A new, unstarted kernel from the backend that serves `language`."""
    return Kernel(
        settings, choose(settings, language), language=language, workdir=workdir, ledger=ledger
    )


def check(settings: Settings) -> None:
    """At start: the backend Python kernels come from can serve (a one-line error if not)."""
    choose(settings).check(settings)


class KernelSource:
    """Hands each run a started kernel that no other run has used. This one starts them on demand."""

    fresh = True  # every kernel is new: a run's candidates can each have their own

    def __init__(
        self, settings: Settings, language: str = "python", *, ledger: KernelLedger | None = None
    ) -> None:
        self.settings = settings
        self.language = language
        self.ledger = ledger
        self._stopping: set[asyncio.Task[None]] = set()

    def new(self) -> Kernel:
        """A new, unstarted kernel from the first backend that serves this language."""
        return new_kernel(self.settings, self.language, ledger=self.ledger)

    async def check(self) -> str | None:
        """Why no kernel can be had right now (for /health), or None."""
        return await choose(self.settings, self.language).probe(self.settings)

    async def reclaim(self, kernel_ids: list[str]) -> list[str]:
        """Delete kernels a replica that died left behind; returns those that are gone."""
        return await choose(self.settings, self.language).reclaim(self.settings, kernel_ids)

    def kernel(self, language: str, workdir: Path) -> Kernel:
        """An unstarted kernel working in `workdir`, which outlives it (a session's): refused by
        a backend whose kernels have no working directory here."""
        backend = choose(self.settings, language)
        if not backend.local_workdir:
            raise KernelStartError(
                f"sessions keep their files in a working directory here, and kernels from the "
                f"{backend.name} backend have none (unset AUTOCODER_GATEWAY_URL for sessions)"
            )
        return Kernel(self.settings, backend, language=language, workdir=workdir)

    async def acquire(self) -> Kernel:
        kernel = self.new()
        await kernel.start()
        return kernel

    async def release(self, kernel: Kernel) -> None:
        """The kernel's processes end before this returns, and its workdir (its disk budget
        included) is the caller's from then on, so the run can keep what its code wrote; the
        rest of the teardown (channels, connection files, cgroups: ~8 ms, a gateway's DELETE:
        ~0.3 s) goes on while the run answers, and close() waits for it."""
        if kernel.workdir is not None:
            await kernel.end_processes()
            kernel.release_workdir()
        task = asyncio.get_running_loop().create_task(kernel.shutdown())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        await asyncio.gather(*self._stopping, return_exceptions=True)


class KernelPool(KernelSource):
    """Keeps `size` kernels started ahead of time and refills in the background.

    Kernels are never reused: a released kernel is shut down and a new one takes its place.
    """

    def __init__(
        self, settings: Settings, size: int | None = None, *, ledger: KernelLedger | None = None
    ) -> None:
        super().__init__(settings, ledger=ledger)
        self.size = settings.pool_size if size is None else size
        self._ready: asyncio.Queue[Kernel] = asyncio.Queue()
        self._starting: set[asyncio.Task[None]] = set()
        self._closed = False
        self.last_error: str | None = None

    def start(self) -> None:
        for _ in range(self.size):
            self._refill()

    @property
    def ready(self) -> int:
        return self._ready.qsize()

    def _refill(self) -> None:
        if self._closed or self.ready + len(self._starting) >= self.size:
            return
        task = asyncio.get_running_loop().create_task(self._start_one())
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start_one(self) -> None:
        kernel = self.new()
        try:
            await kernel.start()
        except Exception as e:
            self.last_error = str(e)
            log.warning("pool: %s", e)
            return
        if self._closed:
            await kernel.shutdown()
        else:
            self.last_error = None
            self._ready.put_nowait(kernel)

    async def acquire(self) -> Kernel:
        while not self._ready.empty():
            kernel = self._ready.get_nowait()
            self._refill()
            if await kernel.is_alive():
                return kernel
            await kernel.shutdown()
        self._refill()
        return await super().acquire()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._starting):
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        while not self._ready.empty():
            await self._ready.get_nowait().shutdown()
        await super().close()

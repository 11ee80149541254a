"""Admission: a bounded number of runs at once, a bounded queue, and a deadline for waiting."""

from __future__ import annotations

import asyncio
import math
import time


class Busy(Exception):
    """No run slot now and no room to wait (429), or none came within the queue timeout (503)."""

    def __init__(self, message: str, *, status_code: int, retry_after: int) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after


class Slot:
    """The right to run; released exactly once, whoever ends the run."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._start = time.monotonic()
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._finished(time.monotonic() - self._start)


class Admission:
    """At most `limit` runs at once; `max_queued` more may wait, each up to `wait` seconds."""

    def __init__(self, limit: int, max_queued: int, wait: float) -> None:
        self.limit = limit
        self.max_queued = max_queued
        self.wait = wait
        self.running = 0
        self.queued = 0
        self._sem = asyncio.Semaphore(limit)
        self._mean_run = 2.0
        self._closed = asyncio.Event()

    def close(self) -> None:
        """The server is shutting down: waiters and newcomers get 503 at once."""
        self._closed.set()

    def retry_after(self) -> int:
        """A guess at when a slot frees up: mean run time × (queue length + 1) / slots."""
        return max(1, min(300, math.ceil(self._mean_run * (self.queued + 1) / self.limit)))

    async def acquire(self) -> Slot:
        if self._closed.is_set():
            raise _shutting_down()
        if self._sem.locked() and self.queued >= self.max_queued:
            raise Busy(
                f"the server is full: {self.running} running and {self.queued} waiting "
                "(AUTOCODER_MAX_CONCURRENT_RUNS, AUTOCODER_MAX_QUEUED_RUNS); retry later",
                status_code=429,
                retry_after=self.retry_after(),
            )
        self.queued += 1
        waiter = asyncio.ensure_future(self._sem.acquire())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait(
                {waiter, closed}, timeout=self.wait, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            if not waiter.cancel():  # it already holds the semaphore
                self._sem.release()
            raise
        finally:
            closed.cancel()
            self.queued -= 1
        if self._closed.is_set():
            if not waiter.cancel():
                self._sem.release()
            raise _shutting_down()
        if not waiter.done():
            waiter.cancel()
            raise Busy(
                f"no run slot came free within {self.wait:g} s (AUTOCODER_QUEUE_TIMEOUT); retry later",
                status_code=503,
                retry_after=self.retry_after(),
            )
        self.running += 1
        return Slot(self)

    def _finished(self, seconds: float) -> None:
        self.running -= 1
        self._mean_run = 0.8 * self._mean_run + 0.2 * seconds
        self._sem.release()


def _shutting_down() -> Busy:
    return Busy("the server is shutting down; retry later", status_code=503, retry_after=5)

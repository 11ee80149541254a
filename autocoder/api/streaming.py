"""Waiting on behalf of a client that may leave, and server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from autocoder.api.errors import ClientGone, RunCancelled, fault_message
from autocoder.errors import AutocoderError
from autocoder.records import Event, RunResult

log = logging.getLogger(__name__)

T = TypeVar("T")
KEEPALIVE_SECONDS = 15.0


async def _disconnected(request: Request) -> None:
    """Return when the client has gone. The body is read by now, so only a disconnect can come."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, aw: Awaitable[T]) -> T:
    """Await `aw`, but cancel it and raise ClientGone as soon as the client hangs up."""
    work = asyncio.ensure_future(aw)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # shutdown gave up waiting on this request
        work.cancel()
        raise
    finally:
        gone.cancel()
    if not work.done():
        cancel_once(work)  # type: ignore[arg-type]
        raise ClientGone
    if work.cancelled():
        raise RunCancelled
    return work.result()


def cancel_once(task: asyncio.Task[Any]) -> None:
    """Cancel a run once. A second cancel would land in the run's own cleanup (recording it,
    releasing its kernel), so it would end unrecorded, free its slot early and escape drain()."""
    if not task.done() and not task.cancelling():
        task.cancel()


async def cancel_when_gone(request: Request, task: asyncio.Task[Any]) -> None:
    await _disconnected(request)
    cancel_once(task)


def _sse(name: str, data: str, seq: int) -> str:
    return f"id: {seq}\nevent: {name}\ndata: {data}\n\n"


async def event_stream(
    task: asyncio.Task[RunResult], events: asyncio.Queue[Event | None], watcher: asyncio.Task[None]
) -> AsyncIterator[str]:
    seq = 0
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                yield ": keepalive\n\n"
                continue
            if event is None:
                break
            seq += 1
            yield _sse(event.type, event.model_dump_json(), seq)
        if not task.cancelled() and (exc := task.exception()) is not None:
            if not isinstance(exc, AutocoderError):
                log.error("run failed", exc_info=exc)
            yield _sse("server_error", json.dumps({"detail": fault_message(exc)}), seq + 1)
    finally:
        watcher.cancel()
        cancel_once(task)  # the client stopped reading; a finished task ignores this


SSE_MEDIA_TYPE = "text/event-stream"


def sse_response(
    request: Request, task: asyncio.Task[RunResult], events: asyncio.Queue[Event | None]
) -> StreamingResponse:
    """A run's events as server-sent events; the client leaving cancels the run."""
    task.add_done_callback(lambda _: events.put_nowait(None))
    watcher = asyncio.create_task(cancel_when_gone(request, task))
    watcher.add_done_callback(_retrieve)
    return StreamingResponse(
        event_stream(task, events, watcher),
        media_type=SSE_MEDIA_TYPE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()

"""Read deadlines for requests: a client that trickles its headers or body cannot hold a
connection (and a file descriptor) forever. uvicorn itself only times out idle keep-alive
connections, so this is its HTTP/1.1 protocol with two more timers (and Nagle off)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11Protocol(H11Protocol):
    """Headers must arrive within `header_timeout` seconds of the request's first byte (or of
    the connection, for a client that sends nothing); the body within `body_timeout` seconds
    after them. Past either, the connection is closed, and a handler still waiting on the body
    sees a disconnect."""

    header_timeout = 10.0
    body_timeout = 60.0
    _read_timer: asyncio.TimerHandle | None = None
    _reading: object = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # asyncio turns Nagle off only for sockets made with proto=IPPROTO_TCP, which those
        # accepted from a socket.socket() listener (ours, `sockets=` for uvicorn) are not: then
        # a keep-alive response's headers and body wait out the client's delayed ACK, ~40 ms.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self._arm(h11.IDLE, self.header_timeout)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.IDLE:
            self._arm(h11.IDLE, self.header_timeout)
        elif state is h11.SEND_BODY:
            self._arm(h11.SEND_BODY, self.body_timeout)
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, phase: object, seconds: float) -> None:
        if self._reading is phase and self._read_timer is not None:
            return  # the deadline runs from the phase's start, not from the latest byte
        self._disarm()
        self._reading = phase
        self._read_timer = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer = None
        self._reading = None

    def _too_slow(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol_for(header_timeout: float, body_timeout: float) -> type[TimedH11Protocol]:
    return type(
        "TimedH11Protocol",
        (TimedH11Protocol,),
        {"header_timeout": header_timeout, "body_timeout": body_timeout},
    )

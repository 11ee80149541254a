"""Output cut to the limit inside autocoder's kernels, before it is sent to the server.

Capping only what the server keeps still makes the server receive and decode every byte: one
`print('x' * 10**8)` costs it hundreds of MB. In the kernel, per execution, each of stdout
and stderr sends at most the limit: its first half as written and its last half when the code
ends, with one line between saying how much was cut; displays and results are sent while they
fit in the limit, and a small text in place of each one past it. The message that says how
much was cut carries the count under CUT_KEY, so the server knows the output was over the
limit (and stops the code, as it does for a flood it sees itself) without receiving it.

A KeyboardInterrupt is held while the kernel's main thread sends a message (SendGuard), and
raised once it is sent: ipykernel lets SIGINT raise anywhere in an execute request, the sending
of its reply included, and one raised between two frames of the reply leaves it torn on the
shell socket. The next message is glued onto it, and the server reads an invalid signature
where the reply should be.

If a message cannot be sent at all (the kernel ran out of memory serialising it), a small one
under LOST_KEY says so: an attempt whose output was lost must never look like a success.

Like asserts.py, this module imports only the standard library, and the server sends it whole
to the kernel at start-up (`sandbox.kernel_exec_lines()`), since the sandboxed kernel cannot
import the package. Writes that bypass sys.stdout and sys.stderr (another process's own iopub messages)
are left to the server's cap, which stays as the backstop.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

LIMIT_VAR = "AUTOCODER_MAX_OUTPUT_BYTES"
CUT_KEY = "autocoder_cut"
LOST_KEY = "autocoder_lost"
DISPLAY_TYPES = frozenset({"display_data", "execute_result", "update_display_data"})
MIN_TRACEBACK_LINE = 1000


def clip(text: str, limit: int) -> str:
    """Head and tail of `text` within about `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n... [{len(text) - 2 * half:,} characters cut] ...\n{text[-half:]}"


def clip_error(content: dict[str, Any], limit: int) -> dict[str, Any]:
    """An error's value and traceback, bounded: an exception can carry 100 MB in its message."""
    lines = [str(line) for line in content.get("traceback") or []]
    evalue = str(content.get("evalue", ""))
    if len(evalue) + sum(map(len, lines)) <= limit:
        return content
    each = max(limit // 4, MIN_TRACEBACK_LINE)
    lines = [clip(line, each) for line in lines]
    if sum(map(len, lines)) > limit and len(lines) > 2:
        lines = [lines[0], f"... [{len(lines) - 2} traceback entries cut] ...", lines[-1]]
    return {**content, "evalue": clip(evalue, each), "traceback": lines}


class StreamCap:
    """One stream's budget for the current execution: head passed on, tail held, rest counted.

    Counts characters; the server counts bytes, so non-ASCII output may be cut again there.
    """

    def __init__(self, stream: Any, limit: int) -> None:
        self.stream = stream
        self.head = limit // 2
        self.tail_room = limit - self.head
        self.lock = threading.Lock()
        self.below: Callable[[str], Any] = stream.write
        self.unreported_lost = 0
        self.lost_reason = ""
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.sent = 0
            # The tail as the pieces written, so that many small writes cost no re-joining.
            self.tail: deque[str] = deque()
            self.tail_len = 0
            self.cut = 0
            self.reported = 0

    def start(self) -> None:
        """A new execution: a fresh budget, and this cap on top of whatever write is now
        (IPython wraps write for each cell to keep its output; it must only see what is sent)."""
        self.reset()
        if self.stream.write != self.write:
            self.below = self.stream.write
            self.stream.write = self.write

    def write(self, text: str) -> int:
        if not isinstance(text, str) or not text:
            return self.below(text)  # type: ignore[no-any-return]
        size = len(text)
        with self.lock:
            room = self.head - self.sent
            if size <= room:
                self.sent += size
                passed = text
                first_cut = False
            else:
                passed = text[: max(room, 0)]
                self.sent += len(passed)
                # Slice before joining: one write can be hundreds of MB.
                keep = text[max(len(passed), size - self.tail_room) :]
                dropped = size - len(passed) - len(keep)
                if keep:
                    dropped += self._hold(keep)
                first_cut = self.cut == 0 and dropped > 0
                self.cut += dropped
        if passed:
            self.below(passed)
        if first_cut:
            # Tell the server now, so that it can stop code that prints without end.
            self.send_note("", CUT_KEY)
        return size

    def _hold(self, text: str) -> int:
        """Add `text` to the tail; returns how many characters fell out of its front."""
        self.tail.append(text)
        self.tail_len += len(text)
        dropped = 0
        while self.tail_len - len(self.tail[0]) >= self.tail_room:
            gone = self.tail.popleft()
            self.tail_len -= len(gone)
            dropped += len(gone)
        excess = self.tail_len - self.tail_room
        if excess > 0:
            self.tail[0] = self.tail[0][excess:]
            self.tail_len -= excess
            dropped += excess
        return dropped

    def finish(self) -> None:
        """The execution ended: send the line saying how much was cut, then the held tail."""
        with self.lock:
            tail, cut = "".join(self.tail), self.cut
        if cut:
            name = self.stream.name
            self.send_note(f"\n... [{cut:,} characters of {name} cut in the kernel] ...\n", CUT_KEY)
        if tail:
            self.below(tail)
        self.reset()
        if self.unreported_lost:
            self.report_lost()

    def send_note(self, text: str, key: str, count: int | None = None, flush: bool = True) -> None:
        """A stream message of its own, after what was written before it, carrying a count.

        No flush from the IO thread's own failed flush: it would fail the same way."""
        stream = self.stream
        if count is None:
            with self.lock:
                count, self.reported = self.cut - self.reported, self.cut
        if flush:
            stream.flush()
        content = {"name": stream.name, "text": text, key: count}
        msg = stream.session.msg("stream", content, parent=stream.parent_header)
        stream.session.send(stream.pub_thread, msg, ident=stream.topic)

    def guard_flush(self) -> None:
        """Make a failed send of buffered output (MemoryError in the IO thread, which ipykernel
        only logs) known to the server instead of silently losing the output."""
        original = getattr(self.stream, "_flush", None)
        if original is None:
            return

        def flush() -> None:
            pending = self.pending()
            try:
                original()
            except Exception as e:
                self.unreported_lost += max(pending, 1)
                self.lost_reason = type(e).__name__
                self.report_lost(flush=False)

        self.stream._flush = flush

    def pending(self) -> int:
        try:
            return sum(b.tell() for b in list(self.stream._buffers.values()))
        except Exception:
            return 0

    def report_lost(self, flush: bool = True) -> None:
        count, self.unreported_lost = self.unreported_lost, 0
        text = (
            f"\n[{count:,} characters of {self.stream.name} lost in the kernel "
            f"({self.lost_reason or 'not sent'})]\n"
        )
        try:
            self.send_note(text, LOST_KEY, count, flush)
        except Exception:
            self.unreported_lost += count  # tried again when the execution ends


class DisplayCap:
    """Displays and results of one execution, sent while their data fit in the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.lock = threading.Lock()

    def content(self, kind: str, content: Any) -> Any:
        if not isinstance(content, dict):
            return content
        if kind == "error" or (kind == "execute_reply" and content.get("status") == "error"):
            return clip_error(content, self.limit)
        if kind not in DISPLAY_TYPES:
            return content
        data = content.get("data") or {}
        size = sum(len(v) if isinstance(v, str) else len(str(v)) for v in data.values())
        with self.lock:
            if self.used + size <= self.limit:
                self.used += size
                return content
        what = "a result" if kind == "execute_result" else "a display"
        note = (
            f"[{what} of {size:,} bytes ({', '.join(sorted(data))}) cut in the kernel: "
            f"over the {self.limit:,}-byte output limit]"
        )
        return {**content, "data": {"text/plain": note}, "metadata": {}, CUT_KEY: size}

    def wrap(self, session: Any) -> None:
        original = session.send

        def send(stream: Any, msg_or_type: Any, content: Any = None, *a: Any, **kw: Any) -> Any:
            if isinstance(msg_or_type, dict):
                kind = msg_or_type.get("msg_type") or msg_or_type.get("header", {}).get("msg_type")
                body = msg_or_type.get("content")
                capped = self.content(str(kind), body)
                if capped is not body:
                    msg_or_type = {**msg_or_type, "content": capped}
            else:
                content = self.content(str(msg_or_type), content)
            return original(stream, msg_or_type, content, *a, **kw)

        session.send = send


class SendGuard:
    """Interrupts that arrive while the main thread sends a message, raised once it is sent."""

    def __init__(self) -> None:
        self.sending = 0
        self.held = False
        self.main = threading.main_thread()

    def on_sigint(self, signum: int, frame: Any) -> None:
        if self.sending:
            self.held = True
            return
        raise KeyboardInterrupt

    def hook(self, kernel: Any) -> None:
        """Our handler where ipykernel puts default_int_handler for each request it handles."""
        original = kernel.pre_handler_hook

        def pre_handler_hook() -> None:
            original()
            signal.signal(signal.SIGINT, self.on_sigint)

        kernel.pre_handler_hook = pre_handler_hook

    def wrap(self, session: Any) -> None:
        original = session.send

        def send(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not self.main:
                return original(*args, **kwargs)  # signals are handled by the main thread only
            self.sending += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.sending -= 1
                if not self.sending and self.held:
                    self.held = False
                    raise KeyboardInterrupt  # noqa: B012 (the interrupt, now that it is sent)

        session.send = send


def install(shell: Any, limit: int) -> None:
    """Cap sys.stdout, sys.stderr and every iopub session of a started ipykernel shell, and
    guard the messages the kernel sends against a torn send."""
    streams = [StreamCap(s, limit) for s in (sys.stdout, sys.stderr) if hasattr(s, "session")]
    displays = DisplayCap(limit)
    sessions = {id(o.session): o.session for o in (shell.display_pub, shell.displayhook)}
    kernel = getattr(shell, "kernel", None)
    if kernel is not None:
        sessions[id(kernel.session)] = kernel.session
    guard = SendGuard()
    if kernel is not None:
        guard.hook(kernel)
    for session in sessions.values():
        displays.wrap(session)
        guard.wrap(session)
    for cap in streams:
        cap.guard_flush()

    def pre_execute() -> None:
        displays.used = 0
        for cap in streams:
            cap.start()

    def post_execute() -> None:
        for cap in streams:
            cap.finish()

    shell.events.register("pre_execute", pre_execute)
    shell.events.register("post_execute", post_execute)


def install_source(limit: int | None = None) -> tuple[str, str, str, str] | None:
    """(module name, file name, source, the call that installs it) for a fresh kernel, with the
    limit from AUTOCODER_MAX_OUTPUT_BYTES (set by sandbox.kernel_env); None without one."""
    if limit is None:
        value = os.environ.get(LIMIT_VAR, "")
        limit = int(value) if value.isdigit() else 0
    if limit <= 0:
        return None
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    return (
        "autocoder_output_cap",
        "<autocoder output cap>",
        source,
        f"install(get_ipython(), {limit})",
    )

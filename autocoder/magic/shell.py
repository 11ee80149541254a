"""The in-kernel executor of the `%autocoder` magic: generated code runs on the kernel's main
thread (as a cell would), under a watchdog that interrupts it at its deadline, with what it
shows teed into the cell and recorded. magics.py (the door) drives it from the runner's thread;
its module docstring says how the threads and timeouts work.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from autocoder.config import Settings
from autocoder.kernel.output import OutputCallback, OutputCollector
from autocoder.records import ErrorInfo, ErrorKind, Execution

T = TypeVar("T")

POLL = 0.2
"""Seconds between the main thread's checks that the background loop is still alive."""
REPEAT_INTERRUPT = 1.0
"""After the deadline, SIGINT is sent again this often until the code ends."""
LATE_SIGNAL = 0.5
"""A SIGINT this soon after our own deadline interrupt is ours arriving late: it is dropped."""


class MainThread:
    """Work the background loop needs done on the kernel's main thread, done in order by `serve`."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the main thread and return what it returns (from the loop thread)."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def job() -> None:
            if not done.set_running_or_notify_cancel():
                return
            try:
                done.set_result(fn())
            except KeyboardInterrupt:
                # The user interrupted: the run is being cancelled; the loop must not see a
                # KeyboardInterrupt (asyncio would re-raise it out of the loop).
                done.set_exception(asyncio.CancelledError())
                raise
            except BaseException as e:
                done.set_exception(e)

        self._jobs.put(job)
        return await asyncio.wrap_future(done)

    def close(self) -> None:
        """No more jobs: `serve` returns once it has done those already queued."""
        self._jobs.put(None)

    def serve(self, loop_thread: threading.Thread, deadline: float | None = None) -> bool:
        """Do jobs until `close()`; False if `deadline` (monotonic) passed first.

        Without a deadline this waits as long as the run takes, which its own deadlines bound
        (each model request, each attempt); a dead loop thread ends the wait at once.
        """
        while deadline is None or time.monotonic() < deadline:
            try:
                job = self._jobs.get(timeout=POLL)
            except queue.Empty:
                if not loop_thread.is_alive():
                    raise RuntimeError(
                        "autocoder's background event loop stopped unexpectedly"
                    ) from None
                continue
            if job is None:
                return True
            job()
        return False


class Interrupts:
    """SIGINT handling for one `%autocoder` call, on the main thread.

    Any SIGINT raises KeyboardInterrupt, as usual in a kernel, except our own deadline signal
    when it arrives just after the code it was meant for had ended. `arm` and `disarm`
    bracket the generated code; `tripped` says why it was interrupted, if it was.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._main = threading.get_ident()
        self._armed = False
        self._last_sent = -1e9
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.tripped: str | None = None

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum: int, frame: object) -> None:
        # No lock here: the handler runs on the main thread between any two bytecodes,
        # possibly while that thread holds the lock.
        late = not self._armed and time.monotonic() - self._last_sent < LATE_SIGNAL
        if not late:
            raise KeyboardInterrupt

    def trip(self, reason: str) -> None:
        """Interrupt the running code now (any thread); a no-op once it has ended."""
        with self._lock:
            if not self._armed:
                return
            self.tripped = self.tripped or reason
            self._last_sent = time.monotonic()
        # Sent after the lock is released (the handler may run at once, on this very thread);
        # if the code ends meanwhile, the handler drops the signal as late.
        _interrupt_main(self._main)

    def arm(self, seconds: float) -> None:
        """The code starts: interrupt it after `seconds`, and again every so often until it ends."""
        stop = self._stop = threading.Event()

        def watch() -> None:
            wait = seconds
            while not stop.wait(max(0.0, wait)):
                self.trip("timeout")
                wait = REPEAT_INTERRUPT

        self.tripped, self._armed = None, True
        self._watchdog = threading.Thread(target=watch, name="autocoder-deadline", daemon=True)
        self._watchdog.start()

    def disarm(self) -> None:
        """The code has ended. Idempotent: call it again if a late interrupt cut it short."""
        self._armed = False  # first: from here on our own signals are dropped as late
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=2)
            self._watchdog = None


def _interrupt_main(thread_id: int) -> None:
    if hasattr(signal, "pthread_kill"):
        # A real signal also breaks blocking calls such as time.sleep.
        signal.pthread_kill(thread_id, signal.SIGINT)
    else:  # pragma: no cover - Windows
        import _thread

        _thread.interrupt_main()


# --- Running code in the user's shell ---------------------------------------------------------


def _message(msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
    """The parts of an iopub message that `OutputCollector` reads."""
    return {"header": {"msg_type": msg_type}, "msg_type": msg_type, "content": content}


def _jsonable(bundle: dict[str, Any] | None) -> dict[str, Any]:
    return {
        k: base64.b64encode(v).decode("ascii") if isinstance(v, bytes) else v
        for k, v in (bundle or {}).items()
    }


class _Tee:
    """A stream that records what is written and passes it on (until the output limit)."""

    def __init__(self, stream: Any, name: str, capture: Capture) -> None:
        self._stream = stream
        self._name = name
        self._capture = capture

    def write(self, text: str) -> int:
        if self._capture.record("stream", {"name": self._name, "text": text}):
            self._stream.write(text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class Capture:
    """A tee over what code shows: it reaches the cell as usual and is recorded (unlike %%capture).

    Streams are teed at sys.stdout/sys.stderr, rich output at the shell's display publisher and
    displayhook, as IPython's own `capture_output` does. Tracebacks are recorded and not
    shown. Output written straight to file descriptors (subprocesses, C libraries) still
    reaches the cell but is not recorded. Once the output limit is passed, nothing more is
    passed on and `on_over` is called once.
    """

    def __init__(self, shell: Any, collector: OutputCollector, on_over: Callable[[], None]) -> None:
        self.shell = shell
        self.collector = collector
        self.on_over = on_over
        self._lock = threading.Lock()
        self._patched: list[tuple[object, str, object]] = []
        self._streams: tuple[Any, Any] = (None, None)

    def record(self, msg_type: str, content: dict[str, Any]) -> bool:
        """Keep one output (within the collector's bounds); False once past the limit, when
        the caller stops passing output on."""
        with self._lock:
            was_over = self.collector.over
            self.collector.add(_message(msg_type, content))
            over = self.collector.over
        if over and not was_over:
            self.on_over()
        return not over

    def __enter__(self) -> Capture:
        shell = self.shell
        pub, hook = shell.display_pub, shell.displayhook
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, "stdout", self)  # type: ignore[assignment]
        sys.stderr = _Tee(sys.stderr, "stderr", self)  # type: ignore[assignment]
        publish, clear_output = pub.publish, pub.clear_output

        def publish_tee(
            data: dict[str, Any], metadata: dict[str, Any] | None = None, *args: Any, **kwargs: Any
        ) -> None:
            kind = "update_display_data" if kwargs.get("update") else "display_data"
            content = {
                "data": _jsonable(data),
                "metadata": _jsonable(metadata),
                "transient": kwargs.get("transient") or {},
            }
            if self.record(kind, content):
                publish(data, metadata, *args, **kwargs)

        def clear_tee(*args: Any, **kwargs: Any) -> None:
            with self._lock:
                self.collector.add(_message("clear_output", {"wait": False}))
            clear_output(*args, **kwargs)

        def result_tee(format_dict: dict[str, Any], md_dict: dict[str, Any] | None = None) -> None:
            content = {
                "data": _jsonable(format_dict),
                "metadata": _jsonable(md_dict),
                "execution_count": getattr(hook, "prompt_count", None),
            }
            if self.record("execute_result", content):
                # Shown as a display, not as the cell's result: the `%autocoder` cell's one
                # `Out[n]` is the magic's own value, never two results under one number.
                publish(format_dict, md_dict)

        def record_traceback(etype: type, evalue: BaseException, stb: list[str]) -> None:
            self.record("error", {"ename": etype.__name__, "evalue": str(evalue), "traceback": stb})

        self._patch(pub, "publish", publish_tee)
        self._patch(pub, "clear_output", clear_tee)
        self._patch(hook, "write_format_data", result_tee)
        self._patch(shell, "_showtraceback", record_traceback)
        return self

    def _patch(self, obj: object, name: str, value: object) -> None:
        self._patched.append((obj, name, vars(obj).get(name, _MISSING)))
        setattr(obj, name, value)

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = self._streams
        for obj, name, old in reversed(self._patched):
            if old is _MISSING:
                vars(obj).pop(name, None)
            else:
                setattr(obj, name, old)
        self._patched.clear()
        # What was written is recorded already; flushing keeps its order with what follows.
        for stream in self._streams:
            if stream is not None:
                stream.flush()


_MISSING = object()


class ShellExecutor:
    """Runs attempts' code in the user's shell, on the main thread (see the module docstring).

    It lives only as long as one `%autocoder` call.
    """

    workdir: Path | None = None

    def __init__(
        self, shell: Any, main: MainThread, interrupts: Interrupts, settings: Settings
    ) -> None:
        self.shell = shell
        self.main = main
        self.interrupts = interrupts
        self.settings = settings
        self.last_value: Any = None

    async def execute(
        self,
        code: str,
        *,
        timeout: float,
        max_output_bytes: int | None = None,
        on_output: OutputCallback | None = None,
    ) -> Execution:
        loop = asyncio.get_running_loop()
        forward: OutputCallback | None = None
        if on_output is not None:
            callback = on_output

            def forward(out: dict[str, Any]) -> None:
                loop.call_soon_threadsafe(callback, out)

        limit = max_output_bytes or self.settings.max_output_bytes
        return await self.main.call(lambda: self.run_here(code, timeout, limit, forward))

    async def reset(self) -> None:
        """Nothing: the user's namespace is theirs, and earlier attempts' effects stay in it."""

    def run_here(
        self, code: str, timeout: float, limit: int, on_output: OutputCallback | None
    ) -> Execution:
        """Run `code` as a cell of the user's shell; called on the main thread."""
        shell = self.shell
        collector = OutputCollector(limit, on_output)
        capture = Capture(shell, collector, on_over=lambda: self.interrupts.trip("output"))
        saved_result = shell.displayhook.exec_result
        interrupts = self.interrupts
        error: BaseException | None = None
        start = time.monotonic()
        try:
            with capture:
                interrupts.arm(timeout)
                try:
                    try:
                        outcome = shell.run_cell(code, store_history=False, silent=False)
                    finally:
                        interrupts.disarm()
                    error = outcome.error_before_exec or outcome.error_in_exec
                    self.last_value = outcome.result
                except KeyboardInterrupt as e:
                    # It landed in IPython's bookkeeping around the code, not in the code.
                    interrupts.disarm()
                    error = e
        finally:
            shell.displayhook.exec_result = saved_result
        tripped = interrupts.tripped
        if isinstance(error, KeyboardInterrupt) and tripped is None:
            raise KeyboardInterrupt  # the user's, not ours: stop the whole run
        kind: ErrorKind | None = None
        if tripped == "output" or collector.over:
            kind = ErrorKind.OUTPUT_LIMIT
        elif tripped == "timeout":
            kind = ErrorKind.TIMEOUT
        elif error is not None or collector.error is not None:
            kind = ErrorKind.EXCEPTION
        if error is not None and collector.error is None:
            collector.error = ErrorInfo(
                ename=type(error).__name__,
                evalue=str(error),
                traceback=[f"{type(error).__name__}: {error}"],
            )
        if kind is not None:
            self.last_value = None
        return collector.execution(kind, time.monotonic() - start)


class OneShell:
    """The executor provider of one `%autocoder` call: always the same shell, never shut down."""

    fresh = False  # the user's namespace: one candidate per attempt

    def __init__(self, executor: ShellExecutor) -> None:
        self.executor = executor

    async def acquire(self) -> ShellExecutor:
        return self.executor

    async def release(self, executor: ShellExecutor) -> None:
        return None

    async def close(self) -> None:
        return None


# --- What the user sees -----------------------------------------------------------------------

"""One kernel session: start, execute under a deadline, interrupt, replace, shut down.

A session owns one Jupyter kernel (jupyter-client + ipykernel over IPC) started from the
kernelspecs in `kernels/`, with its own runtime directory (connection file, sockets) and
working directory. Sessions are never shared between runs; `KernelPool` keeps some started
ahead of time so a run does not wait for one.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import queue
import re
import signal
import stat
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import zmq.asyncio
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager, _get_future
from nbformat.v4 import output_from_msg

from autocoder import disk, forkserver, languages, output_cap, sandbox
from autocoder.config import Settings
from autocoder.errors import KernelStartError
from autocoder.files import open_beneath
from autocoder.records import ErrorInfo, ErrorKind, Execution

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 60.0
INTERRUPT_GRACE = 2.0
# A stream's cut note comes when the kernel's cell has ended (output_cap's post_execute), its
# held tail right after: an interrupt then could land in the middle of sending that tail.
CUT_NOTE_GRACE = 1.0
REPLY_TIMEOUT = 2.0
SETTLE_QUIET = 0.05
SETTLE_MAX = 1.0
POLL_INTERVAL = 0.25
# The client (and the manager's control socket) connect before the kernel has bound its
# sockets; zmq retries an IPC connect after this many ms (100 by default, plus as much again
# at random): up to 200 ms of a start.
RECONNECT_MS = 5
CONTEXT_LINGER_MS = 100  # what jupyter_client's destroy(linger=100) gave a closed socket
# What an attempt may leave behind, cleared: the names it bound and the results IPython keeps
# of it. IPython's own reset() does that too, but also a full gc.collect() and a rebuild of its
# aliases: ~35 ms, several trivial executes. user_ns_hidden holds the namespace the kernel
# started with (IPython's hide_initial_ns) plus the result and input caches (`_`, `_1`, `_i1`)
# IPython hides there as it goes; those are dropped and the rest put back. The code runs in a
# namespace of its own so that it binds nothing in the one it clears.
_RESET = """\
hook = ip.displayhook
hook._ = hook.__ = hook.___ = ""
ip.history_manager.output_hist.clear()
ip.last_execution_result = None
hidden = ip.user_ns_hidden
for name in [n for n in hidden if re.fullmatch(r"_i?[0-9]+", n)]:
    del hidden[name]
for name in ("_", "__", "___", "_i", "_ii", "_iii"):
    if name in hidden:
        hidden[name] = ""
ip.user_ns.clear()
ip.user_ns.update(hidden)
"""
RESET_CODE = (
    f"exec({_RESET!r}, {{'ip': __import__('IPython').get_ipython(), 're': __import__('re')}})"
)
RUNTIME_PREFIX = "ac-"
LEFTOVER_GRACE = 5.0

OutputCallback = Callable[[dict[str, Any]], None]

_live: weakref.WeakSet[KernelSession] = weakref.WeakSet()


def kernels_dir() -> Path:
    """The kernelspecs we ship: inside the package when installed, at the repo root in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels", here.parent / "kernels"):
        if (candidate / "autocoder-sandbox" / "kernel.json").is_file():
            return candidate
    raise KernelStartError(f"autocoder's kernelspecs are missing (looked in {here / 'kernels'})")


def install_kernelspecs(*, user: bool = False, prefix: str | None = None) -> list[str]:
    """Install the shipped kernelspecs where Jupyter finds them; returns where they went."""
    ksm = KernelSpecManager()
    root = kernels_dir()
    return [
        ksm.install_kernel_spec(str(spec), spec.name, user=user, prefix=prefix)
        for spec in sorted(root.iterdir())
        if (spec / "kernel.json").is_file()
    ]


def install_notebook_kernelspecs(
    settings: Settings, *, user: bool = False, prefix: str | None = None
) -> list[tuple[str, str | None, str]]:
    """Install the kernelspecs the run notebooks name (`bash`, `deno`, `ir`) where Jupyter
    finds them, for a JupyterLab outside this environment: (name, where it went or None, why
    not). `python3` is left to each Jupyter, whose own it is (installing ours would replace it
    in every notebook of that Jupyter)."""
    ksm = KernelSpecManager()
    done: list[tuple[str, str | None, str]] = []
    for lang in languages.LANGUAGES:
        name = lang.kernelspec["name"]
        if any(name == d[0] for d in done):
            continue
        if lang is languages.PYTHON:
            done.append((name, None, "each Jupyter has its own Python 3 kernel"))
            continue
        spec = languages.notebook_kernelspec(lang, settings)
        if spec is None:
            done.append((name, None, lang.missing(settings) or "not installed here"))
            continue
        with tempfile.TemporaryDirectory() as staged:
            os.chmod(staged, 0o755)  # copied with its mode: readable by any user's Jupyter
            Path(staged, "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
            done.append((name, ksm.install_kernel_spec(staged, name, user=user, prefix=prefix), ""))
    return done


def workdirs_root(settings: Settings) -> Path:
    """Where kernels' working directories are made, one per session."""
    return settings.autofile_dir / ".work"


def kernel_name(settings: Settings, language: str = "python") -> str:
    """The shipped kernelspec that runs `language` under the configured sandbox."""
    return languages.get(language).kernel_name(settings)


def _without_pause(method: Any) -> Any:
    """jupyter_client's `in_pending_state`, which its manager's start and shutdown go
    through, less the 10 ms sleep it ends with (there so its own tests can see the pending
    state): 10 ms of every kernel's start and of every run's end here."""
    method = getattr(method, "__wrapped__", method)

    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self._attempted_start or not self._ready:
            self._ready = _get_future()
        try:
            out = await method(self, *args, **kwargs)
        except Exception as e:
            self._ready.set_exception(e)
            self._ready.exception()  # raised to the caller: not an unretrieved exception
            raise
        if self.owns_kernel:
            self._ready.set_result(None)
        return out

    return wrapper


_context: tuple[int, zmq.asyncio.Context] | None = None  # (pid that made it, the context)


def _zmq_context() -> zmq.asyncio.Context:
    """One zmq context for every kernel's manager and client in this process. One per manager
    and one per client started four threads per kernel, and their destroy() at shutdown
    blocked the loop up to its linger. Closed sockets keep unsent messages as long as destroy
    gave them (LINGER); a process forked from this one makes its own (a context does not
    survive a fork)."""
    global _context
    if _context is None or _context[0] != os.getpid() or _context[1].closed:
        context = zmq.asyncio.Context()
        context.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
        context.setsockopt(zmq.LINGER, CONTEXT_LINGER_MS)
        _context = (os.getpid(), context)
    return _context[1]


class _Manager(AsyncKernelManager):  # type: ignore[misc]
    start_kernel = _without_pause(AsyncKernelManager.start_kernel)
    shutdown_kernel = _without_pause(AsyncKernelManager.shutdown_kernel)


class _OwnSpecs(KernelSpecManager):
    """The shipped specs without their provisioner: a session makes the kernel's dirs and
    environment itself (autocoder.provisioner does that for other Jupyter servers)."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        resource_dir = self.find_kernel_specs().get(kernel_name)
        if resource_dir is None:
            raise NoSuchKernel(kernel_name)
        spec = KernelSpec.from_resource_dir(resource_dir)
        spec.metadata.pop("kernel_provisioner", None)
        return spec


class OutputCollector:
    """Turns iopub messages into nbformat outputs, keeping at most `limit` bytes (head and tail).

    Past the limit nothing more is stored except a bounded tail of the stream text. Our
    kernels cut their output to the limit before sending it (output_cap): a message carrying
    output_cap.CUT_KEY stands for that many bytes the server never received, and one carrying
    LOST_KEY says output was lost in the kernel. This cap is the backstop for what bypasses it.
    """

    def __init__(self, limit: int, on_output: OutputCallback | None = None) -> None:
        self.limit = limit
        self.head_budget = limit // 2
        self.tail_budget = limit - self.head_budget
        self.outputs: list[dict[str, Any]] = []
        self.tail = ""
        self.tail_name = "stdout"
        self.total = 0
        self.dropped = 0
        self.cut_at_source = False
        self.lost = 0
        # None until the output first goes over the limit; then what the head may still take.
        self.head_room: int | None = None
        self.error: ErrorInfo | None = None
        self.on_output = on_output
        # Set once autocoder interrupted the code itself (a timeout, a flood): the
        # KeyboardInterrupt that follows is ours, not an output of the code. It is neither
        # streamed nor kept among the outputs; `error` still says the interrupt took.
        self.stopped = False

    @property
    def over(self) -> bool:
        return self.cut_at_source or self.total > self.limit

    def add(self, msg: dict[str, Any]) -> None:
        kind = msg["msg_type"]
        content = msg["content"]
        if kind == "clear_output":
            if not self.over:
                self.outputs.clear()
            return
        if kind not in {"stream", "display_data", "execute_result", "error", "update_display_data"}:
            return
        if kind == "update_display_data":
            return
        cut = content.get(output_cap.CUT_KEY)
        if isinstance(cut, int) and cut > 0:
            self.total += cut
            self.dropped += cut
            self.cut_at_source = True
            self._close_head()
            self.head_room = 0  # what follows comes after the gap
            if kind == "stream":
                return  # the kernel's own line about the cut; finish() says how much in all
        lost = content.get(output_cap.LOST_KEY)
        if isinstance(lost, int):
            self.lost += max(lost, 1)
        if kind == "error":
            content = without_unknown_source(content)
            content = {**content, "traceback": without_own_frames(content.get("traceback", []))}
            msg = {**msg, "content": content}
            self.error = ErrorInfo(
                ename=content.get("ename", ""),
                evalue=content.get("evalue", ""),
                traceback=list(content["traceback"]),
            )
            if self.stopped:
                return
        if kind == "stream":
            # nbformat would validate the whole text, however large, before it is cut.
            out = {"output_type": "stream", "name": content["name"], "text": content["text"]}
        else:
            out = output_from_msg(msg)
        size = _size(out)
        self.total += size
        if self.on_output is not None:
            self.on_output(_preview(out))
        # Up to the limit everything is kept; past it, the head and a tail of the stream text.
        if kind == "error" or not self.over or isinstance(cut, int):
            self._append(out)
            return
        self._close_head()
        if kind == "stream":
            self._cut_stream(out)
        self.dropped += size

    def _close_head(self) -> None:
        """Over the limit: keep what fits in the head budget, stream text past it as the tail."""
        if self.head_room is not None:
            return
        kept, self.outputs, self.head_room = self.outputs, [], self.head_budget
        for out in kept:
            if out["output_type"] == "error":
                self.outputs.append(out)
            elif out["output_type"] == "stream":
                self._cut_stream(out)
            elif self.head_room >= (size := _size(out)) and not self.tail:
                self.outputs.append(out)
                self.head_room -= size

    def _cut_stream(self, out: dict[str, Any]) -> None:
        assert self.head_room is not None
        text = out["text"]
        room = min(self.head_room, len(text)) if not self.tail else 0
        if room:
            self._append({**out, "text": text[:room]})
            self.head_room -= room
        # Slice before joining: one flushed message can be hundreds of MB.
        text = text[max(room, len(text) - self.tail_budget) :]
        if text:
            self.tail = (self.tail + text)[-self.tail_budget :]
            self.tail_name = out["name"]
            self.head_room = 0

    def _append(self, out: dict[str, Any]) -> None:
        last = self.outputs[-1] if self.outputs else None
        if (
            out["output_type"] == "stream"
            and last is not None
            and last["output_type"] == "stream"
            and last["name"] == out["name"]
        ):
            last["text"] += out["text"]
        else:
            self.outputs.append(out)

    def execution(self, kind: ErrorKind | None, duration: float) -> Execution:
        """What was collected, as the record of one execution."""
        outputs = self.finish()
        stdout, stderr, text = texts(outputs)
        return Execution(
            outputs=outputs,
            stdout=stdout,
            stderr=stderr,
            text=text,
            error=self.error,
            kind=kind,
            duration=duration,
            truncated=self.over,
            output_bytes=self.total,
        )

    def finish(self) -> list[dict[str, Any]]:
        if self.over:
            cut = self.total - sum(_size(o) for o in self.outputs) - len(self.tail.encode())
            self._append(
                {
                    "output_type": "stream",
                    "name": self.tail_name,
                    "text": f"\n... [{cut:,} bytes of output cut] ...\n",
                }
            )
            if self.tail:
                self._append({"output_type": "stream", "name": self.tail_name, "text": self.tail})
        for out in self.outputs:
            if out["output_type"] == "stream":
                out["text"] = _join_crlf(out["text"])
        return self.outputs


_OWN_FRAME = re.compile(r"^\s*File \"?<autocoder ")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def without_own_frames(traceback: list[str]) -> list[str]:
    """A traceback without the frames of autocoder's own code in the kernel (the output cap's
    interrupt guard, the assert explainer): they say nothing about the user's code, to the
    user or to the model. IPython sends one frame per entry; a plain Python traceback, one
    entry of many frames, is filtered line by line."""
    kept = []
    for entry in traceback:
        if not isinstance(entry, str):
            kept.append(entry)
            continue
        if _OWN_FRAME.match(_ANSI.sub("", entry)):
            continue
        if "<autocoder " in entry and "\n" in entry:
            entry = _drop_plain_frames(entry)
        kept.append(entry)
    return kept


def _drop_plain_frames(text: str) -> str:
    """`  File "<autocoder …>", line N, in f` and the lines indented under it, dropped."""
    out: list[str] = []
    skipping = False
    for line in text.split("\n"):
        plain = _ANSI.sub("", line)
        if plain.startswith("  File "):
            skipping = bool(_OWN_FRAME.match(plain))
        elif not plain.startswith("    "):
            skipping = False
        if not skipping:
            out.append(line)
    return "\n".join(out)


def _kind(outcome: str, collector: OutputCollector) -> ErrorKind | None:
    """What an execution's end means, most telling first."""
    if outcome == "died":
        return ErrorKind.KERNEL_DIED
    if collector.lost:
        return ErrorKind.OUTPUT_LOST
    if collector.over:
        return ErrorKind.OUTPUT_LIMIT
    if outcome == "timeout":
        return ErrorKind.TIMEOUT
    if collector.error is not None:
        return ErrorKind.EXCEPTION
    return None


def _join_crlf(text: str) -> str:
    return text.replace("\r\n", "\n")


def _size(out: dict[str, Any]) -> int:
    if out["output_type"] == "stream":
        text = out["text"]
        # isascii() is O(1); encoding a flood just to measure it would copy it once more.
        return len(text) if text.isascii() else len(text.encode("utf-8", "replace"))
    data = out.get("data", {})
    return sum(len(v) if isinstance(v, str) else len(str(v)) for v in data.values())


def _preview(out: dict[str, Any]) -> dict[str, Any]:
    """A small copy of an output for progress events (no large payloads)."""
    if out["output_type"] == "stream":
        return {"output_type": "stream", "name": out["name"], "text": out["text"][:4096]}
    if out["output_type"] == "error":
        return {"output_type": "error", "ename": out["ename"], "evalue": out["evalue"]}
    plain = out.get("data", {}).get("text/plain", "")
    return {
        "output_type": out["output_type"],
        "mimetypes": sorted(out.get("data", {})),
        "text": plain[:4096] if isinstance(plain, str) else "",
    }


_SGR = re.compile(r"\x1b\[[0-9;]*m")
# What IPython shows for the source of a compiled frame (pandas' Cython ones): a line per frame
# that says nothing. The frame's own line (file, line, function) is kept.
_NO_SOURCE = re.compile(
    r"\s*(?:-*>)?\s*\d*\s*'Could not get source, probably due dynamically evaluated source code\.'\s*"
)


def without_unknown_source(content: dict[str, Any]) -> dict[str, Any]:
    """An error's content without IPython's "Could not get source" lines, before the page,
    the notebook or the model sees its traceback."""
    entries = content.get("traceback")
    if not entries or not any("Could not get source" in str(e) for e in entries):
        return content
    kept = [
        "\n".join(
            line for line in str(e).split("\n") if not _NO_SOURCE.fullmatch(_SGR.sub("", line))
        )
        for e in entries
    ]
    return {**content, "traceback": kept}


def texts(outputs: list[dict[str, Any]]) -> tuple[str, str, str]:
    """stdout, stderr and the answer text (stdout plus text/plain of results) of some outputs."""
    stdout: list[str] = []
    stderr: list[str] = []
    text: list[str] = []
    for out in outputs:
        if out["output_type"] == "stream":
            (stdout if out["name"] == "stdout" else stderr).append(out["text"])
            if out["name"] == "stdout":
                text.append(out["text"])
        elif out["output_type"] in {"execute_result", "display_data"}:
            plain = out.get("data", {}).get("text/plain")
            if isinstance(plain, str):
                text.append(plain if plain.endswith("\n") else plain + "\n")
    return "".join(stdout), "".join(stderr), "".join(text)


class KernelSession:
    """A started kernel that belongs to one run. Use as `async with KernelSession(s) as k`."""

    def __init__(
        self, settings: Settings, *, work_root: Path | None = None, language: str = "python"
    ) -> None:
        self.settings = settings
        self.language = languages.get(language)
        self.id = f"{owner_tag()}-{uuid.uuid4().hex[:12]}"
        self.work_root = work_root or workdirs_root(settings)
        self.workdir: Path | None = (self.work_root / self.id).resolve()
        self.runtime_dir: Path | None = None
        self.km: AsyncKernelManager | None = None
        self.kc: Any = None
        self.restarts = 0
        # Whether this session mounted the disk budget on its workdir (a session's own
        # directory has one already, which the session keeps).
        self._confined = False

    async def __aenter__(self) -> KernelSession:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def start(self) -> None:
        """Start the kernel and wait until it answers, or raise KernelStartError."""
        sandbox.check_available(self.settings)
        assert self.workdir is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._confined = disk.confine_workdir(self.settings, self.workdir) or self._confined
        self.runtime_dir = Path(tempfile.mkdtemp(prefix=f"{RUNTIME_PREFIX}{owner_tag()}-"))
        # The kernel writes its sockets there (and its stderr goes there): capped as well.
        disk.confine(self.runtime_dir, disk.RUNTIME_DIR_BYTES)
        km = _Manager(
            kernel_spec_manager=_OwnSpecs(kernel_dirs=[str(kernels_dir())]),
            kernel_name=self.language.kernel_name(self.settings),
            transport="ipc",
            ip=str(self.runtime_dir / "k"),
            connection_file=str(self.runtime_dir / "kernel.json"),
            context=_zmq_context(),
        )
        self.km = km
        _live.add(self)
        if _fork_start(self.settings, self.language):
            km.kernel_id = self.id
            km.provisioner = forkserver.ForkProvisioner(
                kernel_id=self.id, kernel_spec=km.kernel_spec, parent=km
            )
            km.provisioner.settings = self.settings
        env = sandbox.kernel_env(self.settings, self.workdir, self.runtime_dir)
        try:
            with open(self.runtime_dir / "kernel.log", "wb") as log_file:
                await asyncio.wait_for(
                    km.start_kernel(
                        env=env,
                        cwd=str(self.workdir),
                        stdout=subprocess.DEVNULL,
                        stderr=log_file,
                        pass_fds=(sandbox.lifeline(),),
                    ),
                    STARTUP_TIMEOUT,
                )
            self.kc = km.client(context=km.context)
            # No heartbeat channel: whether the kernel lives comes from its process (the
            # manager's is_alive), and its thread would ping every kernel for nothing.
            self.kc.start_channels(hb=False)
            await self._wait_ready(time.monotonic() + STARTUP_TIMEOUT)
        except BaseException as e:
            said = " ".join(self.kernel_log(300).split()[-40:])
            status = self.exit_status()
            await asyncio.shield(self._stop_kernel())
            self._drop_empty_workdir()
            if isinstance(e, Exception):
                why = f"; {status}" + (f", saying: {said}" if said else "")
                name = self.language.kernel_name(self.settings)
                raise KernelStartError(f"the kernel ({name}) did not start: {e}{why}") from e
            raise

    async def _wait_ready(self, deadline: float) -> None:
        """Until the kernel answers kernel_info on shell and its iopub reaches us.

        jupyter_client's wait_for_ready does the same, then waits for 0.2 s of iopub silence,
        which was most of a forked kernel's start. The kernel's `iopub_welcome` (ipykernel
        sends one when a subscription takes) or the idle status of one of our requests on
        iopub proves the subscription instead. Requests are resent until then (an iopub
        message published before the subscription took is lost); any reply will do.
        """
        sent: set[str] = set()
        reply: dict[str, Any] | None = None
        while True:
            if time.monotonic() > deadline:
                raise KernelStartError(f"the kernel did not answer within {STARTUP_TIMEOUT:.0f}s")
            sent.add(self.kc.kernel_info())
            try:
                while reply is None:
                    msg = await self.kc.get_shell_msg(timeout=1)
                    if msg["parent_header"].get("msg_id") in sent:
                        reply = msg
            except queue.Empty:
                pass
            if reply is not None and await self._iopub_reaches_us(sent, time.monotonic() + 0.5):
                self.kc._handle_kernel_info_reply(reply)
                return
            if not await self.is_alive():
                raise KernelStartError("the kernel died before it answered")

    async def _iopub_reaches_us(self, msg_ids: set[str], deadline: float) -> bool:
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = await self.kc.get_iopub_msg(timeout=remaining)
            except queue.Empty:
                return False
            if msg["msg_type"] == "iopub_welcome" or (
                msg["parent_header"].get("msg_id") in msg_ids
                and msg["msg_type"] == "status"
                and msg["content"].get("execution_state") == "idle"
            ):
                return True
        return False

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
        kind = _kind(outcome, collector)
        if kind is ErrorKind.EXCEPTION and disk.full(self.workdir):
            kind = ErrorKind.DISK_LIMIT
        return collector.execution(kind, time.monotonic() - start)

    async def _drain(self, msg_id: str, collector: OutputCollector, deadline: float) -> str:
        """Collect iopub messages of `msg_id` until idle ('idle'), or 'timeout', 'died', 'cut'."""
        interrupted_for_flood = collector.over
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            try:
                msg = await self.kc.get_iopub_msg(timeout=min(remaining, POLL_INTERVAL))
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
        end = time.monotonic() + SETTLE_MAX
        while (remaining := end - time.monotonic()) > 0:
            try:
                msg = await self.kc.get_iopub_msg(timeout=min(remaining, SETTLE_QUIET))
            except queue.Empty:
                return
            if msg.get("parent_header", {}).get("msg_id") == msg_id and msg["msg_type"] != "status":
                collector.add(msg)

    async def _reply_error(self, msg_id: str, collector: OutputCollector) -> None:
        """Some kernels only print an error and mark the reply `status: error`: that counts too."""
        deadline = time.monotonic() + REPLY_TIMEOUT
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = await self.kc.get_shell_msg(timeout=remaining)
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
        if self.runtime_dir is None:
            return ""
        # The kernel can write its runtime dir: the log is opened once, never through a symlink.
        opened = open_beneath(self.runtime_dir, "kernel.log")
        if opened is None:
            return ""
        with opened:
            return opened.tail(limit).decode("utf-8", "replace")

    def exit_status(self) -> str:
        """How the kernel process ended, in words (a segfault and `os._exit` differ here)."""
        process = getattr(getattr(self.km, "provisioner", None), "process", None)
        code = process.poll() if process is not None else None
        if code is None:
            return "the kernel process exited"
        # bwrap reports a child killed by a signal as 128 + the signal's number.
        signum = -code if code < 0 else code - 128 if code > 128 else 0
        with contextlib.suppress(ValueError):
            if signum:
                return f"the kernel process was killed by {signal.Signals(signum).name}"
        return f"the kernel process exited with code {code}"

    async def interrupt(self) -> None:
        """SIGINT to the kernel, as Jupyter's interrupt button sends it; never raises."""
        if self.km is not None:
            with contextlib.suppress(Exception):
                await self.km.interrupt_kernel()

    async def reset(self) -> None:
        """Give the next attempt a clean namespace without the cost of a new kernel."""
        if self.kc is None:
            return
        code = RESET_CODE if self.language.name == "python" else self.language.reset_code
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
        km = self.km
        if km is None or km.provisioner is None or not km.has_kernel:
            return
        try:
            await asyncio.wait_for(km.provisioner.kill(), 10)
            await asyncio.wait_for(km.provisioner.wait(), 10)
        except Exception:
            _kill_hard(km)

    async def shutdown(self) -> None:
        """Stop the kernel; its workdir goes too when nothing was written there (files written
        to its disk budget are copied to the disk, unless the caller took the workdir)."""
        await self._stop_kernel()
        await asyncio.to_thread(self._drop_empty_workdir)

    def release_workdir(self) -> None:
        """The caller takes the workdir as it is, its disk budget included (`disk.keep`): this
        session will not touch it again."""
        self._confined = False

    def _drop_empty_workdir(self) -> None:
        if self.workdir is not None:
            if self._confined:
                self._confined = False
                disk.settle(self.workdir)  # a plain directory on the disk from here on
            with contextlib.suppress(OSError):
                self.workdir.rmdir()

    async def _stop_kernel(self) -> None:
        kc, km, runtime = self.kc, self.km, self.runtime_dir
        self.kc = self.km = self.runtime_dir = None
        if kc is not None:
            with contextlib.suppress(Exception):
                kc.stop_channels()
        if km is not None:
            try:
                await asyncio.wait_for(km.shutdown_kernel(now=True), 10)
            except Exception:
                _kill_hard(km)
        if runtime is not None:
            disk.remove(runtime)
        _live.discard(self)

    def kill_now(self) -> None:
        """Synchronous last resort at interpreter exit or on a signal."""
        if self.km is not None:
            _kill_hard(self.km)
        if self.runtime_dir is not None:
            disk.remove(self.runtime_dir)


def _fork_start(settings: Settings, language: languages.Language) -> bool:
    """Whether this kernel is forked from a zygote; says once why not when fork was asked for.
    The zygote is an IPython kernel: other languages' kernels are always exec'd."""
    if not language.ipykernel:
        return False
    reason = forkserver.why_not(settings)
    if reason is not None and settings.kernel_start == "fork":
        forkserver._exec_instead(reason)
    return reason is None


def _kill_hard(km: AsyncKernelManager) -> None:
    provisioner = getattr(km, "provisioner", None)
    process = getattr(provisioner, "process", None)
    if process is None:
        return
    with contextlib.suppress(OSError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        process.kill()
    with contextlib.suppress(Exception):
        process.wait(timeout=5)


@atexit.register
def kill_all_kernels() -> None:
    """No kernel outlives the program, whatever way it ends."""
    for session in list(_live):
        session.kill_now()
    forkserver.close_all()


def owner_tag(pid: int | None = None) -> str:
    """`<pid>.<start time>` of a process (this one by default): a pid alone gets reused.

    It begins the names of the runtime dirs and workdirs a process makes, so that a later
    process can tell which ones a dead server left behind.
    """
    pid = os.getpid() if pid is None else pid
    return f"{pid}.{_start_time(pid) or 0}"


def _start_time(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[19])


def _owner_gone(name: str, prefix: str = "") -> bool:
    """Whether `name` (`<prefix><pid>.<start>-...`) was made by a process that has ended."""
    m = re.fullmatch(re.escape(prefix) + r"(\d+)\.(\d+)-[\w-]+", name)
    if m is None:
        return False
    return _start_time(int(m[1])) != int(m[2])


@dataclass
class Swept:
    """What `sweep_leftovers` removed."""

    processes: int = 0
    dirs: int = 0


def sweep_leftovers(work_root: Path | None = None) -> Swept:
    """Remove what an earlier autocoder, killed before it could clean up, left behind.

    Only its own things, where this process would make them: processes naming a connection
    file in a runtime dir (in the temp dir) whose maker is gone, or whose launcher environment
    names a parent that is no longer theirs (a bwrap that lost its server); then their runtime
    dirs (connection files hold HMAC keys) and the workdirs under `work_root` that a dead
    process made.
    """
    swept = Swept()
    if not Path("/proc/self/stat").exists():
        return swept
    tmp = Path(tempfile.gettempdir())
    stale = {d for d in _runtime_dirs(tmp) if _owner_gone(d.name, RUNTIME_PREFIX)}
    zygote_dirs = _runtime_dirs(tmp, forkserver.ZYGOTE_PREFIX)
    stale_zygotes = {d for d in zygote_dirs if _owner_gone(d.name, forkserver.ZYGOTE_PREFIX)}
    orphans = {
        pid: d for pid, d in _autocoder_processes() if d.parent == tmp and _is_orphan(pid, d, stale)
    }
    for pid in orphans:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + LEFTOVER_GRACE
    while any(_running(pid) for pid in orphans) and time.monotonic() < deadline:
        time.sleep(0.05)
    swept.processes = len(orphans)
    dirs = stale | stale_zygotes | {d for d in orphans.values() if _ours(d)}
    if work_root is not None and work_root.is_dir():
        dirs |= {d for d in work_root.iterdir() if _owner_gone(d.name) and _ours(d)}
    for d in dirs:
        disk.remove(d)  # a budget is unmounted first: its files go with it
        swept.dirs += not d.exists()
    if swept.processes or swept.dirs:
        log.warning(
            "removed what an earlier autocoder left: %d process(es), %d dir(s)",
            swept.processes,
            swept.dirs,
        )
    return swept


def _runtime_dirs(tmp: Path, prefix: str = RUNTIME_PREFIX) -> Iterator[Path]:
    with contextlib.suppress(OSError):
        for d in tmp.iterdir():
            if d.name.startswith(prefix) and _ours(d):
                yield d


def _ours(d: Path) -> bool:
    """A real directory of this user (or, for root, of a kernel's throwaway uid)."""
    try:
        st = d.lstat()
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    uid = os.geteuid()
    return st.st_uid == uid or (uid == 0 and st.st_uid >= sandbox.UID_BASE)


def _autocoder_processes() -> Iterator[tuple[int, Path]]:
    """(pid, runtime dir) of every other process that names an autocoder connection file."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        for arg in argv:
            if _CONNECTION_FILE.search(arg) and int(proc.name) != os.getpid():
                yield int(proc.name), Path(arg).parent
                break


_CONNECTION_FILE = re.compile("/" + re.escape(RUNTIME_PREFIX) + r"[^/]+/kernel\.json$")


def _is_orphan(pid: int, runtime_dir: Path, stale: set[Path]) -> bool:
    if runtime_dir in stale:
        return True
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return False
    env = dict(v.decode("utf-8", "replace").partition("=")[::2] for v in environ if b"=" in v)
    if sandbox.RUNTIME_DIR_VAR not in env:
        return False  # not a launcher (or bwrap) started with kernel_env
    if _names_runtime_dir(ppid, runtime_dir):
        return False  # bwrap's own child, or a resident launcher's bwrap: its parent decides
    parent = env.get(sandbox.PARENT_PID_VAR)
    if parent is None:
        return ppid == 1  # started by an autocoder from before the parent was named
    return parent != str(ppid)


def _names_runtime_dir(pid: int, runtime_dir: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return False
    return any(_CONNECTION_FILE.search(a) and Path(a).parent == runtime_dir for a in argv)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class KernelLedger(Protocol):
    """Where the kernels started on a gateway are noted while they exist (a shared run store),
    so that if this process dies another one deletes them. Its methods block."""

    def kernel_started(self, kernel_id: str) -> None: ...

    def kernels_ended(self, kernel_ids: list[str]) -> None: ...


class KernelProvider:
    """Hands each run a started kernel that no other run has used. This one starts them on demand."""

    fresh = True  # every kernel is new: a run's candidates can each have their own

    def __init__(
        self, settings: Settings, language: str = "python", *, ledger: KernelLedger | None = None
    ) -> None:
        self.settings = settings
        self.language = language
        self.ledger = ledger
        self._stopping: set[asyncio.Task[None]] = set()

    def session(self) -> KernelSession:
        """A new, unstarted session: a local kernel, or one from AUTOCODER_GATEWAY_URL. The
        gateway serves AUTOCODER_GATEWAY_KERNEL, a Python kernel: other languages stay local."""
        if self.settings.gateway_url and languages.get(self.language).ipykernel:
            from autocoder.gateway import GatewaySession

            return GatewaySession(self.settings, ledger=self.ledger)
        return KernelSession(self.settings, language=self.language)

    async def check(self) -> str | None:
        """Why no kernel can be had right now (for /health), or None."""
        if self.settings.gateway_url:
            from autocoder.gateway import probe

            return await probe(self.settings)
        return None

    async def acquire(self) -> KernelSession:
        session = self.session()
        await session.start()
        return session

    async def release(self, session: KernelSession) -> None:
        """The kernel's processes end before this returns, and its workdir (its disk budget
        included) is the caller's from then on, so the run can keep what its code wrote; the
        rest of the teardown (channels, connection files, cgroups: ~8 ms, a gateway's DELETE:
        ~0.3 s) goes on while the run answers, and close() waits for it."""
        if session.workdir is not None:
            await session.end_processes()
            session.release_workdir()
        task = asyncio.get_running_loop().create_task(session.shutdown())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        await asyncio.gather(*self._stopping, return_exceptions=True)


class KernelPool(KernelProvider):
    """Keeps `size` kernels started ahead of time and refills in the background.

    Kernels are never reused: a released kernel is shut down and a new one takes its place.
    """

    def __init__(
        self, settings: Settings, size: int | None = None, *, ledger: KernelLedger | None = None
    ) -> None:
        super().__init__(settings, ledger=ledger)
        self.size = settings.pool_size if size is None else size
        self._ready: asyncio.Queue[KernelSession] = asyncio.Queue()
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
        session = self.session()
        try:
            await session.start()
        except Exception as e:
            self.last_error = str(e)
            log.warning("pool: %s", e)
            return
        if self._closed:
            await session.shutdown()
        else:
            self.last_error = None
            self._ready.put_nowait(session)

    async def acquire(self) -> KernelSession:
        while not self._ready.empty():
            session = self._ready.get_nowait()
            self._refill()
            if await session.is_alive():
                return session
            await session.shutdown()
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

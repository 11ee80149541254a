"""Kernels exec'd on this machine: jupyter_client's manager starts the kernelspec's launcher.

Each kernel gets a runtime directory of its own (connection file, IPC sockets, its stderr log) in
the temp dir, and the working directory its `Kernel` names; the launcher (`python -m
autocoder.sandbox`) confines it. `ExecBackend` is the backend of last resort: it serves every
language. `kernel.fork.ForkBackend` is this with a provisioner that forks instead of exec'ing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq.asyncio
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager, _get_future
from jupyter_client.provisioning import KernelProvisionerBase

from autocoder import disk, languages, sandbox
from autocoder.config import Settings
from autocoder.errors import KernelStartError
from autocoder.files import open_beneath
from autocoder.kernel.backend import STARTUP_TIMEOUT, KernelRequest
from autocoder.kernel.leftovers import RUNTIME_PREFIX, owner_tag
from autocoder.languages import kernels_dir

log = logging.getLogger(__name__)

# The client (and the manager's control socket) connect before the kernel has bound its
# sockets; zmq retries an IPC connect after this many ms (100 by default, plus as much again
# at random): up to 200 ms of a start.
RECONNECT_MS = 5
CONTEXT_LINGER_MS = 100  # what jupyter_client's destroy(linger=100) gave a closed socket


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


class LocalKernel:
    """One kernel process on this machine, as a `KernelHandle`: its manager, runtime dir and log.

    `provisioner`, when given, replaces the kernelspec's way to launch (the fork server's).
    """

    def __init__(
        self,
        request: KernelRequest,
        provisioner: type[KernelProvisionerBase] | None = None,
    ) -> None:
        self.request = request
        self.provisioner = provisioner
        self.runtime_dir: Path | None = None
        self.manager: AsyncKernelManager | None = None
        self.kc: Any = None

    async def start(self) -> Any:
        """Start the kernel and wait until it answers, or raise KernelStartError."""
        r = self.request
        sandbox.check_available(r.settings)
        assert r.workdir is not None
        r.workdir.mkdir(parents=True, exist_ok=True)
        self.runtime_dir = Path(tempfile.mkdtemp(prefix=f"{RUNTIME_PREFIX}{owner_tag()}-"))
        # The kernel writes its sockets there (and its stderr goes there): capped as well.
        disk.confine(self.runtime_dir, disk.RUNTIME_DIR_BYTES)
        km = _Manager(
            kernel_spec_manager=_OwnSpecs(kernel_dirs=[str(kernels_dir())]),
            kernel_name=r.language.kernel_name(r.settings),
            transport="ipc",
            ip=str(self.runtime_dir / "k"),
            connection_file=str(self.runtime_dir / "kernel.json"),
            context=_zmq_context(),
        )
        self.manager = km
        if self.provisioner is not None:
            km.kernel_id = r.kernel_id
            km.provisioner = self.provisioner(
                kernel_id=r.kernel_id, kernel_spec=km.kernel_spec, parent=km, settings=r.settings
            )
        env = sandbox.kernel_env(r.settings, r.workdir, self.runtime_dir)
        try:
            with open(self.runtime_dir / "kernel.log", "wb") as log_file:
                await asyncio.wait_for(
                    km.start_kernel(
                        env=env,
                        cwd=str(r.workdir),
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
            await asyncio.shield(self.stop())
            if isinstance(e, Exception):
                why = f"; {status}" + (f", saying: {said}" if said else "")
                name = r.language.kernel_name(r.settings)
                raise KernelStartError(f"the kernel ({name}) did not start: {e}{why}") from e
            raise
        return self.kc

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
        return self.manager is not None and await self.manager.is_alive()

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
        process = getattr(getattr(self.manager, "provisioner", None), "process", None)
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
        if self.manager is not None:
            with contextlib.suppress(Exception):
                await self.manager.interrupt_kernel()

    async def end_processes(self) -> None:
        """SIGKILL to the kernel, then the wait until its processes are gone: from then on
        nothing of it can change its working directory. shutdown() does the rest."""
        km = self.manager
        if km is None or km.provisioner is None or not km.has_kernel:
            return
        try:
            await asyncio.wait_for(km.provisioner.kill(), 10)
            await asyncio.wait_for(_ended(km.provisioner), 10)
            await asyncio.wait_for(km.provisioner.wait(), 10)
        except Exception:
            _kill_hard(km)

    async def stop(self) -> None:
        """Close the channels, shut the kernel down (killed if it does not go within 10 s) and
        remove its runtime dir."""
        kc, km, runtime = self.kc, self.manager, self.runtime_dir
        self.kc = self.manager = self.runtime_dir = None
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

    def kill_now(self) -> None:
        """Synchronous last resort at interpreter exit or on a signal."""
        if self.manager is not None:
            _kill_hard(self.manager)
        if self.runtime_dir is not None:
            disk.remove(self.runtime_dir)


async def _ended(provisioner: KernelProvisionerBase) -> None:
    """Until a killed kernel's process is gone: polled from 2 ms up, where the provisioner's
    own wait() polls every 100 ms, which was a tenth of a second of every run."""
    delay = 0.002
    while await provisioner.poll() is None:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


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


class ExecBackend:
    """Kernels exec'd here by their kernelspec's launcher: every language, always available."""

    name = "exec"
    local_workdir = True

    def why_not(self, language: languages.Language, settings: Settings) -> str | None:
        return None

    def check(self, settings: Settings) -> None:
        sandbox.check_available(settings)

    async def probe(self, settings: Settings) -> str | None:
        return None

    async def reclaim(self, settings: Settings, kernel_ids: list[str]) -> list[str]:
        """Kernels noted in a shared store come from a gateway; none can be reached here."""
        log.warning("kernels of a replica that died left to reclaim: %s", ", ".join(kernel_ids))
        return []

    def new(self, request: KernelRequest) -> LocalKernel:
        return LocalKernel(request)

"""The server's side of the fork server: kernels forked from a zygote instead of exec'd.

The zygote (`inside/zygote.py`, standard library only) is one long-lived process per kernel
environment that has imported ipykernel once, started confined by `sandbox/zygote.py`; on
request it forks a child that becomes a fresh kernel. Here: starting the zygote and asking it
for kernels (`Zygote`), the `process` of a forked kernel (`ForkedProcess`), the provisioner that
hands jupyter_client's manager a forked kernel instead of an exec'd one (`ForkProvisioner`), and
the backend (`ForkBackend`) that the pool takes first for IPython kernels when it serves.
docs/sandbox.md has the design and its threat model.
"""

from __future__ import annotations

import array
import asyncio
import atexit
import contextlib
import functools
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from traitlets import Any as AnyTrait

from autocoder import disk, sandbox
from autocoder.config import Settings
from autocoder.errors import KernelStartError
from autocoder.inside import asserts, output_cap
from autocoder.inside.zygote import SOCKET_NAME, _under
from autocoder.kernel.backend import KernelRequest
from autocoder.kernel.leftovers import ZYGOTE_PREFIX, owner_tag, workdirs_root
from autocoder.kernel.local import ExecBackend, LocalKernel
from autocoder.languages import Language
from autocoder.sandbox import cgroups

log = logging.getLogger(__name__)

ZYGOTE_START_TIMEOUT = 60.0
FORK_TIMEOUT = 30.0
KILL_REPORT_TIMEOUT = 5.0  # jupyter_client's own wait for a killed kernel
KILL_INIT_AFTER = 1.0  # a killed kernel's init reports within ms; past this it is killed too
CGROUP_EMPTY_TIMEOUT = 2.0
UID_FORK_BASE = 0x0100_0000  # above every pid, so never a uid of an exec'd kernel (UID_BASE + pid)


def why_not(settings: Settings) -> str | None:
    """Why kernels cannot be forked here (then they are exec'd), or None when they can."""
    if settings.kernel_start != "fork":
        return "AUTOCODER_KERNEL_START=exec"
    if settings.sandbox != "bwrap":
        return "forked kernels need the bwrap sandbox"
    # Not resolved: a venv's python is a link to the base interpreter, with a prefix of its own.
    python = settings.kernel_python
    if python is not None and os.path.abspath(python) != os.path.abspath(sys.executable):
        return "AUTOCODER_KERNEL_PYTHON is another interpreter than the server's"
    if os.geteuid() != 0 or sandbox.dedicated_uid() is None or not _uids_mapped():
        return "forked kernels need a root server (a throwaway uid per kernel)"
    if not hasattr(socket, "SCM_CREDENTIALS"):
        return "this platform has no SCM_CREDENTIALS"
    return zygote_for(settings).failed


def _roots(settings: Settings) -> list[str]:
    """The host dirs whose runs' dirs the zygote must reach: the temp dir and the work root."""
    work = workdirs_root(settings)
    work.mkdir(parents=True, exist_ok=True)
    found = sorted({os.path.realpath(tempfile.gettempdir()), os.path.realpath(work)})
    return [r for r in found if not _under(r, [o for o in found if o != r])]


class ForkedProcess:
    """The `process` of a forked kernel, as jupyter_client and the local kernel use a Popen.

    Its pid is the init's, in the server's PID namespace (the kernel's namespace dies with it);
    how it ended comes from the zygote, over the connection the kernel was asked for on.
    """

    def __init__(self, conn: socket.socket, pid: int, buffered: bytes) -> None:
        self.conn = conn
        self.pid = pid
        self.returncode: int | None = None
        self.stdin = self.stdout = self.stderr = None
        self._buffer = buffered
        self._read()

    def _read(self) -> None:
        if self.returncode is not None:
            return
        while True:
            try:
                chunk = self.conn.recv(4096, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                # The zygote is gone, and with it the init (its parent-death signal).
                self._parse()
                if self.returncode is None:
                    self.returncode = -signal.SIGKILL
                return
            self._buffer += chunk
        self._parse()

    def _parse(self) -> None:
        for line in self._buffer.split(b"\n"):
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict) and isinstance(message.get("exit"), int):
                    self.returncode = message["exit"]

    def poll(self) -> int | None:
        self._read()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"forked kernel {self.pid}", timeout or 0)
            select.select([self.conn], [], [], 0.05)
        assert self.returncode is not None
        return self.returncode

    async def ended(self, timeout: float) -> int | None:
        """Its exit status once the zygote reports it (within `timeout`), or None.

        jupyter_client polls a killed kernel every 0.1 s; the report comes on the connection.
        """
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while self.poll() is None and self.conn.fileno() >= 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.conn.fileno(), _resolve, readable)
            try:
                await asyncio.wait_for(readable, remaining)
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(self.conn.fileno())
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def close(self) -> None:
        """Closing the connection also tells the zygote to kill the kernel if it still runs."""
        self.conn.close()


class Zygote:
    """One zygote process for kernels of one environment; started, and restarted, on demand."""

    def __init__(self, allow_network: bool, roots: list[str]) -> None:
        self.allow_network = allow_network
        self.roots = roots
        self.process: Any = None
        self.directory: str | None = None
        self.starts = 0
        self.wanted = 0  # kernels asked for before it listened
        # Why a zygote could not even start here; kernels are then exec'd instead.
        self.failed: str | None = None

    @property
    def socket_path(self) -> str | None:
        return None if self.directory is None else os.path.join(self.directory, SOCKET_NAME)

    def _start(self) -> None:
        self.close()
        self.directory = tempfile.mkdtemp(prefix=f"{ZYGOTE_PREFIX}{owner_tag()}-")
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            sandbox.PARENT_PID_VAR: str(os.getpid()),
            sandbox.LIFELINE_VAR: str(sandbox.lifeline()),
        }
        argv = [
            sys.executable,
            "-m",
            "autocoder.sandbox.zygote",
            self.directory,
            json.dumps(self.roots),
        ]
        argv += ["--network"] if self.allow_network else []
        try:
            with open(os.path.join(self.directory, "zygote.log"), "wb") as log:
                self.process = subprocess.Popen(
                    argv,
                    env=env,
                    pass_fds=(sandbox.lifeline(),),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    start_new_session=True,
                )
        except OSError:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
            raise
        self.starts += 1

    def log_tail(self, limit: int = 2000) -> str:
        if self.directory is None:
            return ""
        try:
            with open(os.path.join(self.directory, "zygote.log"), "rb") as f:
                return f.read()[-limit:].decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def start(self) -> None:
        """Start the zygote unless it runs (it listens a second or so later)."""
        if self.process is None or self.process.poll() is not None:
            self._start()

    @property
    def listening(self) -> bool:
        """Whether a kernel can be forked now; notes why not for good if it exited at start."""
        if self.process is None or self.socket_path is None:
            return False
        code = self.process.poll()
        if code is None:
            return os.path.exists(self.socket_path)
        if code > 0 and not os.path.exists(self.socket_path) and self.failed is None:
            self.failed = f"the kernel zygote exited at start: {self.log_tail()}"
        return False

    async def ready(self) -> str:
        """The zygote's socket, once it listens; a dead zygote is replaced first."""
        self.start()
        process, path = self.process, self.socket_path
        assert path is not None
        deadline = time.monotonic() + ZYGOTE_START_TIMEOUT
        while not os.path.exists(path):
            if process.poll() is not None:
                self.failed = f"the kernel zygote exited at start: {self.log_tail()}"
                raise KernelStartError(self.failed)
            if time.monotonic() > deadline:
                raise KernelStartError(
                    f"the kernel zygote did not listen within {ZYGOTE_START_TIMEOUT:.0f}s"
                )
            await asyncio.sleep(0.01)
        return path

    async def fork(self, request: dict[str, Any], fds: list[int]) -> ForkedProcess:
        """Ask for a kernel; returns once it is forked (not yet ready)."""
        path = await self.ready()
        loop = asyncio.get_running_loop()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            conn.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(conn, path), FORK_TIMEOUT)
            payload = json.dumps(request).encode() + b"\n"
            sent = conn.sendmsg(
                [payload[:4096]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            )
            await asyncio.wait_for(loop.sock_sendall(conn, payload[sent:]), FORK_TIMEOUT)
            pid, rest = await asyncio.wait_for(self._forked(conn), FORK_TIMEOUT)
        except BaseException as e:
            conn.close()
            if isinstance(e, (OSError, TimeoutError, EOFError)):
                raise KernelStartError(
                    f"the kernel zygote did not fork: {e!r} {self.log_tail()}"
                ) from e
            raise
        return ForkedProcess(conn, pid, rest)

    @staticmethod
    async def _forked(conn: socket.socket) -> tuple[int, bytes]:
        """The init's pid, from the credentials on its first message."""
        loop = asyncio.get_running_loop()
        while True:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(conn.fileno(), _resolve, ready)
            try:
                await ready
            finally:
                loop.remove_reader(conn.fileno())
            try:
                data, ancdata, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("iII")))
            except BlockingIOError:
                continue
            if not data:
                raise EOFError("the zygote closed the connection")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[: struct.calcsize("iII")])[0]
                    return pid, data.partition(b"\n")[2]

    def close(self) -> None:
        """Stop the zygote (its kernels die with it) and remove its directory."""
        process, directory = self.process, self.directory
        self.process = self.directory = None
        if process is not None:
            with contextlib.suppress(OSError):
                process.kill()
            with contextlib.suppress(Exception):
                process.wait(10)
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


class ForkProvisioner(LocalProvisioner):  # type: ignore[misc]
    """Launches a kernel by asking the zygote to fork one, for jupyter_client's KernelManager.

    Everything after launch (poll, signals, kill, wait) goes through ForkedProcess, so
    the kernel's interrupt, timeout escalation, death detection and replace are unchanged.
    """

    settings: Any = AnyTrait(None)  # the server's Settings, given when it is made
    _forked: ForkedProcess | None = None
    _cgroups: list[str] = []

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        """Fork the kernel when the zygote listens; exec it (as LocalProvisioner does) until then.

        The zygote is started when this process asks for its second kernel, or at once to
        replace one that died: a one-off run (`autocoder run`) would pay its imports for nothing.
        """
        zygote = zygote_for(self.settings)
        if zygote.failed is None and not zygote.listening:
            zygote.wanted += 1
            if zygote.wanted >= 2 or zygote.starts:
                zygote.start()
        if zygote.failed is not None:
            _exec_instead(zygote.failed)
        if zygote.listening:
            try:
                return await self._fork(zygote, **kwargs)
            except KernelStartError as e:
                log.warning("%s; exec'd instead", e)
        return await super().launch_kernel(cmd, **kwargs)

    async def _fork(self, zygote: Zygote, **kwargs: Any) -> Any:
        settings = self.settings
        env = kwargs.get("env") or {}
        workdir = os.path.realpath(env[sandbox.WORKDIR_VAR])
        runtime_dir = os.path.realpath(env[sandbox.RUNTIME_DIR_VAR])
        assert self.parent is not None
        connection_file = os.path.realpath(self.parent.connection_file)
        uid = _allocate_uid()
        sandbox.hand_over([Path(workdir), Path(runtime_dir)], uid)
        # The disk budgets on the kernel's dirs were mounted after the zygote made its view.
        mounts = [p for p in (workdir, runtime_dir) if os.path.ismount(p)]
        mount_fds = _clones(mounts)
        stderr: Any = kwargs.get("stderr")
        stderr_fd = (
            stderr.fileno() if hasattr(stderr, "fileno") else os.open(os.devnull, os.O_WRONLY)
        )
        self._cgroups, cgroup_fds = _cgroups(settings, uid)
        limits = sandbox.Limits.of(settings)
        mib = 2**20
        request = {
            "workdir": workdir,
            "runtime_dir": runtime_dir,
            "mounts": mounts,
            "connection_file": connection_file,
            "uid": uid,
            "home": sandbox.SANDBOX_HOME,
            "tmpfs_bytes": limits.memory_mb * mib,
            "passwd": sandbox.passwd_text(uid),
            "group": sandbox.group_text(uid),
            "allow_network": limits.allow_network,
            "rlimits": {
                "RLIMIT_AS": limits.memory_mb * mib,
                "RLIMIT_CPU": limits.cpu_seconds,
                "RLIMIT_NPROC": limits.max_processes,
                "RLIMIT_NOFILE": limits.max_open_files,
                "RLIMIT_FSIZE": limits.max_file_mb * mib,
                "RLIMIT_CORE": 0,
            },
            "env": sandbox.inner_env(),
            "python": sys.executable,
            "python_dirs": [str(d) for d in sandbox.python_dirs(None)],
            "kernel_args": sandbox.BWRAP_KERNEL_ARGS,
            "installs": _installs(settings.max_output_bytes),
        }
        try:
            self._forked = await zygote.fork(request, [stderr_fd, *mount_fds, *cgroup_fds])
        finally:
            for fd in (*mount_fds, *cgroup_fds):
                os.close(fd)
            if not hasattr(stderr, "fileno"):
                os.close(stderr_fd)
        _uids_in_use.add(uid)
        self._uid = uid
        self.process = self._forked  # type: ignore[assignment]
        self.pid = self._forked.pid
        self.pgid = None
        self.cwd = workdir
        return self.connection_info

    async def kill(self, restart: bool = False) -> None:
        """SIGKILL to all the kernel's cgroups hold but its init (the kernel and what runs under
        it); the init then kills what is left in the namespace and reports once nothing runs.
        The init itself is killed only when that does not come (no cgroups, a stuck init)."""
        forked = self._forked
        if forked is not None and forked.poll() is None:
            members = [pid for pid in _members(self._cgroups) if pid != forked.pid]
            for pid in members:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if members and await forked.ended(KILL_INIT_AFTER) is not None:
                return
        await super().kill(restart)
        if forked is not None:
            await forked.ended(KILL_REPORT_TIMEOUT)

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart)
        if self._forked is not None:
            self._forked.close()
        _uids_in_use.discard(getattr(self, "_uid", -1))
        # A killed namespace takes a moment to empty (a few ms); a cgroup cannot go before.
        left, self._cgroups = self._cgroups, []
        deadline, pause = time.monotonic() + CGROUP_EMPTY_TIMEOUT, 0.002
        while True:
            for path in list(left):
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    pass
                except OSError:
                    continue
                left.remove(path)
            if not left or time.monotonic() > deadline:
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)


def _clones(paths: list[str]) -> list[int]:
    """A detached clone of the mount on each path, for the kernel's init to attach; a clone
    that cannot be made fails the fork (the kernel is exec'd instead, and bwrap binds the
    mount as it is), never a kernel that writes beneath its budget."""
    fds: list[int] = []
    try:
        for path in paths:
            fds.append(disk.clone(Path(path)))
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise KernelStartError(f"cannot hand the kernel its capped directory: {e}") from e
    return fds


def _members(cgroups: list[str]) -> list[int]:
    """The pids in a kernel's cgroup, in this server's PID namespace. Each is a process of the
    kernel's that has not exited: its pid is not free again before it exits and is reaped."""
    for path in cgroups:
        with (
            contextlib.suppress(OSError, ValueError),
            open(os.path.join(path, "cgroup.procs")) as f,
        ):
            return [int(line) for line in f if line.strip()]
    return []


def _uid_block() -> int:
    return sandbox.UID_BASE + UID_FORK_BASE + (os.getpid() % (1 << 18)) * (1 << 12)


def _uids_mapped() -> bool:
    """Whether this server's whole block of kernel uids exists here (a user namespace may map few)."""
    first, last = _uid_block(), _uid_block() + (1 << 12) - 1
    with open("/proc/self/uid_map") as f:
        for line in f:
            inside, _, count = (int(n) for n in line.split())
            if inside <= first and last < inside + count:
                return True
    return False


_uids_in_use: set[int] = set()
_next_uid = [0]


def _allocate_uid() -> int:
    """A uid no live kernel of this server has, in a block of uids only this server uses."""
    block = _uid_block()
    for _ in range(1 << 12):
        _next_uid[0] = (_next_uid[0] + 1) % (1 << 12)
        uid = block + _next_uid[0]
        if uid not in _uids_in_use:
            return uid
    raise RuntimeError("every uid of this server's block is in use")


def _cgroups(settings: Settings, uid: int) -> tuple[list[str], list[int]]:
    """Best effort, as the exec'd launcher does: memory and pids cgroups for the kernel's tree.

    Returns the dirs made and an open cgroup.procs of each, which the kernel's init writes the
    kernel and itself into while IPython starts, before the kernel serves."""
    wanted = cgroups.cgroup_limits(settings.memory_mb, settings.max_processes + 1)
    # The kernel joins once IPython is up: what it allocated by then moves in with it.
    wanted["memory"]["memory.move_charge_at_immigrate"] = 1
    made: list[str] = []
    fds: list[int] = []
    for mine in cgroups.make_cgroups(f"f{uid}", wanted):
        made.append(str(mine))
        with contextlib.suppress(OSError):
            fds.append(os.open(mine / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
    return made, fds


@functools.cache
def _installs(max_output_bytes: int) -> list[tuple[str, str, str, str]]:
    """What the launcher gives ipykernel under bwrap as exec_lines, read once: our sources."""
    found = (asserts.install_source(), output_cap.install_source(max_output_bytes))
    return [install for install in found if install is not None]


@functools.cache
def _exec_instead(reason: str) -> None:
    log.warning("kernels start by exec, not fork: %s", reason.splitlines()[0] if reason else reason)


def _resolve(future: Any) -> None:
    if not future.done():
        future.set_result(None)


_zygotes: dict[tuple[bool, tuple[str, ...]], Zygote] = {}


def zygote_for(settings: Settings) -> Zygote:
    """This process's zygote for kernels of `settings` (one per environment, like the lifeline)."""
    roots = _roots(settings)
    key = (bool(settings.allow_network), tuple(roots))
    if key not in _zygotes:
        _zygotes[key] = Zygote(settings.allow_network, roots)
    return _zygotes[key]


@atexit.register
def close_all() -> None:
    """Stop every zygote of this process (at exit: their kernels die with them)."""
    for zygote in list(_zygotes.values()):
        zygote.close()


class ForkBackend(ExecBackend):
    """IPython kernels forked from the zygote, where it can run (a root server under bwrap):
    the first choice of the pool for them. Other languages' kernels are exec'd."""

    name = "fork"

    def why_not(self, language: Language, settings: Settings) -> str | None:
        """Why not forked; said once (logged) when fork was asked for and cannot be had."""
        if not language.ipykernel:
            return "the zygote is an IPython kernel"
        reason = why_not(settings)
        if reason is not None and settings.kernel_start == "fork":
            _exec_instead(reason)
        return reason

    def new(self, request: KernelRequest) -> LocalKernel:
        return LocalKernel(request, provisioner=ForkProvisioner)

"""Fresh sandboxed kernels forked from a zygote that has already imported ipykernel.

A kernel's start is mostly Python importing IPython, ipykernel, zmq and their kin again. The
zygote is one long-lived process per kernel environment that imports them once (and nothing of
the user's, no secret: it is started with the sandbox's clean environment) and, on request,
forks a child that becomes a fresh kernel. docs/sandbox.md has the design and its threat model.

Two processes per kernel, as bwrap has them: an init, PID 1 of a new PID namespace, that makes
new mount, IPC, UTS and network namespaces, builds the kernel's file system view and reaps;
the kernel (PID 2), which joins its cgroups, takes its rlimits and a throwaway uid, and only
then runs IPython. The init is forked by the nursery, a small process the zygote forks before
its imports, and the kernel by the zygote, into the init's namespaces: the zygote's address
space is copied into the kernel only, not into the init as well. The zygote reaps the kernel
and tells the init how it ended (killed by signal n as 128 + n), which the init passes on once
its namespace is empty; the zygote sends the init's status to the server too, over the
connection the kernel was asked for on.

The zygote runs inside a bubblewrap sandbox where the project tree is not visible, so it runs
this file's source (read from a pipe) rather than importing autocoder: it uses the standard
library only. `sandbox/zygote.py` launches it; `kernel/fork.py` is the server's side.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import functools
import gc
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import types
from typing import Any

# Shared by both sides: the request is one JSON line; fds travel beside it (SCM_RIGHTS).
SOCKET_NAME = "z.sock"  # short: a socket path has at most 107 bytes
MAX_REQUEST = 1 << 20
# Room in the zygote's command line for a forked kernel's own (ps, and autocoder's sweep, find
# kernels by the connection file they name).
TITLE_ROOM = 480

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
MOVE_MOUNT_F_EMPTY_PATH = 4
AT_FDCWD = -100
SYS_MOVE_MOUNT = 429  # the same number on every architecture
PR_SET_PDEATHSIG = 1
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
HUGE_PAGE = 1 << 21
CGROUP_JOIN_TIMEOUT = 30.0
# The init's namespaces the zygote forks the kernel into: the PID namespace first (setns before
# the fork), the others in the kernel (setns after it).
NAMESPACES = ("pid", "mnt", "ipc", "uts", "net")

# What the zygote imports so that a kernel does not: ipykernel's app and what its start pulls in.
# Nothing whose import does per-kernel work: matplotlib_inline hooks into the running IPython
# shell as it is imported, and so must be imported in the kernel.
PRELOAD = (
    "ipykernel.kernelapp",
    "ipykernel.ipkernel",
    "ipykernel.zmqshell",
    "ipykernel.comm",
    "ipykernel.debugger",
    "IPython.core.completerlib",
    "IPython.core.debugger",  # what ipykernel's init_pdb imports: with pdb, bdb, cmd
    "pdb",
    "IPython.core.logger",
    "resource",  # the kernel's rlimits (_kernel)
    "faulthandler",
    "IPython.core.interactiveshell",
    "IPython.core.completer",
    "IPython.core.history",
    "jupyter_client.session",
    "zmq.eventloop.zmqstream",
    "tornado.ioloop",
    "tornado.platform.asyncio",  # what an IOLoop imports on first use
    "jedi",
    "comm",
    "json",
    "ast",
    "traceback",
)

# The data stack, imported once where it is installed (a zygote starts without it): a kernel
# then starts with it loaded, in pages it shares, and a run's `import pandas` costs nothing.
# What of it must differ between kernels, their random state, each kernel seeds anew
# (_reseed); nothing of a run ever reaches the zygote, so matplotlib's figures and rcParams and
# pandas' options start as imported in every kernel. The inline backend (matplotlib_inline)
# is not among them: its import hooks into the running shell, so a kernel imports it itself
# (MPLBACKEND names it) when it first draws, and renders with Agg, imported here.
DATA_STACK = (
    "numpy",
    "pandas",
    "matplotlib",
    "matplotlib.pyplot",
    "matplotlib.backends.backend_agg",
)


# ---------------------------------------------------------------- the zygote (standard library)


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(
    libc: Any,
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    data: str | None = None,
) -> None:
    _check(
        libc.mount(
            None if source is None else source.encode(),
            target.encode(),
            None if fstype is None else fstype.encode(),
            ctypes.c_ulong(flags),
            None if data is None else data.encode(),
        ),
        f"mount {target}",
    )


def _move_mount(libc: Any, fd: int, target: str) -> None:
    """Attach a detached mount (the server's clone of a disk budget) at `target`."""
    _check(
        libc.syscall(
            ctypes.c_long(SYS_MOVE_MOUNT),
            ctypes.c_int(fd),
            b"",
            ctypes.c_int(AT_FDCWD),
            target.encode(),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        ),
        f"move_mount {target}",
    )


def _mirror(status: int) -> int:
    """An exit code that says how a child ended: its code, or 128 + the signal that killed it."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _makedirs(path: str) -> None:
    """Mount points in a fresh tmpfs, traversable by the kernel's uid."""
    parts = path.strip("/").split("/")
    here = ""
    for part in parts:
        here += "/" + part
        with contextlib.suppress(FileExistsError):
            os.mkdir(here, 0o755)


def _view(libc: Any, req: dict[str, Any], roots: list[str], mounts: dict[str, int]) -> None:
    """The kernel's file system: its own workdir and runtime dir, fresh /tmp, /dev/shm and home.

    The zygote sees every run's dirs under `roots`; a tmpfs over each root hides them all, and
    the kernel's two dirs are bound back through fds opened before. A dir the server capped
    (a disk budget, mounted after the zygote started, so not in its view) comes in `mounts`
    instead, as a clone of the server's mount, attached at its path.
    """
    uid, size = req["uid"], req["tmpfs_bytes"]
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    fds = {}
    for key in ("workdir", "runtime_dir"):
        path = req[key]
        if os.path.realpath(path) != path or not _under(path, roots):
            raise OSError(errno.EPERM, f"{path} is not a directory under {roots}")
        if path not in mounts:
            fds[path] = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    if not set(mounts) <= {req["workdir"], req["runtime_dir"]}:
        raise OSError(errno.EPERM, "a mount for another path than the kernel's two dirs")
    hidden = sorted({r for r in roots if not _under(r, ["/tmp"])})
    # The interpreter and its packages may live under what is covered (a venv in /tmp): they
    # are bound back, read-only, as bwrap binds them after its tmpfs mounts.
    covered = ["/tmp", "/dev/shm", req["home"], *hidden]
    python = {
        d: os.open(d, os.O_PATH | os.O_DIRECTORY)
        for d in req["python_dirs"]
        if _under(d, covered) and os.path.isdir(d)
    }
    for root in hidden:
        _mount(libc, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for path, mode, owner in (
        ("/tmp", "1777", 0),
        ("/dev/shm", "1777", 0),
        (req["home"], "0700", uid),
    ):
        _mount(
            libc,
            "tmpfs",
            path,
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            f"mode={mode},uid={owner},gid={owner},size={size}",
        )
    for path, fd in fds.items():
        _makedirs(path)
        _mount(libc, f"/proc/self/fd/{fd}", path, None, MS_BIND)
        os.close(fd)
    for path, fd in mounts.items():
        _makedirs(path)
        _move_mount(libc, fd, path)
        os.close(fd)
    for path, fd in python.items():
        _makedirs(path)
        _mount(libc, f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        _mount(libc, None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    conn = req["connection_file"]
    _mount(libc, conn, conn, None, MS_BIND)
    _mount(libc, None, conn, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for name, text in (("passwd", req["passwd"]), ("group", req["group"])):
        staged = f"/tmp/.{name}"
        with open(staged, "w") as f:
            f.write(text)
        os.chmod(staged, 0o644)
        # The zygote's own is bound from a file bwrap has unlinked, which cannot be mounted over.
        _check(libc.umount2(f"/etc/{name}".encode(), MNT_DETACH), f"umount /etc/{name}")
        _mount(libc, staged, f"/etc/{name}", None, MS_BIND)
        os.unlink(staged)
    for root in hidden:
        _mount(libc, None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _loopback_up() -> None:
    """A new network namespace has its loopback down; bwrap brings it up, and so do we."""
    import fcntl

    iff_up, iff_loopback, iff_running = 0x1, 0x8, 0x40
    siocsifflags = 0x8914
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", iff_up | iff_loopback | iff_running)
        fcntl.ioctl(s, siocsifflags, request)


def _retitle(argv: list[str]) -> None:
    """Name the kernel in /proc/<pid>/cmdline as an exec'd one is named, within the room left."""
    with open("/proc/self/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])
    title = "\0".join(argv).encode()[: end - start - 1]
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(start)
        mem.write(title + b"\0" * (end - start - len(title)))


def _kernel(libc: Any, req: dict[str, Any], stderr_fd: int, joined: int) -> None:
    """PID 2: limits, the throwaway uid, a clean process, then IPython. Never returns.

    IPython starts while the init moves this process into its cgroups (the first move into a
    cgroup waits ~15 ms for the kernel's RCU); it serves nothing, so runs no code, before.
    """
    import random
    import resource

    os.write(joined, str(os.getpid()).encode())  # for the init to move into the cgroups
    os.setsid()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    conn = req["connection_file"]
    argv = [req["python"], "-m", "ipykernel_launcher", "-f", conn]
    _retitle(argv)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(stderr_fd, 2)
    os.dup2(joined, 3)
    os.closerange(4, 1 << 16)
    for name, value in req["rlimits"].items():
        limit = getattr(resource, name)
        _, hard = resource.getrlimit(limit)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(limit, (value, value))
    uid = req["uid"]
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    os.chdir(req["workdir"])
    os.environ.clear()
    os.environ.update(req["env"])
    _reseed(random)
    sys.argv = argv[2:]
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 (the kernel's for its life)
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    sys.path[0] = ""
    if not req["prebuilt"]:
        from ipykernel.zmqshell import ZMQInteractiveShell

        ZMQInteractiveShell.clear_instance()  # built for other kernel args: this kernel builds its own
    code = 0
    try:
        app = _kernel_app().instance()  # the zygote's (_prebuild_app), or a new one
        app.installs = req["installs"]
        app.parsed = req["parsed"]
        app.built_profile = _profile if req["prebuilt"] else None
        app.connection_file = conn
        for handler in app.log.handlers:  # the zygote's stderr had the same fd: now the kernel's
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.__stderr__:
                handler.setStream(sys.stderr)
        app.initialize(["-f", conn, *req["kernel_args"]])
        _await_cgroups(3)
        app.start()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    os._exit(code)


def _reseed(random: Any) -> None:
    """Random state of this kernel's own, from the OS: the zygote's imports seeded `random`
    and numpy's global generator once, and every kernel forked would draw the same numbers.
    (numpy's `default_rng()` and `secrets` draw fresh entropy each time already.)"""
    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()  # None: fresh entropy from the OS


def _await_cgroups(joined: int) -> None:
    """Until the init says this process is in its cgroups (they hold its memory from then on)."""
    ready, _, _ = select.select([joined], [], [], CGROUP_JOIN_TIMEOUT)
    said = os.read(joined, 1) if ready else b""
    os.close(joined)
    if said != b"1":
        raise OSError(errno.ETIMEDOUT, "the kernel's init did not move it into its cgroups")


def _init(req: dict[str, Any], fds: list[int], zygote_alive: int, roots: list[str]) -> None:
    """The nursery's child, PID 1 of a new PID namespace: the kernel's other namespaces and view,
    handed to the zygote, which forks the kernel into them; then it moves the kernel into its
    cgroups, reaps, and ends (taking every process in the namespace) once the zygote says the
    kernel ended. Never returns."""
    code = 1
    try:
        libc = _libc()
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the nursery's has the zygote
        signal.set_wakeup_fd(-1)  # the nursery's
        # Its parent is outside its PID namespace (getppid() is 0 here): the zygote's end of
        # the pipe closes, and this end reads end-of-file, when the zygote is gone.
        if select.select([zygote_alive], [], [], 0)[0]:
            os._exit(1)
        wake_r, wake_w = os.pipe()  # the nursery's was closed with its other fds
        for sig in (signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        # A namespace's init only gets the signals it handles; SIGTERM ends it, as it ends an
        # exec'd kernel's bwrap (SIGKILL always does).
        signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))
        os.setsid()
        # The server's connection, the zygote's control socket, the kernel's cgroup join; then
        # the server's fds: stderr, a clone of each capped dir (req["mounts"]), the cgroups.
        conn = socket.socket(fileno=fds[0])
        ctl = socket.socket(fileno=fds[1])
        joined, stderr_fd, rest = fds[2], fds[3], fds[4:]
        # The credentials carry this process's pid (1 here); the server reads its own view.
        creds = struct.pack("iII", os.getpid(), 0, 0)
        conn.sendmsg([b"forked\n"], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])
        if len(rest) < len(req["mounts"]):
            raise OSError(errno.EINVAL, "fewer mounts sent than the request names")
        mounts = dict(zip(req["mounts"], rest[: len(req["mounts"])], strict=True))
        cgroup_fds = rest[len(req["mounts"]) :]
        keep = {*fds, wake_r, wake_w}
        low = 3  # every other fd closed: the nursery's socket, anything else inherited
        for fd in sorted(keep):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 16)
        os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
        flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
        if not req["allow_network"]:
            flags |= CLONE_NEWNET
        _check(libc.unshare(flags), "unshare")
        if not req["allow_network"]:
            _loopback_up()
        _view(libc, req, roots, mounts)
        _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        libc.sethostname(b"sandbox", 7)
        namespaces = [os.open(f"/proc/self/ns/{name}", os.O_RDONLY) for name in NAMESPACES]
        socket.send_fds(ctl, [b"ready"], namespaces)
        for fd in namespaces:
            os.close(fd)
        # Reaped from here on: what the kernel leaves behind is reparented to this process.
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        _join_cgroups(joined, cgroup_fds)
        code = _until_kernel_ends(ctl, wake_r)
        _end_namespace()
        # Said here, once nothing of the kernel's runs, rather than by the zygote once this
        # process is gone: its exit tears down the kernel's mounts, ~10 ms (an RCU grace
        # period) that a run waiting to keep its files need not wait for.
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
    except BaseException as e:
        with contextlib.suppress(BaseException):
            os.write(2, f"autocoder.forkserver: the kernel could not start: {e}\n".encode())
    os._exit(code)


def _join_cgroups(joined: int, cgroup_fds: list[int]) -> None:
    """Move the kernel, once it says its pid, and this process into the kernel's cgroups, then
    tell the kernel (which starts IPython meanwhile and serves nothing before). Best effort,
    as the exec'd launcher's: a cgroup that cannot be joined is skipped. A kernel that is
    never forked (its socket closes) leaves nothing to move."""
    said = b""
    if select.select([joined], [], [], CGROUP_JOIN_TIMEOUT)[0]:
        with contextlib.suppress(OSError):
            said = os.read(joined, 32)
    if said.strip().isdigit():
        for fd in cgroup_fds:
            with contextlib.suppress(OSError):
                os.write(fd, said.strip())
            with contextlib.suppress(OSError):
                os.write(fd, b"0")
        with contextlib.suppress(OSError):
            os.write(joined, b"1")
    for fd in (*cgroup_fds, joined):
        os.close(fd)


def _until_kernel_ends(ctl: socket.socket, wake: int) -> int:
    """Reap (orphans of the kernel's come here) until the zygote, the kernel's parent, says how
    the kernel ended; 1 when the zygote is gone without saying."""
    while True:
        ready, _, _ = select.select([ctl.fileno(), wake], [], [])
        if wake in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake, 4096)
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
        if ctl.fileno() in ready:
            try:
                said = ctl.recv(64)
            except OSError:
                said = b""
            with contextlib.suppress(ValueError, TypeError):
                return int(json.loads(said)["exit"])
            return 1


def _end_namespace() -> None:
    """SIGKILL to every other process of this PID namespace, until none is left to reap.

    Again after each one reaped: a process its parent was forking as the signal went out
    can miss it, and would be reparented here."""
    while True:
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)  # from a namespace's init: all of it but the init
        try:
            os.wait()
        except ChildProcessError:
            return


@functools.cache
def _kernel_app() -> Any:
    """ipykernel's app, which installs autocoder's modules from what the zygote defined.

    An exec'd kernel gets them as `exec_lines`: IPython then hashes, tokenizes and compiles
    each ~10 KB cell, twice, ~30 ms of every start, and runs its definitions. Here each source
    is compiled and defined once per zygote, and a kernel only makes the install call, where
    the exec lines would run, before any other.
    """
    from ipykernel.kernelapp import IPKernelApp
    from traitlets import Any as AnyTrait
    from traitlets import List

    class ForkedKernelApp(IPKernelApp):  # type: ignore[misc]
        installs: Any = List(AnyTrait())
        # (config, extra args) of the kernel args and the config files, read in the zygote
        parsed: Any = AnyTrait(None)
        # (ProfileDir, what it is on disk) built in the zygote's new home, or None
        built_profile: Any = AnyTrait(None)

        def parse_command_line(self, argv: Any = None) -> None:
            if self.parsed is None:
                return super().parse_command_line(argv)  # type: ignore[no-any-return]
            config, extra = self.parsed
            self.argv = list(argv or [])
            self.cli_config = copy.deepcopy(config)
            self.cli_config.IPKernelApp.connection_file = self.connection_file
            self.update_config(self.cli_config)
            self.extra_args = list(extra)
            return None

        def init_profile_dir(self) -> None:
            """The zygote's ProfileDir, the same path in every kernel's new home, whose dirs and
            files are made here as IPython made them there: IPython's search for it, its traits
            and checks were ~300 pages copied per kernel (~2 ms)."""
            if self.built_profile is None:
                return super().init_profile_dir()  # type: ignore[no-any-return]
            built, tree = self.built_profile
            for path, mode, data in tree:
                if data is None:
                    os.mkdir(path, mode)
                    continue
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                try:
                    while data:
                        data = data[os.write(fd, data) :]
                finally:
                    os.close(fd)
            self.profile_dir = built
            self.config_file_paths.append(built.location)
            return None

        def init_config_files(self) -> None:
            if self.parsed is None:
                super().init_config_files()

        def load_config_file(self, *args: Any, **kwargs: Any) -> None:
            """The zygote read them (the paths are the same for every kernel: the profile in a
            new, empty home and the system's dirs), and the kernel args are parsed with them."""
            if self.parsed is None:
                super().load_config_file(*args, **kwargs)

        def write_connection_file(self, **kwargs: Any) -> None:
            """The server wrote it (its keys never pass through the zygote) with the kernel's
            ipc paths: there is nothing to add, and it is mounted read-only."""

        def init_heartbeat(self) -> None:
            """None: the server's client never opens the heartbeat channel (whether a kernel
            lives comes from its process), and each kernel made and ended for it a zmq
            context of its own and three threads."""

        def init_kernel(self) -> None:
            from ipykernel.zmqshell import ZMQInteractiveShell

            built: Any = ZMQInteractiveShell._instance
            with _modules_listed(self):
                super().init_kernel()  # the kernel takes the shell instance there is
            shell: Any = self.kernel.shell
            if shell is not built:
                return
            shell.kernel = shell.parent = self.kernel
            shell.profile_dir = self.profile_dir
            shell.starting_dir = os.getcwd()
            shell.sys_excepthook = sys.excepthook
            shell.init_environment()
            shell.save_sys_module_state()
            shell.history_manager.reset(new_session=True)  # this kernel's time and cwd

        def init_code(self) -> None:
            shell: Any = self.shell
            for namespace, call in self.installs:
                namespace["get_ipython"] = shell.get_ipython
                try:
                    exec(call, namespace)
                except Exception:
                    name = namespace["__name__"]
                    self.log.warning("autocoder could not install %s", name, exc_info=True)
            with _modules_known():
                super().init_code()

    return ForkedKernelApp


class _NoModules(types.ModuleType):
    """`sys` with an empty `modules`, for IPythonKernel.__init__: see _modules_listed."""

    modules: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(sys, name)


_module_files: list[str] | None = None  # each module's file, listed once in the zygote
_module_names: set[str] | None = None  # the names in sys.modules, once in the zygote


def _list_modules() -> None:
    """What IPythonKernel lists of sys.modules (each module's file, for its debugger), and
    what IPython keeps of it (the names, for `%reset --aggressive`), once."""
    global _module_files, _module_names
    _module_names = set(sys.modules)
    # New strings, made together: a kernel that reads them writes to few pages.
    _module_files = [
        file.encode().decode()
        for module in sys.modules.copy().values()
        if isinstance(file := getattr(module, "__file__", None), str) and file
    ]


@contextlib.contextmanager
def _modules_listed(app: Any) -> Any:
    """IPythonKernel.__init__ asks every module in sys.modules for its file: each ask writes
    to the module object's page, ~800 of them copied per kernel (3 MiB, ~4 ms). It is given
    no modules to ask, then the zygote's list, which is the same but for the few modules a
    kernel imports at start; the list itself is shared, never copied."""
    import ipykernel.ipkernel

    if _module_files is None or getattr(ipykernel.ipkernel, "sys", None) is not sys:
        yield
        return
    ipykernel.ipkernel.sys = _NoModules("sys")  # type: ignore[assignment]
    try:
        yield
    finally:
        ipykernel.ipkernel.sys = sys
    kernel = app.kernel
    kernel._kernel_modules = _module_files
    if getattr(kernel, "debugger", None) is not None:
        kernel.debugger.kernel_modules = _module_files


@contextlib.contextmanager
def _modules_known() -> Any:
    """IPython's init_code ends with `set(sys.modules.keys())`, the modules a kernel started
    with: each name's count written, ~350 pages copied per kernel (~1.2 ms). While the kernel
    has the zygote's modules and no other, that set is the zygote's, given as it is."""
    import IPython.core.shellapp as shellapp

    names = _module_names
    if names is None or len(sys.modules) != len(names) or "set" in vars(shellapp):
        yield
        return
    shellapp.set = lambda keys: names  # type: ignore[attr-defined]  # its one call of set()
    try:
        yield
    finally:
        del shellapp.set  # type: ignore[attr-defined]


def _prebuild_shell(kernel_args: list[str]) -> None:
    """An IPython shell, built once in the zygote, that each forked kernel takes as its own.

    Building it is most of ipykernel's start (magics, history, completer: ~25 ms). Nothing has
    run in it, and each kernel has its copy-on-write copy; what of it names the process (its
    kernel, profile dir, working dir, environment, sys streams, history session) is set anew
    in the kernel (ForkedKernelApp.init_kernel). Built with the config of `kernel_args`; a
    kernel asked for with other args builds its own.
    """
    from ipykernel.compiler import XCachingCompiler
    from ipykernel.zmqshell import ZMQInteractiveShell

    global _shell_args, _profile
    config = _parse_args(kernel_args)[0]
    shell: Any = ZMQInteractiveShell.instance(
        config=copy.deepcopy(config), compiler_class=XCachingCompiler
    )
    # The extensions every kernel loads (storemagic): the kernel's load finds them loaded.
    for name in _kernel_app()().default_extensions:
        shell.extension_manager.load_extension(name)
    import threading

    if threading.active_count() != 1:  # a thread does not survive the fork: never fork one
        ZMQInteractiveShell.clear_instance()
        raise RuntimeError("building the shell started a thread")
    # Its profile dir, as IPython and the shell made it in the zygote's new home: a kernel's
    # home is new too, and the path the same.
    _profile = (shell.profile_dir, _tree(os.path.dirname(shell.profile_dir.location)))
    _shell_args = tuple(kernel_args)


def _prebuild_app() -> None:
    """The kernel's app, made once in the zygote: making it and its logging (a dictConfig)
    was ~2 ms and ~300 pages copied per kernel. Nothing of a kernel's is in it yet; each
    kernel sets its own (its installs, config, profile and connection file) before initialize."""
    app = _kernel_app().instance()
    app.log.debug("the kernel's app, built in the zygote")  # its logging configured


def _huge_pages() -> None:
    """The zygote's heap and other large anonymous regions in 2 MiB pages, where the kernel
    has transparent huge pages (`madvise` mode or `always`; MADV_COLLAPSE since Linux 6.1).

    Every fork of a kernel copies the page table entries of the zygote's anonymous memory
    (~95 MiB once the data stack is imported), and every kernel's exit frees them: a huge
    page is one entry where there were 512. A kernel that writes to one gets its 4 KiB page
    copied as before (the kernel splits the mapping in the child), so it holds no more memory.
    Best effort: where it cannot be done, the zygote keeps its small pages."""
    libc = _libc()
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            # Anonymous (no file, or the heap) and private-writable: what a fork copies.
            if fields[1] != "rw-p" or (len(fields) > 5 and fields[5] != "[heap]"):
                continue
            start, end = (int(address, 16) for address in fields[0].split("-"))
            start = (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
            end &= ~(HUGE_PAGE - 1)
            if end > start:
                libc.madvise(start, end - start, MADV_HUGEPAGE)
                libc.madvise(start, end - start, MADV_COLLAPSE)


def _import_data_stack() -> None:
    """DATA_STACK, each where it is installed; one that is missing or fails is left to the
    kernels, which import it themselves (as an exec'd kernel does), and the zygote starts."""
    import importlib.util

    for name in DATA_STACK:
        top = name.partition(".")[0]
        if top not in sys.modules and importlib.util.find_spec(top) is None:
            continue
        try:
            __import__(name)
        except Exception as e:
            sys.stderr.write(f"autocoder.forkserver: {name} not preloaded: {e!r}\n")


def _warm_up() -> None:
    """Caches every kernel fills on its first execute (tokenizer patterns, IPython's cell
    transforms), filled once here: pure functions of the code, no state of any kernel."""
    import ast

    from IPython.core.inputtransformer2 import TransformerManager

    cell = TransformerManager().transform_cell("x = 1\nprint(x)\n")
    compile(ast.parse(cell), "<warm-up>", "exec")


_shell_args: tuple[str, ...] | None = None  # the kernel args the zygote's shell is built for
_parsed: dict[tuple[str, ...], Any] = {}
_profile: tuple[Any, list[tuple[str, int, bytes | None]]] | None = None


def _tree(root: str) -> list[tuple[str, int, bytes | None]]:
    """Each dir (content None) and file under `root`, with its mode, parents first."""
    found: list[tuple[str, int, bytes | None]] = []
    if not os.path.isdir(root):
        return found
    found.append((root, os.stat(root).st_mode & 0o7777, None))
    for here, dirs, files in os.walk(root):
        dirs.sort()
        for name in dirs:
            path = os.path.join(here, name)
            found.append((path, os.stat(path).st_mode & 0o7777, None))
        for name in sorted(files):
            path = os.path.join(here, name)
            with open(path, "rb") as f:
                found.append((path, os.stat(path).st_mode & 0o7777, f.read()))
    return found


def _parse_args(argv: list[str]) -> Any:
    """A kernel's config as ipykernel would read it (~15 ms of argparse and file searches),
    once per zygote: its command line over the config files of a new profile and the system."""
    key = tuple(argv)
    if key not in _parsed:
        if len(_parsed) >= 16:
            _parsed.clear()
        app = _kernel_app()()
        app.parse_command_line(list(argv))
        app.init_profile_dir()
        app.init_config_files()
        app.load_config_file()
        _parsed[key] = (copy.deepcopy(app.config), list(app.extra_args))
    return _parsed[key]


_defined: dict[tuple[str, str, str], dict[str, Any]] = {}
_calls: dict[tuple[str, str], Any] = {}


def _define_installs(installs: list[list[str]]) -> list[tuple[dict[str, Any], Any]]:
    """Each (name, file name, source, call) of a request as (the module's namespace, the call
    compiled), once per zygote. The sources only define (functions, classes, constants of
    autocoder's own); what depends on the kernel happens in the call, in each kernel."""
    out = []
    for name, filename, source, call in installs:
        key = (name, filename, source)
        if key not in _defined:
            if len(_defined) >= 16:  # a few versions at most; never grows without bound
                _defined.clear()
                _calls.clear()
            namespace: dict[str, Any] = {"__name__": name}
            exec(compile(source, filename, "exec"), namespace)
            _defined[key] = namespace
            gc.freeze()  # shared like the imported modules: no kernel's collector walks them
        if (filename, call) not in _calls:
            _calls[filename, call] = compile(call, filename, "exec")
        out.append((_defined[key], _calls[filename, call]))
    return out


def _recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds = b"", []
    fd_size = struct.calcsize("i")
    while not data.endswith(b"\n"):
        chunk, ancdata, _, _ = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(16 * fd_size))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += list(
                    struct.unpack(
                        f"{len(payload) // fd_size}i",
                        payload[: len(payload) - len(payload) % fd_size],
                    )
                )
        if not chunk:
            raise EOFError("the server closed the connection before its request")
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too large")
    return json.loads(data), fds


def _nursery(sock: socket.socket, zygote_alive: int, roots: list[str]) -> None:
    """The zygote's first child, forked before its imports: it forks each kernel's init.

    An init forked from the zygote was a copy of the zygote's address space (the data stack's
    and IPython's pages), its page tables copied at the fork and freed at the init's exit, and
    copied once more as it forked the kernel: ~10 ms of CPU per kernel for a process that only
    builds namespaces and reaps. Forked from here it is a copy of a small process, and the
    zygote forks the kernel itself, into the init's namespaces. Never returns."""
    libc = _libc()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if select.select([zygote_alive], [], [], 0)[0]:
        os._exit(1)  # the zygote died before the parent-death signal was set
    # unshare(CLONE_NEWPID) works once per namespace its children go to: going back to the
    # nursery's own first makes it work for every init.
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    inits: dict[int, int] = {}  # an init's pid: the zygote's number for its kernel
    while True:
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if sock.fileno() in ready:
            message, fds, _, _ = socket.recv_fds(sock, 1 << 16, 64)
            if not message:
                os._exit(0)  # the zygote is gone
            said = json.loads(message)
            if "kill" in said:
                for pid, ident in inits.items():
                    if ident == said["kill"]:
                        os.kill(pid, signal.SIGKILL)  # not reaped yet: still the init
                continue
            try:
                # The next child is PID 1 of a new PID namespace (the nursery stays in its own).
                _check(libc.setns(own_pid_ns, CLONE_NEWPID), "setns")
                _check(libc.unshare(CLONE_NEWPID), "unshare")
                pid = os.fork()
            except OSError as e:
                os.write(2, f"autocoder.forkserver: no init forked: {e}\n".encode())
                pid = -1
            if pid == 0:
                _init(said["req"], fds, zygote_alive, roots)
            for fd in fds:
                os.close(fd)
            if pid < 0:
                sock.send(json.dumps({"id": said["id"], "exit": 1}).encode())
            else:
                inits[pid] = said["id"]
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in inits:
                code = os.waitstatus_to_exitcode(status)
                sock.send(json.dumps({"id": inits.pop(pid), "exit": code}).encode())


# What of a request the init needs (the rest is the kernel's, which the zygote keeps).
_INIT_KEYS = (
    "workdir",
    "runtime_dir",
    "mounts",
    "connection_file",
    "uid",
    "home",
    "tmpfs_bytes",
    "passwd",
    "group",
    "allow_network",
    "python_dirs",
)


class _Start:
    """A kernel the server asked the zygote for, from the request until its init is gone."""

    def __init__(
        self, ident: int, conn: socket.socket, ctl: socket.socket, req: dict[str, Any]
    ) -> None:
        self.ident = ident
        self.conn = conn  # the server's: it closes it to end the kernel; the exit is said on it
        self.ctl: socket.socket | None = ctl  # to the init: its namespaces come, the exit goes
        self.req = req
        self.stderr: int | None = None  # the kernel's, until it is forked
        self.joined: int | None = None  # the kernel's end of its cgroup join, until forked
        self.kernel: int | None = None  # its pid here, once forked


def _fork_kernel(libc: Any, start: _Start, namespaces: list[int], own_pid_ns: int) -> int:
    """The kernel, a child of the zygote's in the init's namespaces (NAMESPACES' order).

    The zygote's child keeps the zygote's pages copy-on-write, the one copy of its address
    space a kernel needs; it is PID 2 of the init's PID namespace, so the init's death (or
    its SIGKILL to the namespace) takes it and everything it started."""
    _check(libc.setns(namespaces[0], CLONE_NEWPID), "setns pid")
    try:
        pid = os.fork()
    except OSError:
        libc.setns(own_pid_ns, CLONE_NEWPID)
        raise
    if pid == 0:
        assert start.stderr is not None and start.joined is not None
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for fd, name in zip(namespaces[1:], NAMESPACES[1:], strict=True):
                _check(libc.setns(fd, 0), f"setns {name}")
            _kernel(libc, start.req, start.stderr, start.joined)
        except BaseException as e:
            with contextlib.suppress(BaseException):
                os.write(
                    start.stderr,
                    f"autocoder.forkserver: the kernel could not start: {e}\n".encode(),
                )
        os._exit(1)
    libc.setns(own_pid_ns, CLONE_NEWPID)
    return pid


def _readable(sock: socket.socket) -> bool:
    """Whether `sock` has something to read (or is closed) now: an event of a batch may be for
    an fd that an earlier one closed and a new connection took."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def serve(directory: str, roots: list[str], lifeline: int, kernel_args: list[str]) -> None:
    """The zygote: fork the nursery, preload, listen, fork a kernel per request (the nursery
    its init), report how each ended."""
    # Each init reads end-of-file here once the zygote is gone (the write end is only ever
    # open in the zygote).
    alive_r, alive_w = os.pipe()
    to_nursery, nursery_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    nursery = os.fork()
    if nursery == 0:
        os.close(alive_w)
        to_nursery.close()
        _nursery(nursery_end, alive_r, roots)
    nursery_end.close()
    os.close(alive_r)
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(name)
    _import_data_stack()
    try:
        _prebuild_shell(kernel_args)
        _prebuild_app()
        _warm_up()
    except Exception as e:  # kernels then build their own shell, as an exec'd one does
        sys.stderr.write(f"autocoder.forkserver: no shell built ahead: {e!r}\n")
    _list_modules()
    gc.collect()
    gc.freeze()  # the imported modules' objects stay shared: the collector never writes them
    _huge_pages()  # last: what the zygote allocates from here on is small
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staged = os.path.join(directory, ".z")
    listener.bind(staged)
    listener.listen(64)
    os.rename(staged, os.path.join(directory, SOCKET_NAME))  # ready once it has its name
    starts: dict[int, _Start] = {}  # by number, until the nursery says its init is gone
    by_fd: dict[int, _Start] = {}  # by the fd of its connection or of its init's socket
    kernels: dict[int, _Start] = {}  # by the kernel's pid, until it is reaped
    libc = _libc()
    # The zygote's children go to an init's PID namespace only while it forks a kernel.
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    poller = select.poll()
    for fd in (listener.fileno(), wake_r, lifeline, to_nursery.fileno()):
        poller.register(fd, select.POLLIN)

    def watch(start: _Start, sock: socket.socket) -> None:
        by_fd[sock.fileno()] = start
        poller.register(sock, select.POLLIN)

    def unwatch(sock: socket.socket) -> None:
        if by_fd.pop(sock.fileno(), None) is not None:
            poller.unregister(sock)

    def close_ctl(start: _Start) -> None:
        if start.ctl is not None:
            unwatch(start.ctl)
            start.ctl.close()
            start.ctl = None
        for fd in (start.stderr, start.joined):
            if fd is not None:
                os.close(fd)
        start.stderr = start.joined = None

    def ended(start: _Start, code: int) -> None:
        """The init is gone: say so to the server, which then sees the kernel end."""
        close_ctl(start)
        with contextlib.suppress(OSError):
            start.conn.settimeout(1)
            start.conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
        unwatch(start.conn)
        start.conn.close()

    def begin(ident: int, conn: socket.socket, req: dict[str, Any], fds: list[int]) -> None:
        """Ask the nursery for the kernel's init; the kernel comes once the init is ready."""
        ctl, init_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        joined, init_joined = socket.socketpair()
        start = _Start(ident, conn, ctl, req)
        try:
            if not fds:
                raise OSError(errno.EINVAL, "no stderr sent")
            req["installs"] = _define_installs(req["installs"])
            req["parsed"] = _parse_args(req["kernel_args"])
            req["prebuilt"] = tuple(req["kernel_args"]) == _shell_args
            message = {"id": ident, "req": {key: req[key] for key in _INIT_KEYS}}
            sent = [conn.fileno(), init_ctl.fileno(), init_joined.fileno(), *fds]
            socket.send_fds(to_nursery, [json.dumps(message).encode()], sent)
        except Exception:  # a bad request fails its own kernel, never the zygote
            for fd in fds:
                os.close(fd)
            for sock in (conn, ctl, joined):
                sock.close()
            return
        finally:
            init_ctl.close()
            init_joined.close()
        for fd in fds[1:]:  # the mounts' and cgroups' are the init's
            os.close(fd)
        start.stderr, start.joined = fds[0], joined.detach()
        starts[ident] = start
        watch(start, conn)
        watch(start, ctl)

    def ready(start: _Start) -> None:
        """The init's namespaces are ready (or the init is gone): fork the kernel into them."""
        assert start.ctl is not None
        namespaces: list[int] = []
        message = b""
        if start.kernel is None:
            with contextlib.suppress(OSError):
                message, namespaces, _, _ = socket.recv_fds(start.ctl, 64, len(NAMESPACES))
        try:
            if message != b"ready" or len(namespaces) != len(NAMESPACES):
                close_ctl(start)  # the init is gone: the nursery says how it ended
                return
            try:
                start.kernel = _fork_kernel(libc, start, namespaces, own_pid_ns)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.write(start.stderr or 2, f"autocoder.forkserver: {e}\n".encode())
                    start.ctl.send(json.dumps({"exit": 1}).encode())
                close_ctl(start)
                return
            kernels[start.kernel] = start
            for fd in (start.stderr, start.joined):
                if fd is not None:
                    os.close(fd)
            start.stderr = start.joined = None
        finally:
            for fd in namespaces:
                os.close(fd)

    next_id = 0
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == lifeline:
                for pid in kernels:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                os._exit(0)  # the server is gone; the nursery and the inits go with this process
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                continue
            if fd == listener.fileno():
                conn, _ = listener.accept()
                try:
                    conn.settimeout(5)
                    req, fds = _recv_request(conn)
                except (OSError, ValueError, EOFError):
                    conn.close()
                    continue
                next_id += 1
                begin(next_id, conn, req, fds)
                continue
            if fd == to_nursery.fileno():
                message = to_nursery.recv(4096)
                if not message:  # no init can be forked any more: the server starts another
                    for pid in kernels:
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
                    os._exit(1)
                said = json.loads(message)
                start = starts.pop(said["id"], None)
                if start is not None:
                    ended(start, said["exit"])
                continue
            start = by_fd.get(fd)
            if start is None:
                continue
            if start.ctl is not None and fd == start.ctl.fileno():
                if _readable(start.ctl):
                    ready(start)
                continue
            if not _readable(start.conn):
                continue
            # The server's connection: readable only when the server closed it (or asks a kill).
            unwatch(start.conn)
            if start.kernel in kernels:
                with contextlib.suppress(OSError):
                    os.kill(start.kernel, signal.SIGKILL)  # not reaped yet: still the kernel
            to_nursery.send(json.dumps({"kill": start.ident}).encode())
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == nursery:
                os._exit(1)
            start = kernels.pop(pid, None)
            if start is not None and start.ctl is not None:
                # The kernel's status, for its init to say once its namespace is empty.
                with contextlib.suppress(OSError):
                    start.ctl.send(json.dumps({"exit": _mirror(status)}).encode())
                close_ctl(start)

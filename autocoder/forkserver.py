"""Fresh sandboxed kernels forked from a zygote that has already imported ipykernel.

A kernel's start is mostly Python importing IPython, ipykernel, zmq and their kin again. The
zygote is one long-lived process per kernel environment that imports them once (and nothing of
the user's, no secret: it is started with the sandbox's clean environment) and, on request,
forks a child that becomes a fresh kernel. docs/sandbox.md has the design and its threat model.

Two processes per kernel, as bwrap has them: an init, forked by the zygote into a new PID
namespace (PID 1 there), that makes new mount, IPC, UTS and network namespaces, builds the
kernel's file system view and reaps; the kernel (PID 2), which joins its cgroups, takes its
rlimits and a throwaway uid, and only then runs IPython. The init passes on how the kernel
ended (killed by signal n as 128 + n), and the zygote sends the init's status to the server
over the connection the kernel was asked for on.

The zygote runs inside a bubblewrap sandbox where the project tree is not visible, so it runs
this file's source (read from a pipe) rather than importing autocoder: the code that runs in
the zygote uses the standard library only; the server's side imports autocoder lazily.
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
import time
import types
from typing import Any

from jupyter_client.provisioning import LocalProvisioner

# Shared by both sides: the request is one JSON line; fds travel beside it (SCM_RIGHTS).
SOCKET_NAME = "z.sock"  # short: a socket path has at most 107 bytes
ZYGOTE_PREFIX = "acz-"
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
CGROUP_JOIN_TIMEOUT = 30.0

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
    random.seed()
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


def _await_cgroups(joined: int) -> None:
    """Until the init says this process is in its cgroups (they hold its memory from then on)."""
    ready, _, _ = select.select([joined], [], [], CGROUP_JOIN_TIMEOUT)
    said = os.read(joined, 1) if ready else b""
    os.close(joined)
    if said != b"1":
        raise OSError(errno.ETIMEDOUT, "the kernel's init did not move it into its cgroups")


def _init(
    req: dict[str, Any], fds: list[int], conn: socket.socket, zygote_alive: int, roots: list[str]
) -> None:
    """The zygote's child, PID 1 of a new PID namespace: the kernel's other namespaces and view,
    then the kernel. Reaps, and ends (taking every process in the namespace) with the kernel.
    Never returns."""
    code = 1
    try:
        libc = _libc()
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # Its parent is outside its PID namespace (getppid() is 0 here): the zygote's end of
        # the pipe closes, and this end reads end-of-file, when the zygote is gone.
        if select.select([zygote_alive], [], [], 0)[0]:
            os._exit(1)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for sig in (signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        # A namespace's init only gets the signals it handles; SIGTERM ends it, as it ends an
        # exec'd kernel's bwrap (SIGKILL always does).
        signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))
        os.setsid()
        # The credentials carry this process's pid (1 here); the server reads its own view.
        creds = struct.pack("iII", os.getpid(), 0, 0)
        conn.sendmsg([b"forked\n"], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])
        # The server's fds: stderr, a clone of each capped dir (req["mounts"]), the cgroups.
        stderr_fd, rest = fds[0], fds[1:]
        if len(rest) < len(req["mounts"]):
            raise OSError(errno.EINVAL, "fewer mounts sent than the request names")
        mounts = dict(zip(req["mounts"], rest[: len(req["mounts"])], strict=True))
        cgroup_fds = rest[len(req["mounts"]) :]
        low = 3  # every other fd closed: the zygote's listener, its other kernels' connections
        for fd in sorted({stderr_fd, *mounts.values(), *cgroup_fds, conn.fileno()}):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 16)
        os.dup2(stderr_fd, 2)
        flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
        if not req["allow_network"]:
            flags |= CLONE_NEWNET
        _check(libc.unshare(flags), "unshare")
        if not req["allow_network"]:
            _loopback_up()
        _view(libc, req, roots, mounts)
        _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        libc.sethostname(b"sandbox", 7)
        joined_r, joined_w = os.pipe()
        kernel = os.fork()
        if kernel == 0:
            os.close(joined_w)
            for fd in cgroup_fds:
                os.close(fd)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _kernel(libc, req, stderr_fd, joined_r)
        os.close(joined_r)
        os.close(stderr_fd)
        # Best effort, as the exec'd launcher's: a cgroup that cannot be joined is skipped.
        for fd in cgroup_fds:
            with contextlib.suppress(OSError):
                os.write(fd, str(kernel).encode())
            with contextlib.suppress(OSError):
                os.write(fd, b"0")
            os.close(fd)
        os.write(joined_w, b"1")
        os.close(joined_w)
        while True:
            pid, status = os.wait()
            if pid == kernel:
                code = _mirror(status)
                break
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


def serve(directory: str, roots: list[str], lifeline: int, kernel_args: list[str]) -> None:
    """The zygote: preload, listen, fork a kernel per request, report how each ended."""
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(name)
    try:
        _prebuild_shell(kernel_args)
        _prebuild_app()
        _warm_up()
    except Exception as e:  # kernels then build their own shell, as an exec'd one does
        sys.stderr.write(f"autocoder.forkserver: no shell built ahead: {e!r}\n")
    _list_modules()
    gc.collect()
    gc.freeze()  # the imported modules' objects stay shared: the collector never writes them
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
    kernels: dict[int, socket.socket] = {}
    by_conn: dict[socket.socket, int] = {}
    libc = _libc()
    # Each kernel's init reads end-of-file here once the zygote is gone (its write end is
    # only ever open in the zygote).
    alive_r, alive_w = os.pipe()
    # unshare(CLONE_NEWPID) works once per namespace its children go to: going back to the
    # zygote's own first makes it work for every kernel.
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    poller.register(lifeline, select.POLLIN)
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
                os._exit(0)  # the server is gone
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
                try:
                    req["installs"] = _define_installs(req["installs"])
                    req["parsed"] = _parse_args(req["kernel_args"])
                    req["prebuilt"] = tuple(req["kernel_args"]) == _shell_args
                    # The next child is PID 1 of a new PID namespace (the zygote stays in its own).
                    _check(libc.setns(own_pid_ns, CLONE_NEWPID), "setns")
                    _check(libc.unshare(CLONE_NEWPID), "unshare")
                except Exception:  # a bad request fails its own kernel, never the zygote
                    for received in fds:
                        os.close(received)
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    os.close(alive_w)
                    _init(req, fds, conn, alive_r, roots)
                for received in fds:
                    os.close(received)
                kernels[pid] = conn
                by_conn[conn] = pid
                poller.register(conn, select.POLLIN)
                continue
            # A kernel's connection: readable only when the server closed it (or asks a kill).
            closed = next((c for c in by_conn if c.fileno() == fd), None)
            if closed is not None:
                with contextlib.suppress(OSError):
                    os.kill(by_conn[closed], signal.SIGKILL)
                poller.unregister(closed)
                by_conn.pop(closed)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            ended = kernels.pop(pid, None)
            if ended is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):
                ended.settimeout(1)
                ended.sendall(json.dumps({"exit": code}).encode() + b"\n")
            if by_conn.pop(ended, None) is not None:
                poller.unregister(ended)
            ended.close()


# ---------------------------------------------------------------- the server's side

ZYGOTE_START_TIMEOUT = 60.0
FORK_TIMEOUT = 30.0
KILL_REPORT_TIMEOUT = 5.0  # jupyter_client's own wait for a killed kernel
KILL_INIT_AFTER = 1.0  # a killed kernel's init reports within ms; past this it is killed too
CGROUP_EMPTY_TIMEOUT = 2.0
UID_FORK_BASE = 0x0100_0000  # above every pid, so never a uid of an exec'd kernel (UID_BASE + pid)

# The zygote's parameters and this file's source come through a pipe, not its command line, and
# bwrap's arguments too (--args): no process of the zygote names a run's dirs.
_BOOT = (
    "import json, os, sys\n"
    "fd = int(sys.argv[1]); data = b''\n"
    "while chunk := os.read(fd, 65536):\n"
    "    data += chunk\n"
    "os.close(fd)\n"
    "params, source = data.split(b'\\n', 1)\n"
    "zygote = {'__name__': 'autocoder_zygote'}\n"
    "exec(compile(source, 'autocoder/forkserver.py', 'exec'), zygote)\n"
    "zygote['serve'](**json.loads(params))\n"
)


def why_not(settings: Any) -> str | None:
    """Why kernels cannot be forked here (then they are exec'd), or None when they can."""
    from autocoder import sandbox

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


def _roots(settings: Any) -> list[str]:
    """The host dirs whose runs' dirs the zygote must reach: the temp dir and the work root."""
    import tempfile

    from autocoder.kernel import workdirs_root

    work = workdirs_root(settings)
    work.mkdir(parents=True, exist_ok=True)
    found = sorted({os.path.realpath(tempfile.gettempdir()), os.path.realpath(work)})
    return [r for r in found if not _under(r, [o for o in found if o != r])]


class ForkedProcess:
    """The `process` of a forked kernel, as jupyter_client and KernelSession use a Popen.

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
                import subprocess

                raise subprocess.TimeoutExpired(f"forked kernel {self.pid}", timeout or 0)
            select.select([self.conn], [], [], 0.05)
        assert self.returncode is not None
        return self.returncode

    async def ended(self, timeout: float) -> int | None:
        """Its exit status once the zygote reports it (within `timeout`), or None.

        jupyter_client polls a killed kernel every 0.1 s; the report comes on the connection.
        """
        import asyncio

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
        import shutil
        import subprocess
        import tempfile
        from pathlib import Path

        from autocoder import sandbox
        from autocoder.kernel import owner_tag

        self.close()
        self.directory = tempfile.mkdtemp(prefix=f"{ZYGOTE_PREFIX}{owner_tag()}-")
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            sandbox.PARENT_PID_VAR: str(os.getpid()),
            sandbox.LIFELINE_VAR: str(sandbox.lifeline()),
        }
        argv = [
            sys.executable,
            "-m",
            "autocoder.forkserver",
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
        import asyncio

        from autocoder.errors import KernelStartError

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
        import array
        import asyncio

        from autocoder.errors import KernelStartError

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
        import asyncio

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
        import shutil

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
    KernelSession's interrupt, timeout escalation, death detection and replace are unchanged.
    """

    settings: Any = None
    _forked: ForkedProcess | None = None
    _cgroups: list[str] = []

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        """Fork the kernel when the zygote listens; exec it (as LocalProvisioner does) until then.

        The zygote is started when this process asks for its second kernel, or at once to
        replace one that died: a one-off run (`autocoder run`) would pay its imports for nothing.
        """
        from autocoder.errors import KernelStartError

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
                logging.getLogger("autocoder.kernel").warning("%s; exec'd instead", e)
        return await super().launch_kernel(cmd, **kwargs)

    async def _fork(self, zygote: Zygote, **kwargs: Any) -> Any:
        from autocoder import sandbox

        settings = self.settings
        env = kwargs.get("env") or {}
        workdir = os.path.realpath(env[sandbox.WORKDIR_VAR])
        runtime_dir = os.path.realpath(env[sandbox.RUNTIME_DIR_VAR])
        assert self.parent is not None
        connection_file = os.path.realpath(self.parent.connection_file)
        uid = _allocate_uid()
        from pathlib import Path

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
        import asyncio

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
    from pathlib import Path

    from autocoder import disk
    from autocoder.errors import KernelStartError

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
    from autocoder import sandbox

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


def _cgroups(settings: Any, uid: int) -> tuple[list[str], list[int]]:
    """Best effort, as the exec'd launcher does: memory and pids cgroups for the kernel's tree.

    Returns the dirs made and an open cgroup.procs of each, which the kernel's init writes the
    kernel and itself into while IPython starts, before the kernel serves."""
    from autocoder import sandbox

    wanted = sandbox.cgroup_limits(settings.memory_mb, settings.max_processes + 1)
    # The kernel joins once IPython is up: what it allocated by then moves in with it.
    wanted["memory"]["memory.move_charge_at_immigrate"] = 1
    made: list[str] = []
    fds: list[int] = []
    for mine in sandbox.make_cgroups(f"f{uid}", wanted):
        made.append(str(mine))
        with contextlib.suppress(OSError):
            fds.append(os.open(mine / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
    return made, fds


@functools.cache
def _installs(max_output_bytes: int) -> list[tuple[str, str, str, str]]:
    """What the launcher gives ipykernel under bwrap as exec_lines, read once: our sources."""
    from autocoder import asserts, output_cap

    found = (asserts.install_source(), output_cap.install_source(max_output_bytes))
    return [install for install in found if install is not None]


@functools.cache
def _exec_instead(reason: str) -> None:
    logging.getLogger("autocoder.kernel").warning(
        "kernels start by exec, not fork: %s", reason.splitlines()[0] if reason else reason
    )


def _resolve(future: Any) -> None:
    if not future.done():
        future.set_result(None)


_zygotes: dict[tuple[bool, tuple[str, ...]], Zygote] = {}


def zygote_for(settings: Any) -> Zygote:
    """This process's zygote for kernels of `settings` (one per environment, like the lifeline)."""
    roots = _roots(settings)
    key = (bool(settings.allow_network), tuple(roots))
    if key not in _zygotes:
        _zygotes[key] = Zygote(settings.allow_network, roots)
    return _zygotes[key]


def close_all() -> None:
    for zygote in list(_zygotes.values()):
        zygote.close()


def main(argv: list[str] | None = None) -> None:
    """The zygote's launcher (outside the sandbox): bind to the server, then exec bwrap."""
    import shutil
    from pathlib import Path

    from autocoder import sandbox

    sandbox.bind_to_parent()
    args = sys.argv[1:] if argv is None else argv
    directory, roots = args[0], json.loads(args[1])
    allow_network = "--network" in args[2:]
    lifeline = os.environ.get(sandbox.LIFELINE_VAR, "")
    if not lifeline.isdigit():
        sys.exit("autocoder.forkserver: no lifeline; start the zygote through Zygote")
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    params = json.dumps(
        {
            "directory": directory,
            "roots": roots,
            "lifeline": int(lifeline),
            "kernel_args": sandbox.BWRAP_KERNEL_ARGS,
        }
    )
    fds = [
        sandbox.data_fd(params + "\n" + source),
        sandbox.data_fd(sandbox.passwd_text(0)),
        sandbox.data_fd(sandbox.group_text(0)),
    ]
    a = ["--die-with-parent", "--new-session"]
    a += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", "sandbox"]
    a += ["--unshare-cgroup-try"]
    if not allow_network:
        a += ["--unshare-net"]
    a += ["--cap-drop", "ALL"]
    for cap in (
        "CAP_SYS_ADMIN",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_NET_ADMIN",
    ):
        a += ["--cap-add", cap]
    a += sandbox.system_mounts(allow_network)
    a += sandbox.parent_dirs(Path(sandbox.SANDBOX_HOME))
    for path, mode in (("/tmp", "1777"), ("/dev/shm", "1777"), (sandbox.SANDBOX_HOME, "0700")):
        a += ["--perms", mode, "--size", str(1 << 20), "--tmpfs", path]
    a += sandbox.ro_bind_args(sandbox.python_dirs(None))
    for root in roots:
        a += sandbox.parent_dirs(Path(root))
        a += ["--bind", root, root]
    for data_fd, name in zip(fds[1:], ("/etc/passwd", "/etc/group"), strict=True):
        a += ["--perms", "0644", "--ro-bind-data", str(data_fd), name]
    a += ["--remount-ro", "/", "--chdir", "/", "--clearenv"]
    for key, value in sandbox.inner_env().items():
        a += ["--setenv", key, value]
    a += ["--setenv", "PYDEVD_DISABLE_FILE_VALIDATION", "1"]  # debugpy, preloaded, warns otherwise
    options_fd = sandbox.data_fd("".join(arg + "\0" for arg in a))
    for fd in (*fds, options_fd):
        os.set_inheritable(fd, True)
    bwrap = shutil.which("bwrap") or "bwrap"
    command = [sys.executable, "-c", _BOOT, str(fds[0]), " " * TITLE_ROOM]
    os.execv(bwrap, [bwrap, "--args", str(options_fd), "--", *command])


if __name__ == "__main__":
    main()

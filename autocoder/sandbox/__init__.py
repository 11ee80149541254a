"""Launch a kernel confined (bubblewrap, rlimits, cgroups) or plain: `python -m autocoder.sandbox`.

Contract used by kernel.py:
- `kernel_env(settings, workdir, runtime_dir) -> dict[str, str]`: the whole environment the
  launcher is started with. It carries the limits (AUTOCODER_*) and never a secret.
- `check_available(settings) -> None`: raises SandboxUnavailable with one clear line.
- `main(argv)`: the launcher; applies the limits and execs ipykernel (under bwrap when --sandbox bwrap).

Under bwrap the kernel sees a read-only system and Python installation, its workdir and runtime dir
(connection file + IPC sockets) read-write, a private /tmp and home, no network, its own PID, IPC
and UTS namespaces, and an environment built from scratch. Root ignores RLIMIT_NPROC, so a root
server runs each kernel as its own throwaway uid (UID_BASE + launcher pid): the process limit then
holds, and a kernel cannot signal or read another kernel. Where the v1 memory and pids cgroups are
writable, the kernel's whole process tree is also bounded in total memory and tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import logging
import os
import resource
import shutil
import signal
import site
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, NoReturn

from autocoder.errors import ConfigError, SandboxUnavailable
from autocoder.inside import asserts, output_cap, supervisor
from autocoder.inside.supervisor import die_with_parent, is_pipe
from autocoder.sandbox.cgroups import cgroup_limits, make_cgroups, remove_when_gone

if TYPE_CHECKING:  # pydantic-settings costs the launcher ~300 ms; it reads its env instead.
    from autocoder.config import Settings

log = logging.getLogger(__name__)

KERNEL_ARGS = ["--HistoryManager.hist_file=:memory:"]
# Under a PID namespace the kernel's parent is the namespace's init; 1 turns the parent poller off.
BWRAP_KERNEL_ARGS = [*KERNEL_ARGS, "--IPKernelApp.parent_handle=1"]

UID_BASE = 0x7000_0000
SANDBOX_HOME = "/home/sandbox"
PROBE_TIMEOUT = 15.0

WORKDIR_VAR = "AUTOCODER_SANDBOX_WORKDIR"
RUNTIME_DIR_VAR = "AUTOCODER_SANDBOX_RUNTIME_DIR"
PARENT_PID_VAR = "AUTOCODER_PARENT_PID"
LIFELINE_VAR = "AUTOCODER_LIFELINE_FD"
_LIMIT_FIELDS = ("memory_mb", "cpu_seconds", "max_processes", "max_open_files", "max_file_mb")
_PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "TZ")

# Only what ordinary Python needs from /etc: never environment, pip.conf, npmrc, gitconfig, shadow.
_ETC = (
    "alternatives",
    "ca-certificates",
    "ca-certificates.conf",
    "crypto-policies",
    "debian_version",
    "fonts",
    "gai.conf",
    "host.conf",
    "hosts",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "localtime",
    "magic",
    "matplotlibrc",
    "mime.types",
    "networks",
    "nsswitch.conf",
    "os-release",
    "pki",
    "protocols",
    "services",
    "ssl",
    "timezone",
)

# Runs as root inside the sandbox with CAP_SETUID/SETGID/CHOWN only; setuid() then clears them all.
# It, not bwrap, enters the workdir: without CAP_DAC_OVERRIDE root cannot enter a 0700 dir of uid.
_DROP_TO_UID = """\
import os, sys
uid = int(sys.argv[1])
os.chown(sys.argv[2], uid, uid)
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
os.chdir(sys.argv[3])
os.execv(sys.argv[4], sys.argv[4:])
"""


class Limits(NamedTuple):
    """What the launcher needs of the settings, as plain data (a NamedTuple: dataclasses
    would cost the launcher the import of inspect).

    kernel_env writes these as the same AUTOCODER_* variables Settings reads, so Settings stays
    the one place that names and defaults them; the launcher only parses them back.
    """

    memory_mb: int
    cpu_seconds: int
    max_processes: int
    max_open_files: int
    max_file_mb: int
    allow_network: bool = False
    kernel_python: Path | None = None
    # A kernelspec's own address-space limit (--address-space-mb); never read from the env.
    address_space_mb: int | None = None

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(
            settings.memory_mb,
            settings.cpu_seconds,
            settings.max_processes,
            settings.max_open_files,
            settings.max_file_mb,
            settings.allow_network,
            settings.kernel_python,
        )

    def env(self) -> dict[str, str]:
        env = {f"AUTOCODER_{field.upper()}": str(getattr(self, field)) for field in _LIMIT_FIELDS}
        env["AUTOCODER_ALLOW_NETWORK"] = "1" if self.allow_network else "0"
        if self.kernel_python is not None:
            env["AUTOCODER_KERNEL_PYTHON"] = str(self.kernel_python)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Limits:
        """The limits kernel_env passed; from Settings when a launcher was started without it
        (the installed kernelspecs, from Jupyter)."""
        try:
            memory, cpu, processes, files, file_mb = (
                int(env[f"AUTOCODER_{field.upper()}"]) for field in _LIMIT_FIELDS
            )
        except (KeyError, ValueError):
            # Start-up time: the launcher does without pydantic-settings (docs/security.md).
            from autocoder.config import load_settings

            return cls.of(load_settings())
        python = env.get("AUTOCODER_KERNEL_PYTHON")
        return cls(
            memory,
            cpu,
            processes,
            files,
            file_mb,
            allow_network=env.get("AUTOCODER_ALLOW_NETWORK") == "1",
            kernel_python=Path(python) if python else None,
        )


def kernel_env(settings: Settings, workdir: Path, runtime_dir: Path) -> dict[str, str]:
    """The launcher's whole environment: a whitelist, the limits, and where the run's dirs are."""
    env = {k: os.environ[k] for k in _PASSTHROUGH if k in os.environ}
    env.setdefault("PATH", os.defpath)
    env["HOME"] = str(runtime_dir / "home")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        env["PYTHONUSERBASE"] = site.getuserbase()
    env["PYTHONUNBUFFERED"] = "1"
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env["AUTOCODER_SANDBOX"] = settings.sandbox
    env.update(Limits.of(settings).env())
    env[output_cap.LIMIT_VAR] = str(settings.max_output_bytes)
    env[WORKDIR_VAR] = str(workdir)
    env[RUNTIME_DIR_VAR] = str(runtime_dir)
    # The launcher checks it is still this process's child once it has its parent-death signal.
    env[PARENT_PID_VAR] = str(os.getpid())
    env[LIFELINE_VAR] = str(lifeline())
    return env


@functools.cache
def lifeline() -> int:
    """The read end of a pipe whose write end only this process holds, for every kernel to inherit.

    It reads as end-of-file once this process is gone, however it died. That covers the one
    window parent-death signals leave: bwrap's sandboxed child sets its own only after clone,
    so a server killed in between leaves it running. The kernel looks before any user code runs.
    """
    read_end, _write_end = os.pipe()  # both close-on-exec; the write end is never closed
    os.set_inheritable(read_end, True)
    return read_end


def install_line(found: tuple[str, str, str, str] | None) -> str:
    """An `exec_lines` entry that defines one of autocoder's kernel modules from its
    `install_source()` (asserts.py, output_cap.py) and makes its install call; "pass" for none."""
    if found is None:
        return "pass"
    name, filename, source, call = found
    code = f"{source}\n{call}\n"
    return (
        f"exec(compile({code!r}, {filename!r}, 'exec'), "
        f"{{'__name__': {name!r}, 'get_ipython': get_ipython}})"
    )


def kernel_exec_lines(max_output_bytes: int | None = None) -> list[str]:
    """IPython `exec_lines` that install autocoder's kernel modules (inside/asserts.py, and
    inside/output_cap.py with the limit from AUTOCODER_MAX_OUTPUT_BYTES, set by kernel_env):
    what a kernel image's ipython_kernel_config.py carries on a gateway (docs/scale.md)."""
    found = (asserts.install_source(), output_cap.install_source(max_output_bytes))
    return [install_line(install) for install in found]


def _lifeline_line(fd: int) -> str:
    """An `exec_lines` entry: a kernel whose server is already gone exits before it serves.

    It runs in a namespace of its own, and leaves alone an fd that is not a pipe (a kernel
    started with the variable but not the pipe)."""
    code = (
        "import os, select, stat\n"
        "try:\n"
        f"    pipe = stat.S_ISFIFO(os.fstat({fd}).st_mode)\n"
        "except OSError:\n"
        "    pipe = False\n"
        "if pipe:\n"
        f"    if select.select([{fd}], [], [], 0)[0]:\n"
        "        os._exit(1)\n"
        f"    os.close({fd})\n"
    )
    return f"exec({code!r}, {{}})"


def check_available(settings: Settings) -> None:
    """Fail fast, in one line, when the configured sandbox cannot run here. Probes once per
    process. (Kernels from a gateway are confined there: kernel.gateway checks the gateway.)"""
    if settings.kernel_python is not None:
        _check_kernel_python(str(settings.kernel_python))
    if settings.sandbox == "none":
        _warn_unconfined()
        return
    problem = _probe_bwrap(settings.allow_network)
    if problem:
        raise SandboxUnavailable(
            f"sandbox unavailable: {problem}; install bubblewrap (and enable user namespaces when "
            "not root), or set AUTOCODER_SANDBOX=none to run generated code unconfined"
        )


@functools.cache
def _warn_unconfined() -> None:
    log.warning(
        "AUTOCODER_SANDBOX=none: generated code runs unconfined, as this user, with only "
        "rlimits; it can read this server's own /proc/%d/environ (OPENAI_API_KEY and every "
        "other secret in it) and anything else this user can",
        os.getpid(),
    )


@functools.cache
def _probe_bwrap(allow_network: bool) -> str | None:
    """Run the real sandbox setup around `python -c pass`; None when it works, else why not."""
    if shutil.which("bwrap") is None:
        return "bwrap (package bubblewrap) is not on PATH"
    from autocoder.config import load_settings  # start-up time, as in Limits.from_env

    limits = Limits.of(load_settings(sandbox="bwrap", allow_network=allow_network))
    uid = dedicated_uid()
    with tempfile.TemporaryDirectory(prefix="autocoder-probe-") as tmp:
        workdir, runtime_dir = Path(tmp, "work"), Path(tmp, "run")
        workdir.mkdir(mode=0o700)
        runtime_dir.mkdir(mode=0o700)
        if uid is not None:
            hand_over([workdir, runtime_dir], uid)
        argv, fds = _bwrap_argv(
            limits, workdir, runtime_dir, None, [sys.executable, "-c", "pass"], uid
        )
        try:
            done = subprocess.run(
                argv,
                pass_fds=fds,
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"bwrap did not finish a trivial command within {PROBE_TIMEOUT:.0f}s"
        finally:
            for fd in fds:
                os.close(fd)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return f"bwrap failed ({lines[-1] if lines else f'exit {done.returncode}'})"
    return None


def main(argv: list[str] | None = None) -> None:
    """Apply the limits and start the kernel: ipykernel by default, any kernel's argv after `--`."""
    bind_to_parent()
    p = argparse.ArgumentParser(prog="python -m autocoder.sandbox")
    p.add_argument("--sandbox", choices=["bwrap", "none"], default="bwrap")
    p.add_argument("-f", dest="connection_file", required=True)
    p.add_argument(
        "--ro-bind", action="append", default=[], metavar="PATH", help="also visible, read-only"
    )
    p.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="set for the kernel"
    )
    p.add_argument(
        "--forward-interrupt",
        action="store_true",
        help="stay resident and pass SIGINT on to the kernel (for interrupt_mode signal)",
    )
    p.add_argument(
        "--tcp-relay",
        action="store_true",
        help="the kernel speaks TCP only: relay its ports to the IPC sockets, network still cut",
    )
    p.add_argument(
        "--address-space-mb",
        type=int,
        metavar="MB",
        help="this kernel's address-space limit instead of AUTOCODER_MEMORY_MB (0: none; "
        "for runtimes that reserve far more than they use, as V8 does)",
    )
    p.add_argument("kernel", nargs="*", help="the kernel's argv (after --); ipykernel when none")
    args = p.parse_args(argv)
    settings = Limits.from_env(os.environ)
    connection_file = Path(args.connection_file).resolve()
    if args.kernel:
        _main_other(args, settings, connection_file)
    python = str(settings.kernel_python or sys.executable)
    lifeline = os.environ.get(LIFELINE_VAR, "")
    exec_lines = [_lifeline_line(int(lifeline))] if lifeline.isdigit() else []
    exec_lines += kernel_exec_lines()
    kernel = [
        *(python, "-m", "ipykernel_launcher", "-f", str(connection_file)),
        *(f"--IPKernelApp.exec_lines={line}" for line in exec_lines),
    ]
    if args.sandbox == "none":
        _exec_unconfined(settings, [*kernel, *KERNEL_ARGS])
    workdir, runtime_dir = _run_dirs()
    _check_connection(connection_file, runtime_dir, settings.allow_network)
    uid = dedicated_uid()
    if uid is not None:
        hand_over([workdir, runtime_dir], uid)
        _join_cgroups(settings)
    cmd, fds = _bwrap_argv(
        settings, workdir, runtime_dir, connection_file, [*kernel, *BWRAP_KERNEL_ARGS], uid
    )
    for fd in fds:
        os.set_inheritable(fd, True)
    _apply_limits(settings, dedicated_uid=uid is not None)
    try:
        os.execv(cmd[0], cmd)
    except OSError as e:
        sys.exit(f"autocoder.sandbox: cannot exec {cmd[0]}: {e}")


def _run_dirs() -> tuple[Path, Path]:
    try:
        return (
            Path(os.environ[WORKDIR_VAR]).resolve(),
            Path(os.environ[RUNTIME_DIR_VAR]).resolve(),
        )
    except KeyError as e:
        sys.exit(f"autocoder.sandbox: {e.args[0]} is not set; start the launcher with kernel_env()")


def _main_other(args: argparse.Namespace, limits: Limits, connection_file: Path) -> NoReturn:
    """Any kernel's argv, under the same confinement as ipykernel's, with the options its
    kernelspec names. A supervisor (supervisor.py) stays beside the kernel when the kernel
    needs interrupts forwarded or its TCP relayed; with --forward-interrupt this launcher
    stays resident too, since Jupyter's SIGINT would otherwise hit bwrap and end the sandbox."""
    extra_env = dict(_expand(item, limits).partition("=")[::2] for item in args.env if "=" in item)
    if args.address_space_mb is not None:
        limits = limits._replace(address_space_mb=args.address_space_mb)
    argv = _resolve_argv(args.kernel, limits)
    binds = [Path(p) for p in args.ro_bind if Path(p).exists()]
    program = Path(argv[0]).resolve()
    if not program.is_relative_to("/usr") and not program.is_relative_to(sys.prefix):
        binds.append(program.parent)  # a kernel installed outside /usr (a local npm prefix)
    lifeline = os.environ.get(LIFELINE_VAR, "")
    if args.sandbox == "none":
        if args.tcp_relay:
            argv = _supervised(argv, connection_file, relay=True, lifeline=lifeline)
        os.environ.update(extra_env)
        _exec_unconfined(limits, argv)
    workdir, runtime_dir = _run_dirs()
    _check_connection(connection_file, runtime_dir, limits.allow_network)
    interrupt_r = interrupt_w = None
    if args.forward_interrupt:
        interrupt_r, interrupt_w = os.pipe()
    if args.forward_interrupt or args.tcp_relay:
        argv = _supervised(
            argv, connection_file, relay=args.tcp_relay, lifeline=lifeline, interrupt_fd=interrupt_r
        )
    uid = dedicated_uid()
    if uid is not None:
        hand_over([workdir, runtime_dir], uid)
        _join_cgroups(limits)
    cmd, fds = _bwrap_argv(
        limits, workdir, runtime_dir, connection_file, argv, uid, ro_binds=binds, env=extra_env
    )
    if interrupt_r is not None:
        fds.append(interrupt_r)
    if lifeline.isdigit() and is_pipe(int(lifeline)):
        fds.append(int(lifeline))  # bwrap's own child is started with only the fds named
    for fd in fds:
        os.set_inheritable(fd, True)
    _apply_limits(limits, dedicated_uid=uid is not None)
    if interrupt_w is None:
        try:
            os.execv(cmd[0], cmd)
        except OSError as e:
            sys.exit(f"autocoder.sandbox: cannot exec {cmd[0]}: {e}")
    _stay_resident(cmd, fds, interrupt_w)


def _stay_resident(cmd: list[str], fds: list[int], interrupt_w: int) -> NoReturn:
    """Run bwrap as a child in its own process group, and turn each SIGINT into a byte the
    supervisor inside reads; end with bwrap's status. SIGTERM ends bwrap (and the sandbox).

    The handlers are in place before bwrap starts (exec gives bwrap the default ones back),
    so an interrupt that comes early is passed on too, never the end of the kernel."""
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            os.write(interrupt_w, b"i")

    def stop(signum: int, frame: object) -> None:
        if child is None:
            os._exit(128 + signum)
        with contextlib.suppress(OSError):
            child.kill()

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, stop)
    try:
        child = subprocess.Popen(
            cmd,
            pass_fds=fds,
            start_new_session=True,
            preexec_fn=die_with_parent,
            # bwrap's parent is this launcher: a sweep (kernel.sweep_leftovers) must not take
            # it for one whose server is gone.
            env={**os.environ, PARENT_PID_VAR: str(os.getpid())},
        )
    except OSError as e:
        sys.exit(f"autocoder.sandbox: cannot start {cmd[0]}: {e}")
    for fd in fds:
        os.close(fd)
    code = child.wait()
    os._exit(128 - code if code < 0 else code)


def _expand(text: str, limits: Limits) -> str:
    """`{memory_mb}` in a kernelspec's --env values: the kernel's own heap flag can follow the
    setting (Deno's V8 heap, when its address space cannot be limited)."""
    return text.replace("{memory_mb}", str(limits.memory_mb))


def _resolve_argv(argv: list[str], limits: Limits) -> list[str]:
    """argv[0] as an absolute path (R finds its home from it); `python` is ours."""
    first = argv[0]
    if first == "python":
        first = str(limits.kernel_python or sys.executable)
    elif "/" not in first:
        found = shutil.which(first)
        if found is None:
            sys.exit(f"autocoder.sandbox: the kernel's program {first!r} is not on PATH")
        first = found
    return [first, *argv[1:]]


def _supervised(
    argv: list[str],
    connection_file: Path,
    *,
    relay: bool,
    lifeline: str = "",
    interrupt_fd: int | None = None,
) -> list[str]:
    """argv run under supervisor.py, with the standard library only (-I -S)."""
    source = Path(supervisor.__file__).read_text(encoding="utf-8")
    cmd = [sys.executable, "-I", "-S", "-c", source]
    if interrupt_fd is not None:
        cmd += ["--interrupt-fd", str(interrupt_fd)]
    if lifeline.isdigit():
        cmd += ["--lifeline", lifeline]
    if relay:
        cmd += ["--relay", str(connection_file)]
    return [*cmd, "--", *argv]


def dedicated_uid() -> int | None:
    """The throwaway uid for this kernel, when we are root and that uid exists here.

    Root inside a user namespace (a rootless container) usually has few uids mapped; it then
    takes the unprivileged path like any other user.
    """
    if os.geteuid() != 0:
        return None
    uid = UID_BASE + os.getpid()
    for line in Path("/proc/self/uid_map").read_text().splitlines():
        inside, _, count = (int(n) for n in line.split())
        if inside <= uid < inside + count:
            return uid
    return None


def _exec_unconfined(limits: Limits, cmd: list[str]) -> NoReturn:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOCODER_")}
    env.update(_resource_env())
    Path(env["HOME"]).mkdir(parents=True, exist_ok=True)
    _apply_limits(limits, dedicated_uid=False)
    os.execve(cmd[0], cmd, env)


def bind_to_parent() -> None:
    """Die with the server, whenever it dies, from the launcher's first instruction on.

    PR_SET_PDEATHSIG survives exec (into bwrap or the kernel) and fires when the thread that
    started us exits. A server killed before we set it has already handed us to init, so we
    then check that our parent is still the process that started us, and go if it is not.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    expected = os.environ.get(PARENT_PID_VAR)
    if expected is not None and os.getppid() != int(expected):
        os._exit(1)


def _check_connection(connection_file: Path, runtime_dir: Path, allow_network: bool) -> None:
    """Only the runtime dir is shared with the sandbox, so everything the kernel binds must live there."""
    if not connection_file.is_relative_to(runtime_dir):
        sys.exit(f"autocoder.sandbox: connection file {connection_file} is outside {runtime_dir}")
    info = json.loads(connection_file.read_text())
    if info.get("transport") == "ipc":
        if not Path(info["ip"]).resolve().is_relative_to(runtime_dir):
            sys.exit(f"autocoder.sandbox: IPC path {info['ip']} is outside {runtime_dir}")
    elif not allow_network:
        sys.exit(
            "autocoder.sandbox: the sandbox has no network; start the kernel with transport='ipc'"
        )


def _limits(limits: Limits, nproc: int) -> dict[int, int]:
    mib = 2**20
    return {
        resource.RLIMIT_AS: _address_space(limits),
        resource.RLIMIT_CPU: limits.cpu_seconds,
        resource.RLIMIT_NPROC: nproc,
        resource.RLIMIT_NOFILE: limits.max_open_files,
        resource.RLIMIT_FSIZE: limits.max_file_mb * mib,
        resource.RLIMIT_CORE: 0,
    }


def _address_space(limits: Limits) -> int:
    mb = limits.memory_mb if limits.address_space_mb is None else limits.address_space_mb
    return mb * 2**20 if mb > 0 else resource.RLIM_INFINITY


def _apply_limits(limits: Limits, dedicated_uid: bool) -> None:
    """Soft = hard, so the kernel cannot raise them back."""
    nproc = limits.max_processes
    if not dedicated_uid:
        nproc += _tasks_of(os.getuid())
    for kind, value in _limits(limits, nproc).items():
        _, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = hard if value == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))


def _tasks_of(uid: int) -> int:
    """RLIMIT_NPROC counts every task (thread) of the real uid, so a shared uid needs headroom."""
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count


def hand_over(dirs: Iterable[Path], uid: int) -> None:
    """Give the kernel's uid its dirs, including files an earlier kernel of the same run left.

    fwalk with dir fds and no symlink following, so a planted symlink cannot redirect the chown.
    """
    for top in dirs:
        os.chown(top, uid, uid, follow_symlinks=False)
        for _, dirnames, filenames, dirfd in os.fwalk(top, follow_symlinks=False):
            for name in (*dirnames, *filenames):
                os.chown(name, uid, uid, dir_fd=dirfd, follow_symlinks=False)


def _bwrap_argv(
    limits: Limits,
    workdir: Path,
    runtime_dir: Path,
    connection_file: Path | None,
    command: list[str],
    uid: int | None,
    *,
    ro_binds: Sequence[Path] = (),
    env: Mapping[str, str] | None = None,
) -> tuple[list[str], list[int]]:
    """The bwrap command line and the fds it reads (synthetic /etc/passwd and /etc/group).

    uid None: bwrap runs unprivileged in a user namespace. Otherwise bwrap runs as root, keeps
    only the caps the uid drop needs (root bwrap would otherwise keep ALL caps), and the kernel
    runs as `uid` with nothing.
    """
    a = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--new-session"]
    a += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", "sandbox"]
    a += ["--unshare-cgroup-try"]
    if not limits.allow_network:
        a += ["--unshare-net"]
    if uid is None:
        a += ["--unshare-user", "--disable-userns"]
    else:
        a += ["--cap-drop", "ALL"]
        a += [
            arg for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_CHOWN") for arg in ("--cap-add", cap)
        ]
    a += system_mounts(limits.allow_network)
    tmpfs_bytes = str(limits.memory_mb * 2**20)
    a += parent_dirs(Path(SANDBOX_HOME))
    for path, mode in (("/tmp", "1777"), ("/dev/shm", "1777"), (SANDBOX_HOME, "0700")):
        a += ["--perms", mode, "--size", tmpfs_bytes, "--tmpfs", path]
    # After the tmpfs mounts, so a venv under /tmp stays visible.
    a += ro_bind_args(python_dirs(limits.kernel_python) + [Path(p) for p in ro_binds])
    a += parent_dirs(workdir, runtime_dir)
    a += ["--bind", str(workdir), str(workdir), "--bind", str(runtime_dir), str(runtime_dir)]
    if connection_file is not None:
        a += ["--ro-bind", str(connection_file), str(connection_file)]
    inner_uid = uid if uid is not None else os.getuid()
    fds = [data_fd(passwd_text(inner_uid)), data_fd(group_text(inner_uid))]
    for fd, name in zip(fds, ("/etc/passwd", "/etc/group"), strict=True):
        a += ["--perms", "0644", "--ro-bind-data", str(fd), name]
    a += ["--remount-ro", "/"]
    a += ["--clearenv"] if uid is not None else ["--chdir", str(workdir), "--clearenv"]
    for key, value in {**inner_env(), **(env or {})}.items():
        a += ["--setenv", key, value]
    a += ["--"]
    if uid is not None:
        a += [sys.executable, "-I", "-S", "-c", _DROP_TO_UID, str(uid), SANDBOX_HOME, str(workdir)]
    return a + command, fds


def system_mounts(allow_network: bool) -> list[str]:
    a = [
        "--ro-bind",
        "/usr",
        "/usr",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        *parent_dirs(Path("/etc/x")),
    ]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        top = Path("/", name)
        if top.is_symlink():
            a += ["--symlink", os.readlink(top), str(top)]
        elif top.is_dir():
            a += ["--ro-bind", str(top), str(top)]
    for name in (*_ETC, *(("resolv.conf",) if allow_network else ())):
        a += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    return a


def python_dirs(kernel_python: Path | None = None) -> list[Path]:
    """The interpreter and its packages, wherever they live (a venv, pyenv under /root, /opt),
    and those of AUTOCODER_KERNEL_PYTHON when the kernels run with another one.

    The user site is on sys.path only when kernel_env passed PYTHONUSERBASE; only it is bound,
    never the rest of that home.
    """
    found = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        *site.getsitepackages(),
    }
    found |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    if kernel_python is not None:
        found |= set(_prefixes_of(str(kernel_python)))
        found.add(str(Path(kernel_python).resolve().parent.parent))
    dirs = sorted({Path(p).resolve() for p in found if Path(p).is_dir()})
    outside_usr = [d for d in dirs if not d.is_relative_to("/usr")]
    return [d for d in outside_usr if not any(d != o and d.is_relative_to(o) for o in outside_usr)]


_PREFIXES = (
    "import site, sys; print('\\n'.join([sys.prefix, sys.base_prefix, sys.exec_prefix, "
    "sys.base_exec_prefix, *site.getsitepackages(), *[p for p in sys.path if p]]))"
)


def _prefixes_of(python: str) -> list[str]:
    """Where another interpreter keeps itself and its packages (asked once per launcher)."""
    try:
        out = subprocess.run(
            [python, "-I", "-c", _PREFIXES], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in out.stdout.splitlines() if line.startswith("/")]


@functools.cache
def _check_kernel_python(python: str) -> None:
    """One line unless AUTOCODER_KERNEL_PYTHON runs and has ipykernel (asked once per process)."""
    try:
        out = subprocess.run(
            [python, "-I", "-c", "import ipykernel"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"AUTOCODER_KERNEL_PYTHON={python} cannot be run: {e}") from None
    if out.returncode != 0:
        raise ConfigError(
            f"AUTOCODER_KERNEL_PYTHON={python} cannot import ipykernel "
            f"(install it there: {python} -m pip install ipykernel)"
        )


def ro_bind_args(dirs: list[Path]) -> list[str]:
    a = parent_dirs(*dirs)
    for d in dirs:
        a += ["--ro-bind", str(d), str(d)]
    return a


def parent_dirs(*paths: Path) -> list[str]:
    """bwrap creates missing parents 0700 when run as root; make them traversable."""
    a: list[str] = []
    for path in paths:
        for parent in reversed(path.parents[:-1]):
            if str(parent) not in a and str(parent) not in ("/tmp", "/usr", "/dev"):
                a += ["--perms", "0755", "--dir", str(parent)]
    return a


def _resource_env() -> dict[str, str]:
    """What keeps an idle kernel small in address space and threads, confined or not."""
    threads = str(min(os.cpu_count() or 1, 4))
    return {
        # glibc reserves 64 MiB of address space per thread arena, which RLIMIT_AS counts.
        "MALLOC_ARENA_MAX": "2",
        # Every thread counts against the process limit; BLAS pools default to one per core.
        "OMP_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
    }


def inner_env() -> dict[str, str]:
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": SANDBOX_HOME,
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "TMPDIR": "/tmp",
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        **_resource_env(),
    }
    for key in ("LC_ALL", "TZ", "PYTHONUSERBASE"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def passwd_text(uid: int) -> str:
    return (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"sandbox:x:{uid}:{uid}:sandbox:{SANDBOX_HOME}:/usr/sbin/nologin\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )


def group_text(gid: int) -> str:
    return f"root:x:0:\nsandbox:x:{gid}:\nnogroup:x:65534:\n"


def data_fd(text: str) -> int:
    """A pipe holding `text`, for bwrap's --ro-bind-data (small, so it fits the pipe buffer)."""
    read, write = os.pipe()
    os.write(write, text.encode())
    os.close(write)
    return read


def _join_cgroups(limits: Limits) -> None:
    """Best effort: bound the whole tree's memory and tasks with cgroup v1, where writable.

    Each kernel gets `<own cgroup>/autocoder/k<pid>`; exec keeps the pid, so that is bwrap's pid.
    A watcher outside the kernel's process group, when bwrap exits, kills what is left in them
    and removes the dirs (so they never block removal of the server's own cgroup); a launch
    also sweeps dirs of pids that are gone.
    pids.max allows for bwrap's two root processes besides the kernel's own.
    """
    made = make_cgroups(
        f"k{os.getpid()}", cgroup_limits(limits.memory_mb, limits.max_processes + 2)
    )
    if not made:
        return
    remove_when_gone(made)
    for mine in made:
        with contextlib.suppress(OSError):
            (mine / "cgroup.procs").write_text(str(os.getpid()))

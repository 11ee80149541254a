"""Nothing autocoder starts or writes outlives it: not after a graceful stop, not after SIGKILL.

A server killed with SIGKILL cannot clean up, so its kernels must die with it on their own,
and the next autocoder to start removes what is left (runtime dirs holding connection keys,
empty workdirs) — but only what a dead autocoder made.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from autocoder.config import Settings
from autocoder.kernel.leftovers import owner_tag, sweep_leftovers, workdirs_root
from autocoder.kernel.pool import KernelPool
from autocoder.records import Event
from autocoder.runner import Runner
from autocoder.sandbox import PARENT_PID_VAR, RUNTIME_DIR_VAR, cgroups
from autocoder.testing import ScriptedLLM, fenced

from .conftest import autocoder_cmd
from .processes import alive, gone_within, processes_naming


def wait_for(what: str, predicate: object, timeout: float = 30) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()  # type: ignore[operator]
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def serve_env(cli_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:
    """`autocoder serve` with a pool of two, its runtime dirs in a temp dir of its own (short:
    IPC socket paths have a length limit)."""
    tmp = tempfile.mkdtemp(dir=tempfile.gettempdir())
    yield {
        **cli_env,
        "TMPDIR": tmp,
        "AUTOCODER_POOL_SIZE": "2",
        "AUTOCODER_NOTEBOOKS_DIR": str(tmp_path / "notebooks"),
        "AUTOCODER_AUTOFILE_DIR": str(tmp_path / "autofile"),
    }
    shutil.rmtree(tmp, ignore_errors=True)


def start_serve(env: dict[str, str], port: int = 0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*autocoder_cmd(), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def servers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for server in started:
        if server.poll() is None:
            server.kill()
            server.wait(10)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("delay", [0.0, 0.02, 0.1, 0.3, 0.8])
def test_a_killed_server_leaves_no_kernel(
    serve_env: dict[str, str], servers: list[subprocess.Popen[bytes]], delay: float
) -> None:
    tmp = serve_env["TMPDIR"]
    server = start_serve(serve_env)
    servers.append(server)
    # The pool's first kernel launcher is on its way: kill the server `delay` seconds later.
    wait_for("a kernel launcher", lambda: processes_naming(tmp))
    time.sleep(delay)
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    assert gone_within(tmp) == []


ORPHANING_LAUNCHER = """
import os, subprocess, sys
from autocoder.sandbox import cgroups
made = cgroups.make_cgroups(f"k{os.getpid()}", cgroups.cgroup_limits(256, 16))
if not made:
    sys.exit(3)
cgroups.remove_when_gone(made)
for d in made:
    (d / "cgroup.procs").write_text(str(os.getpid()))
# bwrap's child, orphaned before its parent-death signal took: it would wait for ever.
quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
child = subprocess.Popen(["sleep", "120"], start_new_session=True, **quiet)
print(child.pid, *made, flush=True)
"""


@pytest.mark.timeout(60)
def test_what_outlives_bwrap_in_a_kernels_cgroups_is_killed_once_bwrap_is_gone() -> None:
    """A server killed as bwrap clones its child can leave that child waiting on bwrap for
    ever, before any parent-death signal or the lifeline could take. The launcher's cgroups
    hold it, and their watcher kills it once bwrap (here, a stand-in) is gone."""
    if os.geteuid() != 0:
        pytest.skip("kernels get cgroups of their own only from a root server")
    done = subprocess.run(
        [sys.executable, "-c", ORPHANING_LAUNCHER], capture_output=True, text=True, timeout=30
    )
    if done.returncode == 3:
        pytest.skip("no writable cgroup v1 controllers here")
    assert done.returncode == 0, done.stderr
    orphan, *dirs = done.stdout.split()
    wait_for("the orphan to be killed", lambda: not alive(int(orphan)), timeout=15)
    wait_for("its cgroups to go", lambda: not any(Path(d).exists() for d in dirs), timeout=15)


@pytest.mark.timeout(120)
def test_the_next_server_sweeps_what_a_dead_one_left(
    serve_env: dict[str, str], servers: list[subprocess.Popen[bytes]]
) -> None:
    tmp = Path(serve_env["TMPDIR"])
    first = start_serve(serve_env)
    servers.append(first)
    wait_for("the pool's kernels", lambda: len(list(tmp.glob("ac-*/kernel.json"))) >= 2)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    left = sorted(tmp.glob("ac-*"))
    assert left, "a SIGKILLed server cannot remove its runtime dirs itself"
    # Stray processes, each naming a connection file: of a dead autocoder (its runtime dir's
    # maker is gone: same pid, another start time), of a launcher whose server is gone, and
    # the same two of live ones, which must be left alone.
    strays = {
        "dead": stray(tmp / f"ac-{os.getpid()}.1-dead", {}),
        "lost": stray(tmp / "ac-lost", {PARENT_PID_VAR: str(first.pid)}),
        "alive": stray(tmp / f"ac-{owner_tag()}-alive", {}),
        "kept": stray(tmp / "ac-kept", {PARENT_PID_VAR: str(os.getpid())}),
    }
    try:
        port = free_port()
        second = start_serve(serve_env, port)
        servers.append(second)
        wait_for("the second server", lambda: answers(port))
        assert not any(d.exists() for d in left)
        for name in ("dead", "lost"):
            assert strays[name].wait(10) == -signal.SIGKILL, name
        for name in ("alive", "kept"):
            assert strays[name].poll() is None, name
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    finally:
        for process in strays.values():
            process.kill()
            process.wait(10)
    assert gone_within(str(tmp)) == []
    assert sorted(p.name for p in tmp.iterdir()) == sorted(["ac-kept", f"ac-{owner_tag()}-alive"])
    work = Path(serve_env["AUTOCODER_AUTOFILE_DIR"]) / ".work"
    assert not work.exists() or list(work.iterdir()) == []


def stray(runtime_dir: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A process that looks like a kernel launcher of `runtime_dir` (and holds its key)."""
    runtime_dir.mkdir(mode=0o700)
    (runtime_dir / "kernel.json").write_text('{"key": "a secret"}')
    env = {**os.environ, RUNTIME_DIR_VAR: str(runtime_dir), **env}
    argv = ["-c", "import time; time.sleep(120)", "-f", f"{runtime_dir}/kernel.json"]
    return subprocess.Popen([sys.executable, *argv], env=env)


def answers(port: int) -> bool:
    """The server answers HTTP: its lifespan, and so its sweep, is done."""
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    except httpx.HTTPError:
        return False
    return True


@pytest.mark.timeout(120)
async def test_a_graceful_stop_leaves_no_directory(settings: Settings) -> None:
    pool = KernelPool(settings, size=2)
    pool.start()
    try:
        deadline = time.monotonic() + 60
        while pool.ready < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert pool.ready == 2
    finally:
        await pool.close()
    assert list(workdirs_root(settings).iterdir()) == []
    assert list(Path(os.environ["TMPDIR"]).glob(f"ac-{owner_tag()}-*")) == []


@pytest.mark.timeout(120)
async def test_a_run_cancelled_while_its_kernel_starts_leaves_no_directory(
    settings: Settings, llm: ScriptedLLM
) -> None:
    llm.script(fenced("print('never runs')"))
    runner = Runner(settings)
    waiting_for_kernel = asyncio.Event()

    def on_event(event: Event) -> None:
        # The model answers at once; a kernel takes far longer to start.
        if event.type == "code_generated":
            waiting_for_kernel.set()

    try:
        run = asyncio.create_task(runner.run("print something", on_event=on_event))
        await asyncio.wait_for(waiting_for_kernel.wait(), 30)
        root = workdirs_root(settings)
        assert any(root.iterdir()), "the run's kernel is not starting"
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
    finally:
        await runner.close()
    assert list(root.iterdir()) == []


def test_a_sweep_spares_live_autocoders(tmp_path: Path) -> None:
    """A runtime dir or workdir whose maker still runs is never touched."""
    work = tmp_path / ".work"
    mine = work / f"{owner_tag()}-0123456789ab"
    mine.mkdir(parents=True)
    stale = work / f"{os.getpid()}.1-0123456789ab"
    stale.mkdir()
    (stale / "out.txt").write_text("left by a killed run")
    other = work / "not-autocoders"
    other.mkdir()
    sweep_leftovers(work)
    assert sorted(p.name for p in work.iterdir()) == sorted([mine.name, other.name])


@pytest.mark.timeout(120)
def test_a_kernel_whose_server_is_already_gone_exits_before_it_serves(
    settings: Settings, tmp_path: Path
) -> None:
    """The window parent-death signals leave (bwrap's sandboxed child sets its own only after
    clone) is closed by the lifeline: a kernel that finds its server's pipe broken exits."""
    from jupyter_client.connect import write_connection_file

    from autocoder.sandbox import LIFELINE_VAR, kernel_env

    workdir, runtime_dir = tmp_path / "work", tmp_path / "run"
    for d in (workdir, runtime_dir):
        d.mkdir(mode=0o700)
    connection_file, _ = write_connection_file(
        str(runtime_dir / "kernel.json"), transport="ipc", ip=str(runtime_dir / "k")
    )
    read_end, write_end = os.pipe()
    os.close(write_end)  # the server that held it is gone
    env = {**kernel_env(settings, workdir, runtime_dir), LIFELINE_VAR: str(read_end)}
    launcher = [sys.executable, "-m", "autocoder.sandbox", "--sandbox", settings.sandbox]
    try:
        kernel = subprocess.Popen(
            [*launcher, "-f", connection_file],
            env=env,
            pass_fds=(read_end,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, err = kernel.communicate(timeout=60)
    finally:
        os.close(read_end)
    assert kernel.returncode != 0, err.decode()
    assert gone_within(str(runtime_dir)) == []


def test_a_killed_servers_empty_forked_kernel_cgroups_are_swept_once_stale() -> None:
    """A forked kernel's cgroup is removed by its server when the kernel ends; a server killed
    first leaves it behind, empty. The next kernel start sweeps such a dir once it is stale,
    and leaves alone one just made (its kernel may not have joined yet) and one in use."""
    if os.geteuid() != 0:
        pytest.skip("kernels get cgroups of their own only from a root server")
    base = cgroups.cgroup_dir("pids")
    if base is None or not os.access(base, os.W_OK):
        pytest.skip("no writable pids cgroup here")
    parent = base / "autocoder"
    tag = 4_000_000_000 + os.getpid() * 10
    left, fresh, used = (parent / f"f{tag + i}" for i in range(3))
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
    user = subprocess.Popen(["sleep", "60"], **quiet)
    try:
        for d in (left, fresh, used):
            d.mkdir(parents=True)
        (used / "cgroup.procs").write_text(str(user.pid))
        old = time.time() - 2 * cgroups.STALE_AFTER
        for d in (left, used):
            os.utime(d, (old, old))
        made = cgroups.make_cgroups(f"k{os.getpid()}", {"pids": {"pids.max": 16}})
        for d in made:
            d.rmdir()
        assert not left.exists()
        assert fresh.is_dir() and used.is_dir()
    finally:
        user.kill()
        user.wait(10)
        for d in (left, fresh, used):
            wait_for(f"{d.name} to be removable", lambda d=d: _rmdir(d), timeout=15)


def _rmdir(path: Path) -> bool:
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()
    return not path.exists()

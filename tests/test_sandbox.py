"""The sandbox launcher, through real kernels started the way kernel.py starts them.

Every confined test skips, with the reason check_available gives, where bubblewrap cannot run.
Network traffic goes only to listeners these tests open on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from autocoder import sandbox
from autocoder.config import Settings, load_settings
from autocoder.errors import SandboxUnavailable
from tests.processes import alive

REPO = Path(sandbox.__file__).resolve().parents[2]
SECRET = f"sk-sandbox-test-{uuid.uuid4().hex}"
LIMITS = {"max_processes": 24, "max_file_mb": 8, "cpu_seconds": 120}


def bwrap_settings(**overrides: Any) -> Settings:
    settings = load_settings(sandbox="bwrap", **{**LIMITS, **overrides})
    try:
        sandbox.check_available(settings)
    except SandboxUnavailable as e:
        pytest.skip(str(e))
    return settings


@dataclass
class Reply:
    stdout: str
    ename: str | None


@dataclass
class Box:
    """A kernel started exactly as kernel.py starts one, with helpers to run code in it."""

    km: AsyncKernelManager
    kc: Any
    workdir: Path
    runtime_dir: Path

    async def run(self, code: str, timeout: float = 20) -> Reply:
        msg_id = self.kc.execute(code, store_history=False)
        out: list[str] = []
        ename = None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no idle after {timeout}s: {code[:60]!r}")
            try:
                msg = await self.kc.get_iopub_msg(timeout=remaining)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind == "execute_result":
                out.append(content["data"].get("text/plain", ""))
            elif kind == "error":
                ename = content["ename"]
            elif kind == "status" and content["execution_state"] == "idle":
                return Reply("".join(out), ename)

    async def value(self, expr_code: str) -> Any:
        """Run code whose last line prints JSON; return it decoded."""
        reply = await self.run(expr_code)
        assert reply.ename is None, reply
        return json.loads(reply.stdout.strip().splitlines()[-1])

    @property
    def launcher_pid(self) -> int:
        return int(self.km.provisioner.process.pid)  # type: ignore[union-attr]


@contextlib.asynccontextmanager
async def sandboxed(settings: Settings, workdir: Path) -> AsyncIterator[Box]:
    runtime_dir = Path(tempfile.mkdtemp(prefix="ac-"))
    km = AsyncKernelManager(
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(REPO / "kernels")]),
        kernel_name="autocoder-sandbox",
        transport="ipc",
        ip=f"{runtime_dir}/ipc",
        connection_file=f"{runtime_dir}/kernel.json",
    )
    kc = None
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OPENAI_API_KEY", SECRET)
            mp.setenv("AUTOCODER_API_TOKEN", SECRET)
            env = sandbox.kernel_env(settings, workdir, runtime_dir)
            await km.start_kernel(env=env, cwd=str(workdir))
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=30)
        yield Box(km, kc, workdir, runtime_dir)
    finally:
        if kc is not None:
            kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
        shutil.rmtree(runtime_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def module_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sandbox-work")


@pytest.fixture(scope="module")
async def box(module_workdir: Path) -> AsyncIterator[Box]:
    async with sandboxed(bwrap_settings(), module_workdir) as b:
        yield b


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP listener on the host's loopback that the kernel must not reach."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.5)
    yield srv
    srv.close()


def connect_code(port: int) -> str:
    return textwrap.dedent(f"""
        import json, socket
        s = socket.socket()
        s.settimeout(3)
        try:
            s.connect(("127.0.0.1", {port}))
            print(json.dumps("connected"))
        except OSError as e:
            print(json.dumps(type(e).__name__))
        """)


def namespace_members(ns: str) -> list[int]:
    """Live (non-zombie) host pids in the PID namespace `ns`."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "ns" / "pid") != ns:
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            pids.append(int(proc.name))
    return pids


def wait_until_gone(ns: str, launcher_pid: int, seconds: float) -> list[int]:
    """Wait for the namespace and the launcher (bwrap outside it) to end; return what is left."""
    deadline = time.monotonic() + seconds
    while True:
        left = namespace_members(ns) + [launcher_pid] * alive(launcher_pid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def kernel_namespace(launcher_pid: int) -> str:
    """The PID namespace bwrap made: that of the launcher's child that is not in the launcher's."""
    own = os.readlink(f"/proc/{launcher_pid}/ns/pid")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == launcher_pid:
                ns = os.readlink(stat.parent / "ns" / "pid")
                if ns != own:
                    return ns
    raise AssertionError(f"the launcher {launcher_pid} has no child in a new PID namespace")


DAEMONIZE = textwrap.dedent("""
    import os, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(3600)
        os._exit(0)
    time.sleep(0.3)
    """)


# Without a kernel.


@pytest.mark.timeout(60)
def test_kernel_env_is_a_whitelist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("AUTOCODER_API_TOKEN", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    settings = load_settings(sandbox="bwrap", memory_mb=512)
    env = sandbox.kernel_env(settings, tmp_path / "w", tmp_path / "r")
    assert SECRET not in env.values()
    assert not {"OPENAI_API_KEY", "AUTOCODER_API_TOKEN", "AWS_SECRET_ACCESS_KEY"} & env.keys()
    assert env["AUTOCODER_MEMORY_MB"] == "512"
    assert env[sandbox.WORKDIR_VAR] == str(tmp_path / "w")


@pytest.mark.timeout(60)
def test_the_launcher_reads_its_limits_without_pydantic(tmp_path: Path) -> None:
    """pydantic-settings cost every kernel start ~300 ms; the launcher parses what kernel_env
    wrote instead, with Settings still the one place that names and defaults each limit."""
    settings = load_settings(
        memory_mb=700,
        cpu_seconds=30,
        max_processes=9,
        max_open_files=99,
        max_file_mb=3,
        allow_network=True,
        kernel_python=Path(sys.executable),
    )
    env = sandbox.kernel_env(settings, tmp_path / "w", tmp_path / "r")
    assert sandbox.Limits.from_env(env) == sandbox.Limits.of(settings)
    assert sandbox.Limits.from_env({}) == sandbox.Limits.of(load_settings())
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, autocoder.sandbox; print(sorted(sys.modules))"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "pydantic" not in loaded and "pydantic_settings" not in loaded


@pytest.mark.timeout(60)
def test_missing_bwrap_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    sandbox._probe_bwrap.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable) as info:
            sandbox.check_available(load_settings(sandbox="bwrap"))
    finally:
        sandbox._probe_bwrap.cache_clear()
    message = str(info.value)
    assert "\n" not in message
    assert "bwrap" in message and "AUTOCODER_SANDBOX=none" in message


@pytest.mark.timeout(60)
def test_unconfined_mode_warns(caplog: pytest.LogCaptureFixture) -> None:
    sandbox._warn_unconfined.cache_clear()
    with caplog.at_level(logging.WARNING, logger="autocoder.sandbox"):
        sandbox.check_available(load_settings(sandbox="none"))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "unconfined" in said
    # Generated code there runs as the server's user: the server's own environment is open to it.
    assert f"/proc/{os.getpid()}/environ" in said and "OPENAI_API_KEY" in said


# One confined kernel shared by the read-only probes.


@pytest.mark.timeout(60)
async def test_environment_has_no_secrets(box: Box) -> None:
    found = await box.value(
        textwrap.dedent(f"""
        import glob, json, os
        leaks = [k for k, v in os.environ.items() if {SECRET!r} in v]
        for path in glob.glob("/proc/*/environ"):
            try:
                if {SECRET!r}.encode() in open(path, "rb").read():
                    leaks.append(path)
            except OSError:
                pass
        print(json.dumps([leaks, "OPENAI_API_KEY" in os.environ, "AUTOCODER_API_TOKEN" in os.environ]))
        """)
    )
    assert found == [[], False, False]


@pytest.mark.timeout(60)
async def test_no_network_to_host_loopback(box: Box, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    assert await box.value(connect_code(port)) == "ConnectionRefusedError"
    with pytest.raises(TimeoutError):
        listener.accept()
    resolved = await box.value(
        "import json, socket\n"
        "try:\n    socket.getaddrinfo('example.com', 80); print(json.dumps('resolved'))\n"
        "except OSError as e:\n    print(json.dumps(type(e).__name__))"
    )
    assert resolved == "gaierror"


@pytest.mark.timeout(60)
async def test_project_tree_and_home_are_read_only(box: Box) -> None:
    name = f"autocoder-sandbox-probe-{uuid.uuid4().hex}"
    targets = [REPO / name, REPO / "autocoder" / name, Path.home() / name]
    try:
        result = await box.value(
            textwrap.dedent(f"""
            import json, os
            wrote = []
            for path in {[str(t) for t in targets]!r}:
                try:
                    with open(path, "w") as f:
                        f.write("x")
                    wrote.append(path)
                except OSError:
                    pass
            print(json.dumps([wrote, os.path.exists({str(REPO / "autocoder" / "sandbox" / "__init__.py")!r})]))
            """)
        )
        assert result == [[], False], "the project's source must be neither writable nor visible"
        assert not any(t.exists() for t in targets)
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


@pytest.mark.timeout(60)
async def test_tmp_and_home_are_private(box: Box) -> None:
    with tempfile.NamedTemporaryFile(prefix="autocoder-host-marker-") as marker:
        inner = f"autocoder-inner-{uuid.uuid4().hex}"
        seen = await box.value(
            textwrap.dedent(f"""
            import json, os
            saw_host = os.path.exists({marker.name!r})
            for d in ("/tmp", os.path.expanduser("~")):
                with open(os.path.join(d, {inner!r}), "w") as f:
                    f.write("x")
            with open("kept.txt", "w") as f:
                f.write("kept")
            print(json.dumps([saw_host, os.path.expanduser("~")]))
            """)
        )
    assert seen[0] is False
    assert not Path(tempfile.gettempdir(), inner).exists()
    assert not Path(seen[1], inner).exists()
    assert (box.workdir / "kept.txt").read_text() == "kept"


@pytest.mark.timeout(60)
async def test_rlimits_in_force(box: Box) -> None:
    limits = await box.value(
        textwrap.dedent("""
        import json, resource
        names = ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_FSIZE",
                 "RLIMIT_CORE"]
        print(json.dumps({n: resource.getrlimit(getattr(resource, n)) for n in names}))
        """)
    )
    mib = 2**20
    settings = bwrap_settings()
    assert limits["RLIMIT_AS"] == [settings.memory_mb * mib] * 2
    assert limits["RLIMIT_CPU"] == [settings.cpu_seconds] * 2
    assert limits["RLIMIT_NOFILE"] == [settings.max_open_files] * 2
    assert limits["RLIMIT_FSIZE"] == [settings.max_file_mb * mib] * 2
    assert limits["RLIMIT_CORE"] == [0, 0]
    nproc = limits["RLIMIT_NPROC"][0]
    assert nproc == settings.max_processes if os.geteuid() == 0 else nproc >= settings.max_processes

    assert (await box.run("x = bytearray(50 * 2**30)")).ename == "MemoryError"
    big = await box.run(
        f"with open('big.bin', 'wb') as f:\n    f.write(b'x' * {(settings.max_file_mb + 1) * mib})"
    )
    assert big.ename == "OSError"
    (box.workdir / "big.bin").unlink(missing_ok=True)


@pytest.mark.timeout(60)
async def test_process_limit_holds(box: Box) -> None:
    forked = await box.value(
        textwrap.dedent("""
        import json, os, signal, time
        kids = []
        for _ in range(200):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            kids.append(pid)
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
        for pid in kids:
            os.waitpid(pid, 0)
        print(json.dumps(len(kids)))
        """)
    )
    assert 0 < forked < LIMITS["max_processes"]
    assert (await box.run("print('still here')")).stdout == "still here\n"


@pytest.mark.timeout(60)
async def test_interrupt_by_message(box: Box) -> None:
    msg_id = box.kc.execute("while True: pass")
    await asyncio.sleep(0.5)
    await box.km.interrupt_kernel()
    ename = None
    while True:
        msg = await box.kc.get_iopub_msg(timeout=10)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "error":
            ename = msg["content"]["ename"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    assert ename == "KeyboardInterrupt"
    assert (await box.run("print(1)")).stdout == "1\n"


@pytest.mark.timeout(60)
async def test_runs_unprivileged_in_own_namespaces(box: Box) -> None:
    seen = await box.value(
        textwrap.dedent("""
        import json, os
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        print(json.dumps([os.getuid(), status["CapEff"].strip(), status["NoNewPrivs"].strip(), pids]))
        """)
    )
    uid, cap_eff, no_new_privs, pids = seen
    assert cap_eff == "0000000000000000" and no_new_privs == "1"
    assert pids[0] == 1 and len(pids) < 5, "the kernel sees only its own PID namespace"
    if os.geteuid() == 0:
        assert uid == sandbox.UID_BASE + box.launcher_pid


# Kernels of their own: these end them.


@pytest.mark.timeout(60)
async def test_allow_network_reaches_loopback(tmp_path: Path, listener: socket.socket) -> None:
    async with sandboxed(bwrap_settings(allow_network=True), tmp_path) as b:
        assert await b.value(connect_code(listener.getsockname()[1])) == "connected"


@pytest.mark.timeout(60)
async def test_kernel_tree_is_gone_after_shutdown(tmp_path: Path) -> None:
    async with sandboxed(bwrap_settings(), tmp_path) as b:
        assert (await b.run(DAEMONIZE)).ename is None
        launcher_pid = b.launcher_pid
        ns = kernel_namespace(launcher_pid)
        assert len(namespace_members(ns)) >= 3
        b.kc.stop_channels()
        await b.km.shutdown_kernel(now=False)
    assert wait_until_gone(ns, launcher_pid, 10) == []


SERVER = """
import asyncio, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from pathlib import Path
from test_sandbox import DAEMONIZE, bwrap_settings, sandboxed

async def main():
    async with sandboxed(bwrap_settings(), Path({workdir!r})) as b:
        await b.run(DAEMONIZE)
        print(b.launcher_pid, b.runtime_dir, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.timeout(60)
def test_kernel_tree_dies_with_its_server(tmp_path: Path) -> None:
    bwrap_settings()
    script = tmp_path / "server.py"
    tests = str(Path(__file__).parent)
    script.write_text(SERVER.format(repo=str(REPO), tests=tests, workdir=str(tmp_path)))
    server = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    runtime_dir = None
    try:
        assert server.stdout is not None
        pid, runtime_dir = server.stdout.readline().split()
        launcher_pid = int(pid)
        ns = kernel_namespace(launcher_pid)
        assert len(namespace_members(ns)) >= 3
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(10)
    try:
        assert wait_until_gone(ns, launcher_pid, 10) == []
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)

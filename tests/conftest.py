"""Shared fixtures: a scripted model server on 127.0.0.1, settings in a temp dir, a runner, a
real Jupyter Kernel Gateway on 127.0.0.1."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from autocoder import api, disk
from autocoder.api.app import server_options
from autocoder.config import Settings, load_settings
from autocoder.runner import Runner
from autocoder.testing import KernelGateway, ScriptedLLM

SECRET = "sk-test-never-reaches-the-kernel"


def sandbox_mode() -> str:
    """bwrap where it can run here, else none (the sandbox's own tests say why they skip)."""
    wanted = os.environ.get("AUTOCODER_TEST_SANDBOX")
    if wanted:
        return wanted
    try:
        probe = subprocess.run(
            ["bwrap", "--ro-bind", "/", "/", "--unshare-net", "--unshare-pid", "true"],
            capture_output=True,
            timeout=10,
        )
        return "bwrap" if probe.returncode == 0 else "none"
    except (OSError, subprocess.TimeoutExpired):
        return "none"


SANDBOX = sandbox_mode()

# Kernels this suite starts (in-process or through the CLI) keep their runtime dirs under
# this root, so the leak check below sees only them, not other kernels on the machine.
SUITE_TMP = tempfile.mkdtemp(prefix="acsuite-")
tempfile.tempdir = SUITE_TMP
os.environ["TMPDIR"] = SUITE_TMP


def kernel_pids() -> list[int]:
    """Kernel processes this suite started (their connection files live under SUITE_TMP)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    pids = []
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if ("ipykernel" in args or "autocoder.sandbox" in args) and SUITE_TMP in args:
            pids.append(int(pid))
    return pids


def mounts_under(root: str | Path) -> list[str]:
    """Mount points below `root`, outermost first."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if Path(point).is_relative_to(root):
            found.append(point)
    return found


@pytest.fixture(scope="session", autouse=True)
def no_kernel_left_behind() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 15
    while kernel_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = kernel_pids()
    if not left:
        # Disk budgets that servers the tests SIGKILLed left mounted (a next server's sweep
        # would unmount them).
        for point in reversed(mounts_under(SUITE_TMP)):
            disk.unmount(Path(point))
        shutil.rmtree(SUITE_TMP, ignore_errors=True)
    assert left == [], "kernel processes outlived the test suite"


GATEWAY_KERNEL = "autocoder-sandbox" if SANDBOX == "bwrap" else "autocoder-python"
GATEWAY_SECRET = "the-gateway-s-own-secret"


def gateway_unavailable() -> str | None:
    """Why no Kernel Gateway can serve autocoder's kernels here, or None."""
    if importlib.util.find_spec("kernel_gateway") is None:
        return "jupyter-kernel-gateway is not installed (pip install -e '.[test]')"
    points = importlib.metadata.entry_points(group="jupyter_client.kernel_provisioners")
    if "autocoder-provisioner" not in {p.name for p in points}:
        return "autocoder's kernel provisioner is not registered (reinstall: pip install -e .)"
    return None


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelGateway]:
    """One gateway for the suite; at its end no kernel may be left on it."""
    reason = gateway_unavailable()
    if reason:
        pytest.skip(reason)
    gw = KernelGateway(
        tmp_path_factory.mktemp("gateway"), extra_env={"GATEWAY_SECRET": GATEWAY_SECRET}
    ).start()
    try:
        yield gw
        assert gw.kernels() == [], "kernels were left on the gateway"
    finally:
        gw.stop()


@pytest.fixture(scope="session")
def llm_server() -> Iterator[ScriptedLLM]:
    server = ScriptedLLM().start()
    yield server
    server.stop()


@pytest.fixture
def llm(llm_server: ScriptedLLM) -> ScriptedLLM:
    llm_server.script()
    llm_server.responder = None
    return llm_server


@pytest.fixture
def settings(tmp_path: Path, llm: ScriptedLLM, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.chdir(tmp_path)
    return load_settings(
        openai_base_url=llm.base_url,
        openai_api_key=SECRET,
        notebooks_dir=tmp_path / "notebooks",
        autofile_dir=tmp_path / "autofile",
        sandbox=SANDBOX,
        timeout=5.0,
        llm_retries=0,
    )


@pytest.fixture
async def runner(settings: Settings) -> AsyncIterator[Runner]:
    r = Runner(settings)
    yield r
    await r.close()


@pytest.fixture
def cli_env(settings: Settings, llm: ScriptedLLM) -> dict[str, str]:
    """The environment a user would have for `autocoder run` against the scripted model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOCODER_", "OPENAI_"))}
    env.update(
        OPENAI_BASE_URL=llm.base_url,
        OPENAI_API_KEY=SECRET,
        AUTOCODER_SANDBOX=SANDBOX,
        AUTOCODER_TIMEOUT="5",
        AUTOCODER_LLM_RETRIES="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def autocoder_cmd() -> list[str]:
    return [sys.executable, "-m", "autocoder"]


class LiveServer:
    """uvicorn serving `create_app(settings)` in a thread, on a port the OS picked."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(
            api.create_app(settings),
            log_level="warning",
            timeout_graceful_shutdown=5,
            **server_options(settings),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "server did not stop"

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=5).json()  # type: ignore[no-any-return]

    def wait_for(self, what: str, predicate: Any, timeout: float = 15) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

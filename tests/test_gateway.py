"""Runs whose kernels come from a real Jupyter Kernel Gateway on 127.0.0.1 (AUTOCODER_GATEWAY_URL).

The gateway serves autocoder's kernelspecs through autocoder's provisioner, with the command line
docs/scale.md gives. Each test ends by checking that the gateway has no kernel left.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from autocoder import languages
from autocoder.config import Settings
from autocoder.errors import KernelStartError
from autocoder.kernel.pool import KernelSource
from autocoder.records import ErrorKind
from autocoder.runner import Runner
from autocoder.sessions import Sessions
from autocoder.testing import KernelGateway, ScriptedLLM, fenced
from tests.conftest import GATEWAY_KERNEL, LiveServer, autocoder_cmd, gateway_unavailable

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def gw_settings(settings: Settings, gateway: KernelGateway) -> Iterator[Settings]:
    yield settings.model_copy(
        update={
            "gateway_url": gateway.url,
            "gateway_token": SecretStr(gateway.token),
            "gateway_kernel": GATEWAY_KERNEL,
        }
    )
    deadline = time.monotonic() + 15
    while gateway.kernels() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gateway.kernels() == [], "the run left its kernel on the gateway"


async def test_a_run_on_the_gateway_retries_after_an_exception(
    gw_settings: Settings, gateway: KernelGateway, llm: ScriptedLLM
) -> None:
    probe = "import os\nprint(os.getcwd().startswith({root!r}), 'OPENAI_API_KEY' in os.environ)"
    llm.script(fenced("print(1 / 0)"), fenced(probe.format(root=str(gateway.root / "autofile"))))
    runner = Runner(gw_settings)
    try:
        result = await runner.run("divide")
    finally:
        await runner.close()

    assert [a.error_kind for a in result.attempts] == [ErrorKind.EXCEPTION, None]
    assert "ZeroDivisionError" in llm.requests[1]["messages"][-1]["content"]
    # It ran on the gateway's host, in a working dir of its own, with none of our secrets.
    assert result.status == "success" and result.output == "True False\n"


async def test_a_bash_run_beside_the_gateway_runs_in_a_local_bash_kernel(
    gw_settings: Settings, gateway: KernelGateway, llm: ScriptedLLM
) -> None:
    """The gateway serves a Python kernel: another language must not be handed it."""
    if not any(f.language == "bash" and f.available for f in languages.availability(gw_settings)):
        pytest.skip("the Bash kernel is not installed (./install.sh --languages)")
    llm.script('```bash\necho "$((6 * 7))"\n```')
    runner = Runner(gw_settings)
    try:
        result = await runner.run("six times seven", language="bash")
    finally:
        await runner.close()
    assert result.status == "success" and result.output.strip() == "42"
    assert gateway.kernels() == []


async def test_endless_and_interrupt_swallowing_code_is_stopped_remotely(
    gw_settings: Settings, llm: ScriptedLLM
) -> None:
    stubborn = (
        "import time\nwhile True:\n    try:\n        time.sleep(0.05)\n"
        "    except KeyboardInterrupt:\n        pass"
    )
    llm.script(fenced("while True:\n    pass"), fenced(stubborn), fenced("print('done')"))
    runner = Runner(gw_settings)
    try:
        result = await runner.run("loop", timeout=2)
    finally:
        await runner.close()

    assert [a.error_kind for a in result.attempts] == [ErrorKind.TIMEOUT, ErrorKind.TIMEOUT, None]
    assert "timed out after 2 s" in llm.requests[1]["messages"][-1]["content"]
    assert result.status == "success" and result.output == "done\n"


async def test_a_kernel_that_exits_is_reported_dead_and_replaced(
    gw_settings: Settings, llm: ScriptedLLM
) -> None:
    llm.script(fenced("import os\nos._exit(1)"), fenced("print('alive')"))
    runner = Runner(gw_settings)
    try:
        result = await runner.run("exit")
    finally:
        await runner.close()

    first = result.attempts[0]
    assert first.error_kind is ErrorKind.KERNEL_DIED
    assert first.error.startswith("kernel died: the kernel on the gateway ended")
    assert result.status == "success" and result.output == "alive\n"


async def test_an_output_flood_is_cut_as_it_arrives(
    gw_settings: Settings, llm: ScriptedLLM
) -> None:
    settings = gw_settings.model_copy(update={"max_output_bytes": 64 * 1024})
    llm.script(
        fenced("while True:\n    print('x' * 1000)"),
        fenced("print('small')"),
    )
    runner = Runner(settings)
    try:
        result = await runner.run("flood", timeout=60)
    finally:
        await runner.close()

    first = result.attempts[0]
    assert first.error_kind is ErrorKind.OUTPUT_LIMIT and first.truncated
    assert "bytes of output cut" in first.output
    assert len(first.output) <= settings.max_output_bytes + 1000
    assert first.ename == "KeyboardInterrupt"  # the cut interrupted it
    assert result.status == "success"


async def test_a_cancelled_run_leaves_no_kernel_on_the_gateway(
    gw_settings: Settings, gateway: KernelGateway, llm: ScriptedLLM
) -> None:
    llm.script(fenced("import time\nprint('started', flush=True)\ntime.sleep(60)"))
    runner = Runner(gw_settings)
    started = asyncio.Event()

    def on_event(event: object) -> None:
        if getattr(event, "type", "") == "output":
            started.set()

    task = asyncio.create_task(runner.run("sleep", on_event=on_event))
    try:
        await asyncio.wait_for(started.wait(), 60)
        assert len(gateway.kernels()) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await runner.close()
    # gw_settings checks the gateway is empty


async def test_an_unconfined_kernel_on_the_gateway_shares_nothing_with_it(
    gw_settings: Settings, gateway: KernelGateway, llm: ScriptedLLM
) -> None:
    """autocoder's provisioner: the kernel's own runtime and working dir, a scratch environment,
    and the gateway's limits, tightened (never loosened) by the ones this server asks for."""
    probe = (
        "import os, json, resource\n"
        "from pathlib import Path\n"
        "from ipykernel import get_connection_file\n"
        "here = Path(get_connection_file()).parent\n"
        "print(json.dumps([str(here), sorted(p.name for p in here.glob('*.json')), "
        "os.getcwd(), 'GATEWAY_SECRET' in os.environ, 'KG_AUTH_TOKEN' in os.environ, "
        "resource.getrlimit(resource.RLIMIT_AS)[0] >> 20, resource.getrlimit(resource.RLIMIT_CPU)[0], "
        "(os.statvfs('.').f_blocks * os.statvfs('.').f_frsize) >> 20]))"
    )
    llm.script(fenced(probe))
    asked = {"gateway_kernel": "autocoder-python", "memory_mb": 512, "cpu_seconds": 10**6}
    runner = Runner(gw_settings.model_copy(update=asked))
    try:
        result = await runner.run("where am I")
    finally:
        await runner.close()

    assert result.status == "success", result.error
    runtime, files, cwd, secret, token, memory_mb, cpu_seconds, disk_mb = json.loads(result.output)
    assert Path(runtime).name.startswith("ac-") and Path(runtime) != gateway.root / "runtime"
    assert files == ["kernel.json"]  # no other kernel's connection file (HMAC key) beside it
    assert Path(cwd).is_relative_to(gateway.root / "autofile" / ".work")
    assert not secret and not token  # neither the gateway's environment nor its token
    assert (memory_mb, cpu_seconds) == (512, 300)  # ours tighter, the gateway's own looser
    if os.geteuid() == 0:  # its working dir is a disk budget of the gateway's own settings
        assert disk_mb == 512
    assert not Path(runtime).exists() and not Path(cwd).exists()  # both went with the kernel


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        autocoder_cmd() + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=90
    )


def test_a_gateway_that_is_down_or_refuses_is_one_line_at_start(
    gateway: KernelGateway, llm: ScriptedLLM, cli_env: dict[str, str], tmp_path: Path
) -> None:
    with socket_closed() as down:
        proc = run_cli(["run", "anything"], dict(cli_env, AUTOCODER_GATEWAY_URL=down), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"the kernel gateway at {down} cannot be reached" in proc.stderr

    refused = dict(
        cli_env, AUTOCODER_GATEWAY_URL=gateway.url, AUTOCODER_GATEWAY_TOKEN="not-the-token"
    )
    proc = run_cli(["run", "anything"], refused, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "refused the token (AUTOCODER_GATEWAY_TOKEN)" in proc.stderr
    assert llm.requests == []


def test_health_is_503_naming_the_gateway_once_it_goes_down(
    settings: Settings, tmp_path: Path
) -> None:
    reason = gateway_unavailable()
    if reason:
        pytest.skip(reason)
    gw = KernelGateway(tmp_path / "gw2").start()
    try:
        s = settings.model_copy(
            update={"gateway_url": gw.url, "gateway_token": SecretStr(gw.token), "pool_size": 0}
        )
        with LiveServer(s) as live:
            assert httpx.get(f"{live.url}/health", timeout=10).status_code == 200
            gw.stop()
            response = httpx.get(f"{live.url}/health", timeout=20)
    finally:
        gw.stop()
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert f"the kernel gateway at {gw.url} cannot be reached" in body["kernel_error"]


class socket_closed:
    """The URL of a port on 127.0.0.1 that nothing listens on."""

    def __enter__(self) -> str:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"http://127.0.0.1:{s.getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        return None


async def test_a_session_beside_the_gateway_is_refused_in_one_line_not_run_locally(
    gw_settings: Settings, gateway: KernelGateway
) -> None:
    """A session keeps its files in a working directory here between prompts; a gateway's
    kernels have none, so the session is refused, where it used to stay local silently."""
    runner = Runner(gw_settings)
    sessions = Sessions(gw_settings, runner, KernelSource(gw_settings))
    await sessions.open()
    try:
        with pytest.raises(KernelStartError, match="gateway backend have none"):
            await sessions.create()
    finally:
        await sessions.close()
        await runner.close()
    assert gateway.kernels() == []


def test_the_websocket_class_gateways_were_configured_with_still_loads() -> None:
    """Deployed gateways name `autocoder.gateway_ws.NoDelayChannels` (kept for one release)."""
    from autocoder.gateway_ws import NoDelayChannels as old
    from autocoder.kernel.gateway_ws import NoDelayChannels

    assert old is NoDelayChannels

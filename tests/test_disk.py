"""Generated code cannot fill the disk, and a full disk never takes the service down.

The notebooks and autofile directories live on a small filesystem (a tmpfs this test mounts,
as root) so that a run can fill it for real. Real kernels under the real sandbox, exec'd and
forked, the scripted model, a real server. Every test skips, with the reason, where it cannot
mount here.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from autocoder import sandbox
from autocoder.config import Settings
from autocoder.errors import DiskFull, SandboxUnavailable
from autocoder.kernel import fork as forkserver
from autocoder.kernel.pool import new_kernel
from autocoder.notebook import record_path
from autocoder.records import ErrorKind, Event
from autocoder.runner import Runner
from autocoder.testing import ScriptedLLM, fenced
from tests.conftest import LiveServer, autocoder_cmd, mounts_under

pytestmark = pytest.mark.timeout(180)

MIB = 1 << 20

# Writes 4 MiB files until the disk says no.
WRITE_UNTIL_FULL = """\
part = b"x" * (4 << 20)
for i in range(10_000):
    with open(f"part{i:03}.bin", "wb") as f:
        f.write(part)
"""

# Fills the kernel's runtime dir, which holds its sockets and connection file.
FILL_RUNTIME_DIR = """\
import os
from ipykernel.kernelapp import IPKernelApp
where = os.path.dirname(IPKernelApp.instance().connection_file)
with open(os.path.join(where, "filler"), "wb") as f:
    for _ in range(10_000):
        f.write(b"x" * (1 << 20))
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB filesystem of the test's own, unmounted at the end whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem for the records needs root")
    where = tmp_path / "disk"
    where.mkdir()
    done = mount_tmpfs(where, "64m")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        left = [p for p in mounts_under(where) if p != str(where)]
        for point in [*reversed(left), str(where)]:
            subprocess.run(["umount", "-l", point], check=False)
        assert left == [], f"budget mounts were left behind: {left}"


def on(small_disk: Path, settings: Settings, **overrides: Any) -> Settings:
    """`settings` with the records on the small disk."""
    return settings.model_copy(
        update={
            "notebooks_dir": small_disk / "notebooks",
            "autofile_dir": small_disk / "autofile",
            "max_output_bytes": 65536,
            **overrides,
        }
    )


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def mount_tmpfs(where: Path, size: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )


def fill(small_disk: Path, leave: int) -> Path:
    """A file of the test's own that leaves `leave` bytes free on the small disk."""
    filler = small_disk / "filler"
    filler.unlink(missing_ok=True)
    size = free(small_disk) - leave
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return filler


def forked(settings: Settings) -> Settings:
    """Settings whose kernels are forked, or a skip saying why they cannot be here."""
    forking = settings.model_copy(update={"kernel_start": "fork", "sandbox": "bwrap"})
    try:
        sandbox.check_available(forking)
    except SandboxUnavailable as e:
        pytest.skip(str(e))
    reason = forkserver.why_not(forking)
    if reason is not None:
        pytest.skip(reason)
    return forking


@pytest.fixture(params=["exec", "fork"])
async def kernel_settings(
    request: pytest.FixtureRequest, settings: Settings, small_disk: Path
) -> Settings:
    """Both ways a kernel starts: exec'd (bwrap) and forked from the zygote, listening."""
    s = on(small_disk, settings, max_run_disk_mb=16)
    if request.param == "exec":
        return s.model_copy(update={"kernel_start": "exec"})
    s = forked(s)
    await forkserver.zygote_for(s).ready()
    return s


async def test_a_kernel_cannot_write_past_its_disk_budget(
    kernel_settings: Settings, small_disk: Path
) -> None:
    async with new_kernel(kernel_settings) as k:
        process = getattr(k.km.manager.provisioner, "process", None) if k.km else None  # type: ignore[union-attr]
        assert isinstance(process, forkserver.ForkedProcess) == (
            kernel_settings.kernel_start == "fork"
        )
        done = await k.execute(WRITE_UNTIL_FULL, timeout=60)
        assert done.kind is ErrorKind.DISK_LIMIT, done
        assert done.error is not None and "No space left on device" in done.error.evalue
        # The budget held: at most 16 MiB written, and the records' disk did not see them.
        written = sum(f.stat().st_size for f in k.workdir.iterdir()) if k.workdir else 0
        assert 8 * MIB < written <= 16 * MIB
        assert free(small_disk) > 60 * MIB
        # Its runtime dir (sockets, connection file) is capped as well.
        await k.execute("import glob, os\nfor p in glob.glob('part*'): os.remove(p)", timeout=20)
        done = await k.execute(FILL_RUNTIME_DIR, timeout=60)
        assert done.kind is ErrorKind.EXCEPTION, done
        assert done.error is not None and "No space left on device" in done.error.evalue
        assert (await k.execute("print('still here')", timeout=20)).stdout == "still here\n"


async def test_a_run_that_fills_its_budget_is_recorded_and_the_next_one_succeeds(
    kernel_settings: Settings, llm: ScriptedLLM, small_disk: Path
) -> None:
    llm.script(fenced(WRITE_UNTIL_FULL), fenced("print('ok')"))
    runner = Runner(kernel_settings)
    try:
        first = await runner.run("write as much as you can", max_attempts=1)
        second = await runner.run("say ok", max_attempts=1)
    finally:
        await runner.close()
    assert first.status == "error" and first.error_kind is ErrorKind.DISK_LIMIT
    assert "AUTOCODER_MAX_RUN_DISK_MB" in first.error and "16 MB" in first.error
    assert "No space left on device" in first.error
    # Its record and notebook were written, and its files kept beside them.
    assert record_path(kernel_settings.notebooks_dir, first.run_id).is_file()
    assert Path(first.notebook).is_file()
    kept = sum(f.size for f in first.files)
    assert 8 * MIB < kept <= 16 * MIB and first.notice == ""
    assert free(small_disk) > 32 * MIB  # not left full
    assert second.status == "success" and second.output == "ok\n"
    assert record_path(kernel_settings.notebooks_dir, second.run_id).is_file()


async def test_what_the_disk_has_no_room_for_is_left_out_and_the_record_says_so(
    settings: Settings, llm: ScriptedLLM, small_disk: Path
) -> None:
    # The budget is larger than the disk can take beside the records.
    s = on(small_disk, settings, max_run_disk_mb=48)
    fill(small_disk, leave=36 * MIB)
    llm.script(fenced(WRITE_UNTIL_FULL))
    runner = Runner(s)
    try:
        result = await runner.run("write as much as you can", max_attempts=1)
    finally:
        await runner.close()
    assert result.error_kind is ErrorKind.DISK_LIMIT and "48 MB" in result.error
    assert record_path(s.notebooks_dir, result.run_id).is_file()
    # Smallest first, as many as leave room for the records: 36 MiB free, 16 of them kept.
    kept = {f.name for f in result.files if f.size}
    assert 0 < len(kept) <= 5, kept
    assert "were not kept" in result.notice and "part011.bin" in result.notice
    assert str(s.autofile_dir.resolve()) in result.notice
    # Room stayed for the records: the disk is not full.
    assert free(small_disk) >= 8 * MIB


async def test_a_run_the_disk_cannot_record_leaves_nothing_and_says_so(
    settings: Settings, llm: ScriptedLLM, small_disk: Path
) -> None:
    s = on(small_disk, settings, max_run_disk_mb=16)
    llm.script(
        fenced("print('started')\nopen('out.txt', 'w').write('x' * 100_000)"),
        fenced("print('ok')"),
    )
    filled: list[Path] = []

    def fill_the_disk(event: Event) -> None:
        # While the code runs, something else takes the whole disk.
        if event.type == "output" and not filled:
            filled.append(fill(small_disk, leave=0))

    runner = Runner(s)
    try:
        with pytest.raises(DiskFull) as failed:
            await runner.run("print and write", max_attempts=1, on_event=fill_the_disk)
        assert str(s.notebooks_dir.resolve()) in str(failed.value)
        # Nothing of the run is left without its record.
        assert [p.name for p in s.autofile_dir.iterdir() if p.name != ".work"] == []
        assert [p for p in s.notebooks_dir.iterdir() if p.suffix == ".ipynb"] == []
        # While the disk stays full, a run is refused before the model is asked.
        llm.requests.clear()
        with pytest.raises(DiskFull, match="AUTOCODER_NOTEBOOKS_DIR"):
            await runner.run("say ok", max_attempts=1)
        assert llm.requests == []
        filled[0].unlink()
        result = await runner.run("say ok", max_attempts=1)
    finally:
        await runner.close()
    assert result.status == "success" and result.output == "ok\n"


def test_the_server_says_low_disk_refuses_what_it_cannot_record_and_recovers(
    settings: Settings, llm: ScriptedLLM, small_disk: Path
) -> None:
    s = on(small_disk, settings, max_run_disk_mb=16, pool_size=1)
    notebooks = str(s.notebooks_dir.resolve())
    with LiveServer(s) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        live.wait_for("a kernel ready", lambda: live.health()["kernels_ready"] == 1, 60)
        assert client.get("/health").status_code == 200
        # Less free than one run's budget and its record: degraded, and runs still go.
        filler = fill(small_disk, leave=24 * MIB)
        health = client.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "degraded" and body["disk_error"].startswith("low disk")
        assert notebooks in body["disk_error"] and "AUTOCODER_MAX_RUN_DISK_MB" in body["disk_error"]
        assert 16 < body["disk_free_mb"] < 32
        llm.script(fenced("print('ok')"))
        assert client.post("/run", json={"prompt": "say ok"}).json()["status"] == "success"
        # No room for a record: 507 with a message, before anything runs.
        fill(small_disk, leave=MIB)
        llm.script(fenced("print('never')"))
        refused = client.post("/run", json={"prompt": "say ok"})
        assert refused.status_code == 507
        assert notebooks in refused.json()["detail"]
        assert llm.requests == []
        assert client.get("/health").json()["disk_error"].startswith("disk full")
        # Space is back: the next run succeeds, no restart.
        filler.unlink()
        llm.script(fenced("print('ok')"))
        done = client.post("/run", json={"prompt": "say ok"})
        assert done.status_code == 200 and done.json()["status"] == "success"
        assert client.get("/health").json()["status"] == "ok"


def test_a_session_has_one_budget_and_keeps_its_files_when_closed(
    settings: Settings, llm: ScriptedLLM, small_disk: Path
) -> None:
    s = on(small_disk, settings, max_run_disk_mb=16, pool_size=0)
    with LiveServer(s) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        session = client.post("/sessions").json()
        sid, workdir = session["session_id"], Path(session["workdir"])
        llm.script(fenced("open('small.txt', 'w').write('kept')"), fenced(WRITE_UNTIL_FULL))
        assert client.post(f"/sessions/{sid}/run", json={"prompt": "a"}).json()["status"] == (
            "success"
        )
        result = client.post(f"/sessions/{sid}/run", json={"prompt": "b", "max_attempts": 1})
        assert result.json()["error_kind"] == "disk_limit"
        assert "AUTOCODER_MAX_RUN_DISK_MB" in result.json()["error"]
        assert client.delete(f"/sessions/{sid}").status_code in (200, 204)
    # Closed, its files are on the disk, no longer in a budget.
    assert str(workdir) not in mounts_under(small_disk)
    assert (workdir / "small.txt").read_text() == "kept"


def test_the_cli_says_a_full_disk_in_one_line(
    cli_env: dict[str, str], small_disk: Path, tmp_path: Path
) -> None:
    fill(small_disk, leave=0)
    env = {
        **cli_env,
        "AUTOCODER_NOTEBOOKS_DIR": str(small_disk / "notebooks"),
        "AUTOCODER_AUTOFILE_DIR": str(small_disk / "autofile"),
    }
    done = subprocess.run(
        [*autocoder_cmd(), "run", "-q", "say ok"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autocoder: error: no room to record a run")
    assert str((small_disk / "notebooks").resolve()) in lines[0]


def test_leftover_budgets_of_a_killed_run_are_swept(small_disk: Path) -> None:
    """What a server killed mid-run leaves mounted goes with the next start's sweep."""
    from autocoder.kernel.leftovers import sweep_leftovers

    work = small_disk / "autofile" / ".work"
    left = work / "999999.1-deadbeef0000"
    left.mkdir(parents=True)
    assert mount_tmpfs(left, "8m").returncode == 0
    (left / "data.bin").write_bytes(b"x" * MIB)
    sweep_leftovers(work)
    assert not left.exists() and mounts_under(small_disk) == [str(small_disk)]

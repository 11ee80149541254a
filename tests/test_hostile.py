"""The hostile suite: programs a model might write, or be steered into writing, through the engine.

Each case (bench/hostile.py, which also prints the table in docs/security.md) runs through a
real `Runner`: the scripted model replies first with the hostile program and then with
`print('ok')`. Each test asserts that the run ends within its budget, how attempt 1 ended,
that attempt 2 succeeds (the service recovered), that no process outlived the run, and that
nothing outside the run's own directories changed. Some cases also go through `POST /run`
while `/health` keeps answering.

Cases contained only by bubblewrap (memory, processes, file size, network, secrets, the file
system, daemons) are skipped, with the reason, where the sandbox is not bwrap. The only
network traffic is to a listener these tests open on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path

import httpx
import nbformat
import pytest

from autocoder import sandbox
from autocoder.config import Settings, load_settings
from autocoder.errors import SandboxUnavailable
from autocoder.records import ErrorKind, RunResult
from autocoder.runner import Runner
from autocoder.testing import ScriptedLLM, fenced
from bench.hostile import (
    BUDGET,
    BY_NAME,
    CASES,
    HARMLESS,
    HOSTILE,
    REPO,
    Case,
    Outcome,
    Target,
    left_behind,
    listener,
    run_case,
    was_contacted,
)
from tests.conftest import SANDBOX, SECRET, SUITE_TMP, LiveServer

pytestmark = pytest.mark.timeout(90)

TOKEN = f"autocoder-token-{uuid.uuid4().hex}"
# Written by tools while the suite runs, by us or by whoever else works in the checkout.
NOT_SOURCE = {".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
GUARDED = REPO / "autocoder" / "__init__.py"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def skip_unless_confined(case: Case, settings: Settings) -> None:
    """Skip, saying why, a case whose containment this machine cannot give."""
    if not case.confined_only:
        return
    if SANDBOX != "bwrap":
        pytest.skip(
            f"{case.name!r} is contained only by the bwrap sandbox, and this run uses "
            f"sandbox={SANDBOX} (AUTOCODER_TEST_SANDBOX, or bwrap cannot run here)"
        )
    try:
        sandbox.check_available(settings)
    except SandboxUnavailable as e:
        pytest.skip(f"{case.name!r} needs the bwrap sandbox: {e}")
    if case.name == "fork bomb" and os.geteuid() == 0 and sandbox.dedicated_uid() is None:
        pytest.skip(
            "root without a throwaway uid (few uids mapped here): RLIMIT_NPROC would not hold"
        )


def listing(root: Path, skip: Collection[str] = ()) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime) of everything under `root`, but top-level names in `skip`."""
    found = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] in skip:
            continue
        st = path.lstat()
        found[str(rel)] = (st.st_size, st.st_mtime_ns)
    return found


def touched_source(marker: str, since: float) -> list[str]:
    """Paths in the checkout that carry `marker` in their name, or in content changed since then.

    Others may edit the checkout while the suite runs, so a plain before/after listing of it
    would blame them; the marker is in everything a hostile program writes.
    """
    hits = []
    for path in REPO.rglob("*"):
        if NOT_SOURCE & set(path.relative_to(REPO).parts):
            continue
        if marker in path.name or (
            path.is_file()
            and path.stat().st_mtime >= since
            and marker.encode() in path.read_bytes()
        ):
            hits.append(str(path))
    return hits


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def notebook_text(result: RunResult) -> str:
    nb = nbformat.read(result.notebook, as_version=4)
    nbformat.validate(nb)
    return Path(result.notebook).read_text()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The server's home for this test, with a file in it that must not change."""
    path = tmp_path / "home"
    path.mkdir()
    (path / ".bashrc").write_text("# the server's own\n")
    monkeypatch.setenv("HOME", str(path))
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("AUTOCODER_API_TOKEN", TOKEN)
    return path


@pytest.fixture
async def hostile_runner(settings: Settings, home: Path) -> AsyncIterator[Runner]:
    runner = Runner(settings.model_copy(update=HOSTILE))
    yield runner
    await runner.close()


@pytest.mark.parametrize("case", CASES, ids=[slug(c.name) for c in CASES])
async def test_a_hostile_program_is_contained(
    case: Case, hostile_runner: Runner, llm: ScriptedLLM, home: Path, tmp_path: Path
) -> None:
    settings = hostile_runner.settings
    skip_unless_confined(case, settings)
    run_dirs = {settings.notebooks_dir.name, settings.autofile_dir.name}
    outside = listing(tmp_path, skip=run_dirs)
    source = digest(GUARDED)
    since = time.time()

    with listener() as srv:
        target = Target(srv.getsockname()[1], REPO, home, f"hostile-{uuid.uuid4().hex}")
        outcome = await run_case(hostile_runner, llm, case, target, SUITE_TMP)
        contacted = was_contacted(srv)

    result = outcome.result
    first = result.attempts[0]
    story = f"{case.name}: {json.dumps(result.model_dump(mode='json'), default=str)[:3000]}"
    assert outcome.seconds < BUDGET, story
    assert first.error_kind in case.kinds, story
    if case.ename and first.error_kind is ErrorKind.EXCEPTION:
        assert first.ename == case.ename, story
    if first.status == "error":
        assert len(result.attempts) == 2, story
        assert result.status == "success" and result.output == "ok\n", story
    assert outcome.left == [], f"processes outlived the run: {outcome.left}"
    assert not contacted, "the hostile code reached a listener on the host's 127.0.0.1"
    assert listing(tmp_path, skip=run_dirs) == outside, "files changed outside the run"
    assert digest(GUARDED) == source
    assert touched_source(target.marker, since) == []
    for tmp in {Path("/tmp"), Path(SUITE_TMP)}:
        assert not (tmp / target.marker).exists()
    record = notebook_text(result) + result.model_dump_json()
    assert SECRET not in record and TOKEN not in record
    assert "OPENAI_API_KEY" not in first.output

    check = EXTRA_CHECKS.get(case.name)
    if check is not None:
        check(outcome, target, settings)

    if first.status == "success":  # the service recovers: the next run works
        llm.script(fenced(HARMLESS))
        after = await hostile_runner.run("after the hostile run")
        assert after.status == "success" and after.output == "ok\n"
        assert left_behind(SUITE_TMP) == []


def _dns(outcome: Outcome, target: Target, settings: Settings) -> None:
    # Only a loopback of its own: there is no interface a query could leave by.
    assert outcome.result.attempts[0].output.strip() == "[(1, 'lo')]"


def _fork_bomb(outcome: Outcome, target: Target, settings: Settings) -> None:
    # bwrap's two processes, the kernel and its forks, under RLIMIT_NPROC (threads count too).
    assert 3 < outcome.peak <= settings.max_processes + 2, outcome.peak


def _big_file(outcome: Outcome, target: Target, settings: Settings) -> None:
    kept = Path(outcome.result.workdir, f"{target.marker}.bin")
    assert kept.stat().st_size == settings.max_file_mb * 2**20
    kept.unlink()


def _daemon(outcome: Outcome, target: Target, settings: Settings) -> None:
    assert outcome.during, "the daemon should have been running when attempt 1 ended"


def _flood(outcome: Outcome, target: Target, settings: Settings) -> None:
    first = outcome.result.attempts[0]
    if first.error_kind is ErrorKind.OUTPUT_LIMIT:
        assert first.truncated
        assert len(first.output) < 2 * settings.max_output_bytes


EXTRA_CHECKS = {
    "resolve a host name": _dns,
    "fork bomb": _fork_bomb,
    "write a 10 GB file": _big_file,
    "a child that daemonizes and sleeps": _daemon,
    "print 1 GB, 1 KB a line": _flood,
}


# Through POST /run, with /health polled all along.

API_CASES = [
    "busy loop",
    "loop that swallows KeyboardInterrupt",
    "os._exit(1)",
    "fork bomb",
    "print 1 GB, 1 KB a line",
]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, llm_server: ScriptedLLM
) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("hostile-api")
    settings = load_settings(
        openai_base_url=llm_server.base_url,
        openai_api_key=SECRET,
        notebooks_dir=root / "notebooks",
        autofile_dir=root / "autofile",
        sandbox=SANDBOX,
        llm_retries=0,
        # No kernels kept ready: then any kernel process after a run is a leak.
        pool_size=0,
        **HOSTILE,
    )
    with LiveServer(settings) as live:
        yield live


class HealthProbe:
    """Polls /health from a thread; records each answer's status and how long it took."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="health-probe", daemon=True)

    def _poll(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                status = client.get("/health").status_code
                self.answers.append((status, time.monotonic() - start))
                self._stop.wait(0.05)  # a hostile run may end within half a second

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


@pytest.mark.parametrize("name", API_CASES, ids=[slug(n) for n in API_CASES])
def test_post_run_survives_a_hostile_program(
    server: LiveServer, llm: ScriptedLLM, name: str
) -> None:
    case = BY_NAME[name]
    skip_unless_confined(case, server.settings)
    target = Target(0, REPO, Path("/nonexistent"), f"hostile-{uuid.uuid4().hex}")
    llm.script(fenced(case.program(target)), fenced(HARMLESS))

    start = time.monotonic()
    with (
        HealthProbe(server.url) as probe,
        httpx.Client(base_url=server.url, timeout=BUDGET) as client,
    ):
        r = client.post("/run", json={"prompt": f"hostile: {name}", "max_attempts": 2})
    seconds = time.monotonic() - start

    assert r.status_code == 200, r.text
    body = r.json()
    first, second = body["attempts"]
    assert seconds < BUDGET
    assert ErrorKind(first["error_kind"]) in case.kinds, body
    assert second["status"] == "success" and body["output"] == "ok\n"
    assert len(probe.answers) >= 3, "the run was too quick to probe /health during it"
    assert {status for status, _ in probe.answers} == {200}, probe.answers
    assert max(took for _, took in probe.answers) < 2.0, probe.answers
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    assert left_behind(SUITE_TMP) == []
    nbformat.validate(nbformat.read(body["notebook"], as_version=4))

"""Downloads as an attacker meets them: a real server, real sandboxed kernels, the scripted model.

A session's kernel stays alive between prompts and owns its working directory, so its code can
keep swapping a file it wrote for a symlink to any host path while the user downloads it. The
server must serve only what it opened once, by descriptor, without following any symlink: a
canary only the server's user can read never appears in a response, and nothing answers 5xx.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from autocoder.testing import ScriptedLLM, fenced
from tests.conftest import LiveServer
from tests.test_api import make_settings

pytestmark = pytest.mark.timeout(240)

DOWNLOADS = 300

# Runs inside the session's kernel for at most two minutes: it keeps swapping `data.txt` between
# a regular file and a symlink to the canary, and `sub/` between a directory and a symlink to the
# canary's directory, as fast as it can.
SWAPPER = """
import os, threading, time

def swap(canary):
    os.makedirs('sub', exist_ok=True)
    with open('sub/' + os.path.basename(canary), 'w') as f:
        f.write('harmless\\n')
    end = time.monotonic() + 120
    while time.monotonic() < end:
        with open('.data.tmp', 'w') as f:
            f.write('harmless\\n')
        os.replace('.data.tmp', 'data.txt')
        try:
            os.symlink(canary, '.link.tmp')
            os.replace('.link.tmp', 'data.txt')
            os.rename('sub', '.sub.real')
            os.symlink(os.path.dirname(canary), 'sub')
            time.sleep(0.0005)
            os.unlink('sub')
            os.rename('.sub.real', 'sub')
        except OSError:
            pass

threading.Thread(target=swap, args=(CANARY,), daemon=True).start()
print('swapping')
"""


@pytest.fixture
def canary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, bytes]]:
    """A secret file outside any sandbox, readable by the server's user only."""
    where = tmp_path_factory.mktemp("host-secret")
    secret = f"CANARY-{secrets.token_hex(16)}".encode()
    path = where / "secret.txt"
    path.write_bytes(secret)
    path.chmod(0o600)
    yield path, secret


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, llm_server: ScriptedLLM) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("downloads"), llm_server, max_sessions=2)
    with LiveServer(settings) as server:
        yield server


def download_many(client: httpx.Client, urls: list[str], secret: bytes) -> dict[int, int]:
    """Every URL `DOWNLOADS` times: the canary never comes back, nor a 5xx; status counts."""
    seen: dict[int, int] = {}
    for i in range(DOWNLOADS):
        url = urls[i % len(urls)]
        r = client.get(url)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert secret not in r.content, f"{url} served a host file"
        assert r.status_code < 500, f"{url}: {r.status_code} {r.text[:300]}"
        if r.status_code == 200:
            assert int(r.headers["content-length"]) == len(r.content)
    return seen


def test_a_session_swapping_its_files_for_symlinks_never_gets_a_host_file_served(
    live: LiveServer, llm: ScriptedLLM, canary: tuple[Path, bytes]
) -> None:
    path, secret = canary
    with httpx.Client(base_url=live.url, timeout=60) as client:
        sid = client.post("/sessions").json()["session_id"]
        try:
            llm.script(fenced(f"CANARY = {str(path)!r}\n{SWAPPER}"), fenced("print('again')"))
            first = client.post(f"/sessions/{sid}/run", json={"prompt": "start swapping"})
            assert first.status_code == 200 and first.json()["status"] == "success", first.text
            # The files the run made were copied out while the swapping went on.
            second = client.post(f"/sessions/{sid}/run", json={"prompt": "print again"}).json()

            urls = [f"/sessions/{sid}/files/data.txt", f"/sessions/{sid}/files/sub/{path.name}"]
            seen = download_many(client, urls, secret)
            assert seen.get(200, 0) > 0, seen  # the regular file was there some of the time

            for run in (first.json(), second):
                record = client.get(f"/runs/{run['run_id']}").json()
                for f in record["files"]:
                    got = client.get(f"/runs/{run['run_id']}/files/{f['name']}")
                    assert secret not in got.content and got.status_code < 500
        finally:
            client.delete(f"/sessions/{sid}")


def swap_in_a_loop(path: Path, target: Path, stop: threading.Event) -> None:
    """What hostile code would do to a file it can reach: regular file, symlink, regular…"""
    original = path.read_bytes()
    tmp, link = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.link")
    while not stop.is_set():
        tmp.write_bytes(original)
        os.replace(tmp, path)
        link.unlink(missing_ok=True)
        os.symlink(target, link)
        os.replace(link, path)
    tmp.write_bytes(original)
    os.replace(tmp, path)


def test_every_download_route_serves_what_it_opened_whatever_is_swapped_in(
    live: LiveServer, llm: ScriptedLLM, canary: tuple[Path, bytes]
) -> None:
    """A run's files and notebook, and a session's notebook, swapped for symlinks to the
    canary by something with write access to their directories (here the test itself)."""
    path, secret = canary
    settings = live.settings
    with httpx.Client(base_url=live.url, timeout=60) as client:
        llm.script(fenced("open('result.txt', 'w').write('42\\n')\nprint('done')"))
        run = client.post("/run", json={"prompt": "write the result"}).json()
        assert run["status"] == "success", run
        sid = client.post("/sessions").json()["session_id"]
        try:
            llm.script(fenced("print('hi')"))
            client.post(f"/sessions/{sid}/run", json={"prompt": "say hi"})
            session = client.get(f"/sessions/{sid}").json()
            targets: dict[str, Path] = {
                f"/runs/{run['run_id']}/files/result.txt": settings.autofile_dir
                / run["run_id"]
                / "files"
                / "result.txt",
                f"/runs/{run['run_id']}/notebook": Path(run["notebook"]),
                f"/sessions/{sid}/notebook": Path(session["notebook"]),
            }
            for target in targets.values():
                assert target.is_file(), target
            stop = threading.Event()
            swappers = [
                threading.Thread(target=swap_in_a_loop, args=(t, path, stop), daemon=True)
                for t in targets.values()
            ]
            for s in swappers:
                s.start()
            try:
                seen = download_many(client, list(targets), secret)
            finally:
                stop.set()
                for s in swappers:
                    s.join(10)
            assert seen.get(200, 0) > 0, seen
        finally:
            client.delete(f"/sessions/{sid}")


def test_a_large_file_replaced_while_it_is_served_comes_whole_with_its_own_length(
    live: LiveServer, llm: ScriptedLLM
) -> None:
    """Over the in-memory snapshot size a download streams from its descriptor: a file
    replaced meanwhile still comes whole, exactly one of the versions, never a 5xx."""
    with httpx.Client(base_url=live.url, timeout=60) as client:
        llm.script(fenced("open('big.bin', 'wb').write(b'a' * (9 * 2**20))\nprint('written')"))
        run = client.post("/run", json={"prompt": "write a big file"}).json()
        assert run["status"] == "success", run
        big = live.settings.autofile_dir / run["run_id"] / "files" / "big.bin"
        versions = {b"a" * (9 * 2**20), b"b" * (10 * 2**20)}
        stop = threading.Event()

        def replace_in_a_loop() -> None:
            tmp = big.with_name(".big.tmp")
            while not stop.is_set():
                for body in versions:
                    tmp.write_bytes(body)
                    os.replace(tmp, big)
                time.sleep(0.01)

        replacer = threading.Thread(target=replace_in_a_loop, daemon=True)
        replacer.start()
        try:
            for _ in range(20):
                r = client.get(f"/runs/{run['run_id']}/files/big.bin")
                assert r.status_code in (200, 404), r.status_code
                if r.status_code == 200:
                    assert int(r.headers["content-length"]) == len(r.content)
                    assert r.content in versions
        finally:
            stop.set()
            replacer.join(10)


def test_names_that_leave_the_directory_are_404(live: LiveServer, llm: ScriptedLLM) -> None:
    with httpx.Client(base_url=live.url, timeout=60) as client:
        llm.script(fenced("print('nothing written')"))
        run = client.post("/run", json={"prompt": "write nothing"}).json()
        for name in ("../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "a//b", "./x"):
            r = client.get(f"/runs/{run['run_id']}/files/{name}")
            assert r.status_code == 404, (name, r.status_code)

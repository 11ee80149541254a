"""The user's files: what a run is given (checked, placed in its workdir, described to the
model) and what it leaves behind (listed, served without ever leaving the run's directory)."""

from __future__ import annotations

import functools
import itertools
import json
import mimetypes
import os
import stat
import subprocess
import sys
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from autocoder.config import Settings
from autocoder.errors import AutocoderError
from autocoder.records import RunFile

PREVIEW_LINES = 5
PREVIEW_LINE_CHARS = 200
MAX_LISTED = 200
MAX_SCANNED = 10_000
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


class FileRefused(AutocoderError, ValueError):
    """An input file that cannot be given to a run; the message names the file and the rule."""


class FilesTooLarge(FileRefused):
    """Over AUTOCODER_MAX_UPLOAD_MB (HTTP 413 rather than 422)."""


# Characters that draw as `/` or `\\` and that NFKC does not map to them (it does map the
# fullwidth and small forms, U+FF0F, U+FF3C, U+FE68).
SEPARATOR_LOOKALIKES = frozenset("\u2044\u2215\u2216\u29f5\u29f8\u29f9\u2571\u2572")
# Format characters (Unicode category Cf) draw as nothing or reorder what follows: a
# right-to-left override makes `evil\u202ecsv.exe` read as `evilexe.vsc`. Scripts and emoji
# need the two zero-width joiners, which are kept.
JOINERS = frozenset("\u200c\u200d")
# Letters and symbols that draw as blank space (Hangul fillers, the blank Braille pattern): a
# name of these and whitespace only is as blank as one of spaces.
BLANKS = JOINERS | frozenset("\u115f\u1160\u3164\uffa0\u2800")


@dataclass(frozen=True)
class InputFile:
    """A file the user gives a run, already read (its size is bounded by the upload limits).

    The name is kept in NFC, the form keyboards type: the same name sent in NFD (as macOS
    spells many) is the same file, under the name a prompt would use."""

    name: str
    data: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", unicodedata.normalize("NFC", self.name))


def name_key(name: str) -> str:
    """What two names that look alike have in common: compatibility forms and case folded
    (`A.csv`, `a.csv` and `Ａ.csv` are one name to a reader, and to macOS or Windows)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def check_name(name: str) -> str:
    """A plain file name or FileRefused. Names are refused, never rewritten: a silently renamed
    file would not be where the user's prompt says it is (NFC is the one form kept)."""
    if not name:
        raise FileRefused("a file has no name")
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise FileRefused(f"the file name {name!r} is not valid UTF-8") from None
    if all(c.isspace() or c in BLANKS for c in name):
        raise FileRefused(f"the file name {name!r} is blank: only whitespace or blank characters")
    if any(unicodedata.category(c) in {"Cc", "Zl", "Zp"} for c in name):
        raise FileRefused(f"the file name {name!r} contains control characters")
    hidden = next((c for c in name if unicodedata.category(c) == "Cf" and c not in JOINERS), "")
    if hidden:
        raise FileRefused(
            f"the file name {name!r} contains an invisible formatting character "
            f"(U+{ord(hidden):04X}) that hides how it reads"
        )
    if name != name.strip():
        raise FileRefused(f"the file name {name!r} starts or ends with whitespace")
    if "/" in name or "\\" in name:
        raise FileRefused(f"the file name {name!r} contains a path separator; give a plain name")
    compat = unicodedata.normalize("NFKC", name)
    lookalike = next((c for c in name if c in SEPARATOR_LOOKALIKES), "") or next(
        (c for c in name if unicodedata.normalize("NFKC", c) in {"/", "\\"}), ""
    )
    if lookalike or "/" in compat or "\\" in compat:
        code = f" (U+{ord(lookalike):04X})" if lookalike else ""
        raise FileRefused(
            f"the file name {name!r} contains a character that looks like a path "
            f"separator{code}; give a plain name"
        )
    if name.startswith(".") or compat.startswith("."):
        raise FileRefused(f"the file name {name!r} starts with a dot")
    if size > 255:
        raise FileRefused(f"the file name {name[:40]!r}... is longer than 255 bytes")
    return name


def check_inputs(files: Sequence[InputFile], settings: Settings) -> None:
    """Every rule an input set must pass, before anything is written (FileRefused otherwise)."""
    if len(files) > settings.max_files:
        raise FileRefused(
            f"{len(files)} files given; at most {settings.max_files} (AUTOCODER_MAX_FILES)"
        )
    seen: dict[str, str] = {}
    limit = settings.max_upload_mb * 1024 * 1024
    total = 0
    for f in files:
        check_name(f.name)
        other = seen.get(name_key(f.name))
        if other is not None:
            raise FileRefused(
                f"two files are named {f.name!r}"
                if other == f.name
                else f"the file names {other!r} and {f.name!r} differ only in case or form; "
                "give names that differ"
            )
        seen[name_key(f.name)] = f.name
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


def check_free(inputs: Sequence[InputFile], directory: Path) -> None:
    """FileRefused if an input's name is taken in `directory` (a session's), compared as
    check_inputs compares names. Only the first MAX_SCANNED entries are compared beyond the
    exact name, so that a directory of a million files cannot stall the caller."""
    keys = {name_key(f.name): f.name for f in inputs}
    for f in inputs:
        if os.path.lexists(directory / f.name):
            raise FileRefused(f"the session already has a file named {f.name!r}")
    with os.scandir(directory) as entries:
        for entry in itertools.islice(entries, MAX_SCANNED):
            if name_key(entry.name) in keys:
                raise FileRefused(
                    f"the session already has a file named {entry.name!r}, which differs from "
                    f"{keys[name_key(entry.name)]!r} only in case or form"
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
    dir_fd = open_dir(workdir)
    if dir_fd is None:
        raise FileRefused(f"cannot write into {workdir}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        for f in files:
            try:
                fd = os.open(f.name, flags, 0o444, dir_fd=dir_fd)
            except FileExistsError:
                raise FileRefused(f"a file named {f.name!r} is already there") from None
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), 0o444)  # on the descriptor: the name may change meanwhile
                out.write(f.data)
    finally:
        os.close(dir_fd)


def describe(files: Sequence[InputFile], views: Mapping[str, str] | None = None) -> str:
    """What the model is told about the inputs: names, sizes, and what pandas makes of a data
    file (`views`, read in the run's kernel: see `view_code`), else its first lines of text."""
    if not files:
        return ""
    views = views or {}
    parts = ["The working directory holds these files (read them by these names):"]
    for f in files:
        parts.append(f"- {f.name} ({_size(len(f.data))})")
        view = views.get(f.name)
        if view:
            parts.append("\n".join("    " + line for line in view.splitlines()))
            continue
        head = _head(f)
        if head:
            parts.append("  first lines:\n" + "\n".join("    " + line for line in head))
    return "\n".join(parts)


VIEW_CHARS = 1500
VIEW_SUFFIXES = {".csv", ".tsv", ".json", ".jsonl", ".xlsx", ".xls", ".parquet"}
VIEW_MARK = "autocoder-views:"
# Runs in the run's own sandboxed kernel, under its limits, before the model is asked: a
# hostile file can only fail or time out there. It binds nothing in the kernel's namespace
# (its names live in exec's own dict); pandas stays imported, which the code asked for next
# would do anyway. It prints one line: the mark, then {name: view} as JSON.
_VIEW = r"""
import csv, json, warnings

def view(name, limit):
    import pandas as pd

    suffix = name.rsplit(".", 1)[-1].lower()
    extra = ""
    if suffix in ("csv", "tsv"):
        sep = "\t" if suffix == "tsv" else ","
        call = f"pd.read_csv({name!r}" + (", sep='\\t')" if sep == "\t" else ")")
        try:
            df = pd.read_csv(name, sep=sep)
            if df.shape[1] == 1:
                with open(name, newline="", errors="replace") as f:
                    other = csv.Sniffer().sniff(f.read(65536), delimiters=",;\t|").delimiter
                if other != sep:
                    df, call = pd.read_csv(name, sep=other), f"pd.read_csv({name!r}, sep={other!r})"
        except csv.Error:
            pass
    elif suffix in ("json", "jsonl"):
        lines = suffix == "jsonl"
        call = f"pd.read_json({name!r}" + (", lines=True)" if lines else ")")
        if not lines:
            with open(name, errors="replace") as f:
                data = json.load(f)
            if isinstance(data, dict):
                extra = f"json.load gives a dict with keys {list(data)[:20]}\n"
            elif isinstance(data, list):
                first = data[0] if data else None
                keys = f" with keys {list(first)[:20]}" if isinstance(first, dict) else ""
                extra = f"json.load gives a list of {len(data)} {type(first).__name__}{keys}\n"
        df = pd.read_json(name, lines=lines)
    elif suffix in ("xlsx", "xls"):
        call = f"pd.read_excel({name!r})"
        df = pd.read_excel(name)
    else:
        call = f"pd.read_parquet({name!r})"
        df = pd.read_parquet(name)
    types = ", ".join(f"{c} ({t})" for c, t in df.dtypes.astype(str).items())
    with pd.option_context("display.width", 120, "display.max_columns", 12,
                           "display.max_colwidth", 30):
        head = df.head(5).to_string()
    text = (f"{extra}{call} gives {df.shape[0]} rows x {df.shape[1]} columns: {types}\n"
            f"first rows:\n{head}")
    return text if len(text) <= limit else text[: limit - 4] + " ..."

def views(names, limit):
    found = {}
    try:
        import pandas  # noqa: F401
    except Exception:
        return found
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                found[name] = view(name, limit)
            except Exception as e:
                found[name] = f"reading it fails: {type(e).__name__}: {str(e)[:200]}"
    return found
"""


def view_code(files: Sequence[InputFile]) -> str | None:
    """Code that prints what pandas makes of the data files among `files` (None if none is)."""
    names = [f.name for f in files if Path(f.name).suffix.lower() in VIEW_SUFFIXES]
    if not names:
        return None
    body = _VIEW + f"print({VIEW_MARK!r} + json.dumps(views({names!r}, {VIEW_CHARS})))\n"
    return f"exec({body!r}, {{}})"


def parse_views(output: str) -> dict[str, str]:
    """The views `view_code` printed ({} when it printed none, or nothing readable)."""
    for line in reversed(output.splitlines()):
        if line.startswith(VIEW_MARK):
            try:
                found = json.loads(line[len(VIEW_MARK) :])
            except ValueError:
                return {}
            if isinstance(found, dict):
                return {
                    str(k): str(v)[: VIEW_CHARS + 200]
                    for k, v in found.items()
                    if isinstance(v, str)
                }
    return {}


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


def walk_files(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every regular file below `root` (its slash-separated relative name and lstat), in name
    order, walked by descriptor: a directory swapped for a symlink meanwhile is not followed."""
    if not root.is_dir():
        return
    try:
        walk = os.fwalk(root, follow_symlinks=False)
        for dirpath, dirnames, filenames, dir_fd in walk:
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(root)
            for fname in sorted(filenames):
                try:
                    st = os.stat(fname, dir_fd=dir_fd, follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield (rel_dir / fname).as_posix(), st
    except OSError:
        return


def names_beneath(root: Path, limit: int = MAX_LISTED) -> list[str]:
    """The regular files under `root` (`/`-separated), walked by descriptor; at most `limit`."""
    return [rel for rel, _ in itertools.islice(walk_files(root), limit)]


def list_outputs(files_dir: Path, inputs: Iterable[str] = ()) -> list[RunFile]:
    """The regular files a run left (symlinks and inputs left as given are not listed)."""
    skip = set(inputs)
    found: list[RunFile] = []
    for rel, st in walk_files(files_dir):
        if rel in skip and not st.st_mode & 0o222:
            continue
        found.append(RunFile(name=rel, size=st.st_size, media_type=media_type(rel)))
        if len(found) >= MAX_LISTED:
            break
    return found


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted under a served name must not hold the server's thread.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
READ_CHUNK = 256 * 1024


class OpenedFile:
    """A regular file held by its descriptor. Whatever later happens to its name (a swap for
    a symlink, a rename, a replacement), every read comes from the file that was checked, and
    never beyond the size it had when it was opened."""

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.fd: int | None = fd
        self.size = size

    def chunks(self, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        """The content from the start, at most `size` bytes (less if it was cut meanwhile)."""
        offset = 0
        while self.fd is not None and offset < self.size:
            data = os.pread(self.fd, min(chunk, self.size - offset), offset)
            if not data:
                return
            offset += len(data)
            yield data

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def tail(self, limit: int) -> bytes:
        """The last `limit` bytes of what it held when opened ("" if unreadable)."""
        if self.fd is None:
            return b""
        try:
            return os.pread(self.fd, limit, max(0, self.size - limit))
        except OSError:
            return b""

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> OpenedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _split_name(name: str) -> list[str] | None:
    parts = name.split("/")
    if not name or any(p in {"", ".", ".."} or "\x00" in p for p in parts):
        return None
    return parts


def open_dir(root: Path, parts: Sequence[str] = ()) -> int | None:
    """A descriptor of `root/parts...`, walked one directory at a time from `root` without
    following a symlink at any step (the caller closes it), or None."""
    try:
        fd = os.open(root, _DIR_FLAGS)
    except (OSError, ValueError):
        return None
    try:
        for part in parts:
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except (OSError, ValueError):
        os.close(fd)
        return None
    return fd


def open_beneath(root: Path, name: str) -> OpenedFile | None:
    """The regular file `name` (slash-separated, relative) inside `root`, opened once, or None.

    This is how the server reads anything from a directory that generated code can write: no
    component is a symlink (each is opened with O_NOFOLLOW from its parent's descriptor, so a
    swap between a check and an open cannot send it elsewhere), `..` and absolute names are
    refused, and the descriptor is checked with fstat to be a regular file.
    """
    parts = _split_name(name)
    if parts is None:
        return None
    dir_fd = open_dir(root, parts[:-1])
    if dir_fd is None:
        return None
    try:
        fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dir_fd)
    except (OSError, ValueError):
        return None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return OpenedFile(parts[-1], fd, st.st_size)


def copy_beneath(root: Path, name: str, dest: Path) -> bool:
    """Copy the regular file `name` from inside `root` (see `open_beneath`) to a new file
    `dest`, as it was when opened; False when there is no such file."""
    opened = open_beneath(root, name)
    if opened is None:
        return False
    with opened:
        fd = os.open(
            dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
        with os.fdopen(fd, "wb") as out:
            for data in opened.chunks():
                out.write(data)
    return True


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

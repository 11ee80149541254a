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
from collections.abc import Iterable, Mapping, Sequence
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

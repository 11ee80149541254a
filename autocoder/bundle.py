"""A run's notebook with its files: the folder beside the notebook, and both as one zip.

A notebook whose code works with files re-runs only where those files are. Jupyter starts a
notebook's kernel in the notebook's own folder, and the code reads and writes by bare names,
as it did in the run's private working directory. So a run that was given files, or wrote
some, gets a folder beside its notebook, `<notebook name>_files/` (as nbconvert names a
notebook's resources): the inputs as given (read-only, as the run had them) and the files the
code wrote; the notebook's first code cell makes it the working directory, and its links to
the files are relative to the notebook. The folder is the user's copy: re-running the
notebook writes into it, while the API serves what the run kept in its own directory.

`zip_run` packs the same layout from the record and the run's directory (`GET
/runs/{id}/bundle`), so a notebook that leaves the machine re-runs wherever it is unpacked.
What the run's directory holds is read by descriptor, never following a link its code left.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from autocoder import disk, files
from autocoder.files import InputFile
from autocoder.notebook import files_folder, write_atomic
from autocoder.records import RunResult
from autocoder.store.base import Store, StoredFile

log = logging.getLogger(__name__)

ZIP_MEDIA_TYPE = "application/zip"
_CHUNK = 1 << 16


def folder_beside(notebook: Path) -> Path:
    return notebook.with_name(files_folder(notebook))


def write_inputs(folder: Path, inputs: Sequence[InputFile]) -> None:
    """The inputs as given, read-only (mode 0444), into `folder`."""
    for f in inputs:
        write_atomic(folder / files.check_name(f.name), f.data, mode=0o444)


def write_run_folder(
    result: RunResult, notebook: Path, inputs: Sequence[InputFile], reserve: int = 0
) -> None:
    """The folder beside a run's notebook, for a run that kept files (`result.workdir`): its
    inputs as given, then what its code wrote, copied from the run's directory by descriptor.
    Best effort: these are copies, so a file is left out when the disk would keep less than
    `reserve` bytes free after it (room for the next run), and a folder that cannot be
    written is logged; the record and the notebook are what count."""
    if not result.workdir:
        return
    folder = folder_beside(notebook)
    left_out = 0
    try:
        write_inputs(folder, inputs)
        given = {f.name for f in inputs}
        kept = Path(result.workdir)
        for name, st in itertools.islice(files.walk_files(kept), files.MAX_LISTED):
            if name in given:
                continue
            if disk.free_bytes(folder) - st.st_size < reserve:
                left_out += 1
                continue
            _copy_beneath(kept, name, folder / name)
    except OSError as e:
        log.warning("run %s: the files beside its notebook were not written: %s", result.run_id, e)
    if left_out:
        log.warning(
            "run %s: %d file(s) not copied beside its notebook, to keep room on the disk "
            "(the run's own copies are kept)",
            result.run_id,
            left_out,
        )


def keep_inputs_beside(notebook: Path, inputs: Sequence[InputFile]) -> None:
    """A session's inputs, beside the session's notebook (best effort, as above)."""
    if not inputs:
        return
    try:
        write_inputs(folder_beside(notebook), inputs)
    except OSError as e:
        log.warning("%s: the files beside it were not written: %s", notebook.name, e)


def _copy_beneath(root: Path, name: str, target: Path) -> None:
    opened = files.open_beneath(root, name)
    if opened is None:
        return
    with opened:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(tmp_fd, "wb") as dst:
                os.fchmod(dst.fileno(), 0o644)
                for chunk in opened.chunks(_CHUNK):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def zip_run(store: Store, autofile_dir: Path, run_id: str) -> tuple[IO[bytes], str] | None:
    """The run's notebook and its folder as a zip in an unnamed temporary file (rewound), and
    the zip's file name; None for an unknown run. The notebook is the one the store serves;
    the files are the run's directory's (a shared store's bytes when this replica has none)."""
    result = store.get(run_id)
    notebook = store.notebook(run_id) if result is not None else None
    if result is None or notebook is None:
        return None
    stem = Path(notebook.name).stem
    folder = files_folder(notebook.name)
    spool = tempfile.TemporaryFile()  # noqa: SIM115 (handed to the caller, who closes it)
    try:
        with zipfile.ZipFile(spool, "w", zipfile.ZIP_DEFLATED) as z:
            _add(z, notebook.name, _read(notebook))
            kept = autofile_dir / run_id / "files"
            names = files.names_beneath(kept)
            for name in names:
                opened = files.open_beneath(kept, name)
                if opened is None:
                    continue
                with opened, z.open(_info(f"{folder}/{name}"), "w") as dst:
                    for chunk in opened.chunks(_CHUNK):
                        dst.write(chunk)
            if not names:
                for f in result.files:
                    stored = store.output_file(run_id, f.name)
                    if stored is not None:
                        _add(z, f"{folder}/{f.name}", _read(stored))
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool, f"{stem}.zip"


def _read(stored: StoredFile) -> bytes:
    if stored.opened is None:
        return stored.data or b""
    with stored.opened as opened:
        return opened.read()


def _info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, time.localtime()[:6])
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o100644 << 16
    return info


def _add(z: zipfile.ZipFile, name: str, data: bytes) -> None:
    z.writestr(_info(name), data)

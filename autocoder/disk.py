"""Disk budgets: how much generated code may write, and what the server does when its disk fills.

Each kernel's working directory is a tmpfs of AUTOCODER_MAX_RUN_DISK_MB (a session's, for the
session's life) and its runtime dir a small one, both mounted by the server in its own mount
namespace before the kernel starts. Code that writes past them gets ENOSPC inside the sandbox,
and nothing it does while it runs touches the host's disk. An exec'd kernel's bwrap binds the
mounts as they are; a forked kernel's init attaches a clone of each (`clone`) in its own view.
Mounting needs a root server (CAP_SYS_ADMIN); where it cannot be done the budget is not
enforced, and one line in the log says so.

A tmpfs lives in memory: what the code writes there is charged to its memory cgroup
(AUTOCODER_MEMORY_MB) too, so the budget stays below that. Once the kernel is gone, `keep`
copies the files to the run's record, smallest first, for as long as the disk keeps room for
the record beside them, and unmounts. What it leaves out, the record says.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import secrets
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from autocoder.config import Settings
from autocoder.errors import DiskFull
from autocoder.files import open_beneath, walk_files

log = logging.getLogger(__name__)

MIB = 1 << 20
RUNTIME_DIR_BYTES = 4 * MIB  # a connection file, IPC sockets and the kernel's stderr log
# Left free beside a run's files for records and notebooks (this run's and those running beside it).
RECORD_ROOM = 16 * MIB
# Less than this free and a run could not even be recorded: it is refused before it starts.
MIN_ROOM = 4 * MIB
# A budget with less than this left, after the code failed, was what made it fail.
FULL_SLACK = 256 * 1024
INODES_PER_MB = 64  # files a budget may hold: their inodes cost memory that size= does not count

_MS_NOSUID, _MS_NODEV = 2, 4
_MNT_DETACH = 2
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
_AT_FDCWD = -100
_SYS_OPEN_TREE = 428  # the same number on every architecture (the new syscalls share one table)


def budget_bytes(settings: Settings) -> int:
    return settings.max_run_disk_mb * MIB


def no_space(e: BaseException) -> bool:
    """Whether an error means the disk (or a quota) is full."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _fail(what: str, path: Path) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}", str(path))


def confine(path: Path, size: int) -> bool:
    """Mount a tmpfs of `size` bytes on the directory `path`, unless something is mounted there.

    True when this call mounted it: the caller owns it then (`keep`, `remove`). False when one
    was there already, or when it cannot be done here (said once in the log: the budget then
    does not hold)."""
    if size <= 0 or os.path.ismount(path) or any(path.iterdir()):
        return False  # never over files: they would be hidden, not capped
    inodes = max(4096, size // MIB * INODES_PER_MB)
    options = f"size={size},nr_inodes={inodes},mode=0700"
    flags = _MS_NOSUID | _MS_NODEV
    if _libc().mount(b"tmpfs", os.fsencode(path), b"tmpfs", flags, options.encode()) != 0:
        _not_enforced(_fail("mount", path).strerror or "mount failed")
        return False
    return True


def confine_workdir(settings: Settings, path: Path) -> bool:
    """`confine` with the run's budget (AUTOCODER_MAX_RUN_DISK_MB; 0 leaves it uncapped)."""
    return confine(path, budget_bytes(settings))


@functools.cache
def _not_enforced(why: str) -> None:
    log.warning(
        "AUTOCODER_MAX_RUN_DISK_MB is not enforced: a size-capped working directory cannot be "
        "mounted here (%s; it needs a root server), so generated code can fill the disk",
        why,
    )


def unmount(path: Path) -> None:
    """Detach what is mounted on `path` (its files go once nothing holds them); never raises."""
    _libc().umount2(os.fsencode(path), _MNT_DETACH)


def remove(path: Path) -> None:
    """Remove a directory that may be a budget: unmounted first, so its files go with it."""
    if os.path.ismount(path):
        unmount(path)
    shutil.rmtree(path, ignore_errors=True)


def clone(path: Path) -> int:
    """A detached copy of the mount on `path` (open_tree): an fd a process in another mount
    namespace can attach (move_mount) to see the same files. A bind mount cannot cross over."""
    fd = int(
        _libc().syscall(
            ctypes.c_long(_SYS_OPEN_TREE),
            ctypes.c_int(_AT_FDCWD),
            os.fsencode(path),
            ctypes.c_uint(_OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC),
        )
    )
    if fd < 0:
        raise _fail("open_tree", path)
    return fd


def full(path: Path | None) -> bool:
    """Whether `path` is a budget with (next to) nothing left: no room, or no more files."""
    if path is None:
        return False
    try:
        if not os.path.ismount(path):
            return False
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_SLACK or st.f_favail == 0


def budget_words(settings: Settings) -> str:
    """What an attempt that filled its working directory is told, naming the setting."""
    return (
        f"the disk budget was reached: the working directory may hold "
        f"{settings.max_run_disk_mb:,} MB in all (AUTOCODER_MAX_RUN_DISK_MB)"
    )


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path` (or, when
    it does not exist yet, the directory it would be made in)."""
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
        except (FileNotFoundError, NotADirectoryError):
            continue
        return st.f_bavail * st.f_frsize
    return 0


def record_dirs(settings: Settings) -> list[tuple[Path, str]]:
    """The directories runs are recorded in, with the setting that names each."""
    return [
        (settings.notebooks_dir, "AUTOCODER_NOTEBOOKS_DIR"),
        (settings.autofile_dir, "AUTOCODER_AUTOFILE_DIR"),
    ]


def check_room(settings: Settings) -> None:
    """DiskFull, naming the directory, when a run could not even be recorded."""
    for path, name in record_dirs(settings):
        free = free_bytes(path)
        if free < MIN_ROOM:
            raise DiskFull(
                f"no room to record a run: {megabytes(free)} free on the disk holding "
                f"{str(path.resolve())!r} ({name}); free some space there and try again"
            )


def low_disk(settings: Settings) -> tuple[int, str | None]:
    """The least free space of the record directories' disks, and what is wrong with it: less
    than one run's budget and room for its record, or (worse) not even room for a record."""
    # The first of the fullest: the notebooks' when both share a disk.
    free, path, name = min(
        ((free_bytes(p), p, n) for p, n in record_dirs(settings)), key=lambda d: d[0]
    )
    where = f"{megabytes(free)} free on the disk holding {str(path.resolve())!r} ({name})"
    if free < MIN_ROOM:
        return free, f"disk full: {where}; runs cannot be recorded"
    if free < budget_bytes(settings) + RECORD_ROOM:
        return free, (
            f"low disk: {where}; a run may write {settings.max_run_disk_mb:,} MB "
            "(AUTOCODER_MAX_RUN_DISK_MB) and its record needs room beside it"
        )
    return free, None


def megabytes(n: int) -> str:
    return f"{n / MIB:,.1f} MB"


@dataclass
class Kept:
    """What `keep` did with a directory's files."""

    kept: bool = False  # whether `dest` now holds them
    dropped: list[tuple[str, int]] = field(default_factory=list)  # (name, size), left out
    room: int = 0  # bytes the disk had for them beside the reserve

    def words(self, where: Path) -> str:
        """One sentence for the record about what was left out ('' when nothing was)."""
        if not self.dropped:
            return ""
        total = sum(size for _, size in self.dropped)
        listed = ", ".join(f"{name} ({megabytes(size)})" for name, size in self.dropped[:10])
        more = f" and {len(self.dropped) - 10} more" if len(self.dropped) > 10 else ""
        return (
            f"{len(self.dropped)} file(s) the code wrote ({megabytes(total)}) were not kept: "
            f"the disk holding {str(where)!r} had room for {megabytes(max(self.room, 0))} "
            f"beside the records: {listed}{more}."
        )


def keep(src: Path, dest: Path, reserve: int) -> Kept:
    """Move the files in `src` to `dest` (which must not exist), leaving `reserve` bytes free on
    the disk; `src` is gone afterwards. From a budget they are copied, smallest first, while
    they fit; a plain directory (already on that disk) is renamed, and its largest files then
    removed until the reserve is free again. Only regular files and directories are kept."""
    found = _regular_files(src)
    if not found:
        remove(src)
        return Kept()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not os.path.ismount(src):
        shutil.move(str(src), str(dest))
        return _trim(dest, found, reserve)
    result = Kept(kept=True, room=free_bytes(dest.parent) - reserve)
    used = 0
    smallest_first = sorted(found, key=lambda f: (f[1], f[0]))
    try:
        for number, (rel, size) in enumerate(smallest_first):
            if used + size > result.room:
                result.dropped += smallest_first[number:]
                break
            try:
                _copy(src, dest, rel)
            except OSError as e:
                if not no_space(e):
                    continue  # a name too long to copy, say: it is not listed either
                result.dropped += smallest_first[number:]
                break
            used += size
    finally:
        remove(src)
    result.kept = dest.is_dir()
    result.dropped.sort(key=lambda f: f[0])
    return result


def settle(path: Path, reserve: int = RECORD_ROOM) -> Kept:
    """Turn a budget into a plain directory at the same path: its files copied to the disk
    (as `keep` does), the tmpfs unmounted. A path that is not a budget is left alone."""
    if not os.path.ismount(path):
        return Kept(kept=path.is_dir())
    staged = path.with_name(f".{path.name}-{secrets.token_hex(4)}")
    done = keep(path, staged, reserve)
    if done.kept:
        os.replace(staged, path)
    else:
        path.mkdir(parents=True, exist_ok=True)
    return done


def _regular_files(root: Path) -> list[tuple[str, int]]:
    """(name relative to root, size) of each regular file under `root`, no link followed."""
    return [(rel, st.st_size) for rel, st in walk_files(root)]


def _copy(src: Path, dest: Path, rel: str) -> None:
    """One file, read without following a link, written as a new file with its mode bits; a
    partial copy is removed."""
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    opened = open_beneath(src, rel)  # no link followed at any component
    if opened is None or opened.fd is None:
        return
    fd_in = opened.fd
    try:
        st = os.fstat(fd_in)
        fd_out = os.open(
            target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            offset = 0
            while offset < st.st_size:
                sent = os.sendfile(fd_out, fd_in, offset, min(st.st_size - offset, 64 * MIB))
                if sent == 0:
                    break
                offset += sent
            os.fchmod(fd_out, stat.S_IMODE(st.st_mode) & 0o777)
        except BaseException:
            os.close(fd_out)
            target.unlink(missing_ok=True)
            raise
        os.close(fd_out)
    finally:
        opened.close()


def _trim(dest: Path, found: list[tuple[str, int]], reserve: int) -> Kept:
    """Largest first, remove files from `dest` until the disk has `reserve` bytes free."""
    result = Kept(kept=True, room=free_bytes(dest) - reserve + sum(s for _, s in found))
    for rel, size in sorted(found, key=lambda f: (-f[1], f[0])):
        if free_bytes(dest) >= reserve:
            break
        try:
            (dest / rel).unlink()
        except OSError:
            continue
        result.dropped.append((rel, size))
    result.dropped.sort(key=lambda f: f[0])
    return result

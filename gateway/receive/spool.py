"""The spool: received instances as files, written durably before we answer success.

Layout: ``SPOOL/<study-uid>/<sop-instance-uid>.<token>.dcm``. The random token makes every
write land on its own path, so two associations racing with the same SOP Instance UID never
overwrite each other's file; the database decides which one is kept.

Several listeners, on one host or several, may share a spool. Each writes its temp files in its
own folder, ``SPOOL/.incoming/<host>-<pid>-<token>/``, and at start removes only folders whose
writer is gone (a process of this host that has exited) or that nothing touched for
``STALE_SECONDS`` (another host's: its processes cannot be seen from here); never a temp file
another live process is writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import GatewayError

Buffer = bytes | memoryview

# hashlib releases the GIL on large buffers, so the checksum runs on another core while this
# thread writes and fsyncs the same bytes.
_hasher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool-sha256")

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# A temp file lives for one write (seconds). A writer's folder untouched for this long holds no
# write in progress: removing it is safe even if its process lives (it makes the folder again).
STALE_SECONDS = 3600.0


class SpoolFull(GatewayError, OSError):
    """Free space on the spool's file system is below the configured reserve."""


class SpoolFileUnreadable(GatewayError, OSError):
    """A recorded spool file is missing or cannot be read here: a storage fault (a host that
    does not see the shared spool, a volume not mounted, an I/O error), not a property of the
    image, so the work that needs it is retried rather than done without it."""

    @classmethod
    def of(cls, path: str | Path, cause: OSError, *, sop_instance_uid: str) -> SpoolFileUnreadable:
        """The error for ``path`` (of instance ``sop_instance_uid``) failing with ``cause``."""
        why = cause.strerror or type(cause).__name__
        return cls(
            f"spooled file of instance {sop_instance_uid} cannot be read on host "
            f"{socket.gethostname()}: {why} ({path})",
            study_uid=Path(path).parent.name,
            sop_instance_uid=sop_instance_uid,
        )


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    size_bytes: int
    sha256: str


def spool_file(root: Path, stored: str) -> Path:
    """The file that a row's stored spool path names, on this host: a path relative to the
    spool root is under ``root`` (this host's mount of the shared spool), an absolute one (as
    recorded so far) is taken as it is. Readers accept both, so that they can be deployed before
    any listener records relative paths. A relative path that is not under ``root`` but exists
    as it is (a data folder given relative to the working directory, as the embedded default
    `cxr-data` is) is taken as it is."""
    path = Path(stored)
    if path.is_absolute():
        return path
    under_root = root / path
    if not under_root.exists() and path.exists():
        return path
    return under_root


def stored_path(root: Path, path: Path) -> str:
    """What a row records for spool file ``path``: its path relative to the spool ``root``
    (POSIX separators), so that every host finds it under its own mount of the shared spool
    (``spool_file`` reads it back). Raises ValueError for a file that is not under ``root``."""
    return path.relative_to(root).as_posix()


def is_valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and UID_PATTERN.match(value) is not None


class Spool:
    """Writes files with temp file + fsync + atomic rename + directory fsync."""

    def __init__(self, root: Path, *, min_free_bytes: int) -> None:
        # Absolute, so that the paths recorded for the files do not depend on the working
        # directory of the process that reads them.
        self.root = root.absolute()
        self.min_free_bytes = min_free_bytes
        self.writer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._incoming = root / ".incoming"
        self._tmp = self._incoming / self.writer

    def prepare(self) -> None:
        """Create this process's temp folder and remove the temp files of writers that are gone
        (a crash mid-write: never acknowledged). Other live writers' files are left alone."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        for entry in self._incoming.iterdir():
            if entry != self._tmp and self._writer_gone(entry):
                _remove(entry)

    def other_writers(self) -> list[str]:
        """Names (``host-pid-token``) of the other processes that may be writing to this spool
        now: their temp folders exist and their writer is not known to be gone."""
        return sorted(
            entry.name
            for entry in self._incoming.iterdir()
            if entry != self._tmp and not self._writer_gone(entry)
        )

    def _writer_gone(self, entry: Path) -> bool:
        """Whether the writer of temp folder ``entry`` is gone: a process of this host that has
        exited (or this very process, from an earlier start: a container restarted with the
        same pid), or anything untouched for STALE_SECONDS."""
        host, _, pid = entry.name.rpartition("-")[0].rpartition("-")
        if (
            host == socket.gethostname()
            and pid.isdigit()
            and (int(pid) == os.getpid() or not process_alive(int(pid)))
        ):
            return True
        try:
            return time.time() - _newest_mtime(entry) > STALE_SECONDS
        except FileNotFoundError:
            return False  # removed by someone else meanwhile: nothing left to remove

    def check_space(self, needed_bytes: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - needed_bytes < self.min_free_bytes:
            raise SpoolFull(f"spool has {free // 2**20} MB free")

    def write(self, study_uid: str, sop_instance_uid: str, parts: Sequence[Buffer]) -> SpooledFile:
        """Store the concatenation of ``parts`` durably (no copy is made of them); raise OSError
        (SpoolFull included) when it cannot be."""
        if not (is_valid_uid(study_uid) and is_valid_uid(sop_instance_uid)):
            raise ValueError("UIDs must be dotted digits (they become file names)")
        size = sum(len(part) for part in parts)
        self.check_space(size)
        folder = self.root / study_uid
        folder.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(4)
        final = folder / f"{sop_instance_uid}.{token}.dcm"
        tmp = self._tmp / f"{sop_instance_uid}.{token}.part"
        checksum = _checksum(parts, size)
        try:
            fd = self._create_temp(tmp)
            try:
                _write_all(fd, parts)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(folder)
        except BaseException:
            tmp.unlink(missing_ok=True)
            # The caller may free ``parts`` as soon as we return: the hashing must be over.
            if not checksum.cancel():
                wait([checksum])
            raise
        return SpooledFile(final, size, checksum.result())

    def _create_temp(self, tmp: Path) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            return os.open(tmp, flags, 0o600)
        except FileNotFoundError:
            # Our folder was idle for STALE_SECONDS and another process's start-up removed it.
            self._tmp.mkdir(parents=True, exist_ok=True)
            return os.open(tmp, flags, 0o600)

    @staticmethod
    def discard(path: Path) -> None:
        path.unlink(missing_ok=True)

    def files(self) -> Iterator[Path]:
        """Every instance file in the spool (not temp files, not quarantined ones)."""
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and is_valid_uid(folder.name):
                yield from sorted(folder.glob("*.dcm"))

    def quarantine(self, path: Path) -> Path:
        """Move a file that cannot be recorded out of the way, keeping it for inspection."""
        folder = self.root / ".quarantine"
        folder.mkdir(exist_ok=True)
        target = folder / f"{path.parent.name}.{path.name}"
        os.replace(path, target)
        _fsync_dir(folder)
        return target


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _newest_mtime(entry: Path) -> float:
    newest = entry.lstat().st_mtime
    if entry.is_dir() and not entry.is_symlink():
        for child in entry.iterdir():
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, child.lstat().st_mtime)
    return newest


def _remove(entry: Path) -> None:
    """Remove a gone writer's temp folder (or a temp file of the layout before folders). Races
    with another process doing the same, or with the owner making its folder again, are fine."""
    if not entry.is_dir() or entry.is_symlink():
        entry.unlink(missing_ok=True)
        return
    with contextlib.suppress(FileNotFoundError):
        for child in entry.iterdir():
            child.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # gone, or not empty: its owner wrote again meanwhile
        entry.rmdir()


# Below this size the checksum is computed in the writing thread: a hand-off to the pool needs
# another thread to be scheduled for what is a few tens of microseconds of hashing.
_HASH_INLINE_BYTES = 1 << 20


def _checksum(parts: Sequence[Buffer], size: int) -> Future[str]:
    if size > _HASH_INLINE_BYTES:
        return _hasher.submit(_sha256, parts)
    done: Future[str] = Future()
    done.set_result(_sha256(parts))
    return done


def _sha256(parts: Sequence[Buffer]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# Writes go to the page cache in pieces of at most this size: in issue #20's measurements one
# 7 MB write sometimes took 15 ms instead of 1.4 ms on these machines; pieces kept it steady.
WRITE_PIECE_BYTES = 1 << 20


def _write_all(fd: int, parts: Sequence[Buffer]) -> None:
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            written = os.write(fd, view[:WRITE_PIECE_BYTES])
            view = view[written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

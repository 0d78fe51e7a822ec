"""The single-instance lock of a state folder, and start-up cleanup of temp files.

Only one opus may serve a vault (SPEC §4). The lock is ``fcntl.flock`` on a file
that holds the holder's pid: the kernel releases it on any death, SIGKILL
included, so a stale file never blocks a restart. The file is never unlinked
(unlinking would let two processes lock two different inodes under one name).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType

from .errors import LockHeld

__all__ = ("InstanceLock", "cleanup_temp_files")

logger = logging.getLogger(__name__)

_PID_BYTES = 32


class InstanceLock:
    """An exclusive, non-blocking ``flock`` on ``path``; a context manager.

    ``acquire()`` raises :class:`LockHeld` naming the holder's pid when another
    process (or another open of the file in this process) holds the lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and write our pid into the file; raise LockHeld if taken."""
        if self._fd is not None:
            return
        # No O_TRUNC: the holder's pid must survive our failed attempt.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
                raise LockHeld(self.path, _read_pid(fd)) from None
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        logger.debug("lock %s acquired by pid %d", self.path, os.getpid())

    def release(self) -> None:
        """Drop the lock (the file stays). Does nothing when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # before unlocking: never erase a successor's pid
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        logger.debug("lock %s released", self.path)

    def holder(self) -> int | None:
        """The pid written in the file if someone holds the lock now, else None.

        Probes with a non-blocking shared lock, so a process acquiring at the
        same instant may see the lock as held (and this returns its pid or None).
        """
        if self._fd is not None:
            return os.getpid()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
                return _read_pid(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    """The pid at the start of the lock file; None if empty (holder still writing) or junk."""
    text = os.pread(fd, _PID_BYTES, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def cleanup_temp_files(folder: Path, prefix: str) -> list[Path]:
    """Remove regular files in ``folder`` whose name starts with ``prefix``.

    For temp files a killed predecessor left behind; call it under the lock,
    before anything else writes there. Returns what was removed.
    """
    if not prefix:
        raise ValueError("an empty prefix would match every file")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
            path = Path(entry.path)
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.info("removed %d stale temp file(s) in %s", len(removed), folder)
    return removed

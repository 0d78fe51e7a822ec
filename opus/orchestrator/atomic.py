"""Crash-safe file replacement, shared by every state file opus writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TEMP_PREFIX = ".opus-tmp-"
"""Name prefix of every temp file opus writes; stale ones are removed at start-up."""


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600, sync: bool = True) -> None:
    """Replace ``path`` with ``data``: temp file in its folder, fsync, os.replace, fsync folder.

    A reader sees the old file or the new one, never half of either; a crash leaves at most
    a ``.opus-tmp-*`` file behind. ``sync=False`` skips the fsyncs: still atomic for every
    reader and across a crash of opus, only not across a power loss.
    """
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(path.parent)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""A supervised child's output: streamed to its log file, only a bounded tail in memory.

``Capture`` reads one pipe and marks ``Progress`` (for the stall watch); ``LogSink`` writes
each line, redacted and tagged ``out|`` / ``err|``, plus ``# `` notes, to the log file as
it arrives. An agent may print hundreds of MB (SPEC §12: opus stays under 150 MB RSS): the
log file has everything, memory holds the last ``MAX_KEPT`` bytes of stdout (what a preset
parses: its final JSON) and ``MAX_KEPT_ERR`` of stderr.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

import anyio
from anyio.abc import ByteReceiveStream

from .redact import Redactor

__all__ = (
    "MAX_KEPT",
    "MAX_KEPT_ERR",
    "TAIL_BYTES",
    "TAIL_LINES",
    "Capture",
    "Counts",
    "LogSink",
    "Progress",
    "output_tail",
)

MAX_KEPT = 8 * 2**20
"""Bytes of stdout kept in memory (the tail a preset parses); the log file has more."""
MAX_LOG = 256 * 2**20
"""Characters of a stage's output its log file takes from the start (SPEC §12's 200 MB
stream in full); beyond them only the last ``LOG_TAIL`` are kept, written when the stage
ends (a runaway agent printing for the whole ``stage_timeout`` must not fill the disk under
the registry)."""
LOG_TAIL = 2**20
MAX_KEPT_ERR = 2**20
"""Bytes of stderr kept in memory (error messages, the output tail of a failure)."""
TAIL_LINES = 200
TAIL_BYTES = 16 * 1024


def output_tail(
    stdout: str, stderr: str = "", lines: int = TAIL_LINES, limit: int = TAIL_BYTES
) -> str:
    """The last ``lines`` lines, at most ``limit`` characters, of stdout then stderr."""
    text = stdout if not stderr else (stdout.rstrip("\n") + "\n" + stderr if stdout else stderr)
    kept = "\n".join(text.rstrip("\n").split("\n")[-lines:])
    return kept[-limit:]


class Progress:
    """When the child last showed a sign of life (output or a worktree change)."""

    def __init__(self, now: float) -> None:
        self.last = now

    def touch(self, now: float) -> None:
        self.last = now


class LogSink:
    """Appends a process's output to its log file, one redacted, tagged line at a time."""

    def __init__(
        self, file: IO[str], redactor: Redactor, *, limit: int = MAX_LOG, tail: int = LOG_TAIL
    ) -> None:
        self._file = file
        self._redact = redactor
        self._partial: dict[str, bytes] = {}
        self._lock = anyio.Lock()
        self._room, self._tail_size = limit, tail
        self._tail: collections.deque[str] = collections.deque()
        self._tail_len = self._dropped = 0

    @classmethod
    async def open(
        cls, path: Path, redactor: Redactor, *, limit: int = MAX_LOG, tail: int = LOG_TAIL
    ) -> LogSink:
        """Append to ``path``; what earlier attempts wrote there counts toward ``limit``."""
        file = await anyio.to_thread.run_sync(_open_log, path)
        used = await anyio.to_thread.run_sync(lambda: os.fstat(file.fileno()).st_size)
        return cls(file, redactor, limit=max(limit - used, 0), tail=tail)

    async def feed(self, tag: str, chunk: bytes) -> None:
        data = self._partial.pop(tag, b"") + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) < 65536:
            self._partial[tag] = data
            return
        if cut == 0:  # a very long line goes out in pieces, never cutting a secret in two
            keep = max(self._redact.longest - 1, 0)
            cut = self._redact.safe_cut(data, len(data) - keep)
        if cut < len(data):
            self._partial[tag] = data[cut:]
        await self._lines(tag, data[:cut])

    async def note(self, message: str) -> None:
        await self._write(f"# {self._redact(message)}\n")  # opus's own lines: always

    async def aclose(self) -> None:
        for tag in list(self._partial):
            await self._lines(tag, self._partial.pop(tag))
        if self._dropped:
            kept = "".join(self._tail)
            await self._write(
                f"# [{self._dropped - len(kept)} characters of output not logged; the last "
                f"{len(kept)} follow]\n{kept}"
            )
        await anyio.to_thread.run_sync(self._file.close)

    async def _lines(self, tag: str, data: bytes) -> None:
        lines = data.decode("utf-8", "replace").removesuffix("\n").split("\n")
        text = "".join(f"{tag}| {self._redact(line)}\n" for line in lines)
        if len(text) <= self._room:
            self._room -= len(text)
            await self._write(text)
            return
        if not self._dropped:
            await self._write("# [the log is full: only the output's end is kept, below]\n")
        self._room = 0
        self._dropped += len(text)
        self._tail.append(text)
        self._tail_len += len(text)
        while self._tail_len - len(self._tail[0]) >= self._tail_size:
            self._tail_len -= len(self._tail.popleft())

    async def _write(self, text: str) -> None:
        async with self._lock:
            await anyio.to_thread.run_sync(_append, self._file, text)


def _open_log(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return open(fd, "a", encoding="utf-8", errors="replace")


def _append(file: IO[str], text: str) -> None:
    file.write(text)
    file.flush()


Counts = Callable[[str, str], bool]
"""``counts(tag, line)``: whether a line of output (tag "out" or "err") is a sign of progress."""

PARTIAL_COUNTS = 65536
"""Bytes of one unfinished line after which it counts as progress whatever it says."""


class Capture:
    """Reads one pipe to its end: keeps the last ``keep`` bytes, feeds the log, marks
    progress. Memory stays below ``keep`` plus a quarter (the slack that makes trimming
    cheap) plus one read, whatever the child prints.

    With ``counts``, only the lines it accepts mark progress (a CLI that prints
    "Reconnecting…" while its model is unreachable is not making any)."""

    def __init__(
        self,
        tag: str,
        sink: LogSink,
        progress: Progress,
        counts: Counts | None = None,
        keep: int = MAX_KEPT,
    ) -> None:
        self.tag = tag
        self.done = anyio.Event()
        self.keep = keep
        self._sink = sink
        self._progress = progress
        self._counts = counts
        self._line = b""
        self._data = bytearray()
        self._cut = 0
        self._slack = max(keep // 4, 65536)

    def _mark(self, chunk: bytes) -> None:
        if self._counts is None:
            self._progress.touch(anyio.current_time())
            return
        data = self._line + chunk
        *lines, self._line = data.split(b"\n")
        counted = any(self._counts(self.tag, ln.decode("utf-8", "replace")) for ln in lines)
        if counted or len(self._line) > PARTIAL_COUNTS:
            self._progress.touch(anyio.current_time())
        if len(self._line) > PARTIAL_COUNTS:
            self._line = b""

    async def pump(self, stream: ByteReceiveStream) -> None:
        try:
            async for chunk in stream:
                self._mark(chunk)
                self._data += chunk
                if len(self._data) > self.keep + self._slack:
                    drop = len(self._data) - self.keep
                    del self._data[:drop]
                    self._cut += drop
                await self._sink.feed(self.tag, chunk)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            self.done.set()

    def text(self, redactor: Redactor) -> str:
        drop = max(0, len(self._data) - self.keep)
        text = bytes(self._data[drop:]).decode("utf-8", "replace")
        if self._cut + drop:
            text = f"[… {self._cut + drop} bytes cut …]\n{text}"
        return redactor(text)

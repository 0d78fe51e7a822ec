"""Watching the planned folder: watchdog's thread bridged into anyio, debounce, adaptive poll.

A rename into the folder (an atomic save, a note moved in) is complete at once and is
reported without delay; ``created``/``modified`` are debounced until the path has been quiet
for ``debounce`` seconds, or until the writer closes the file (``closed``, IN_CLOSE_WRITE).
Deletions and moves away are reported too. A full queue sets ``rescan``: the caller then scans
the whole folder, which it does on its adaptive poll anyway (watchdog never reports kernel
queue overflows, and inotify sees nothing on network filesystems).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from watchdog.events import (
    DirDeletedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver

__all__ = ("AdaptivePoll", "Batch", "Watcher")

logger = logging.getLogger(__name__)

# (path, immediate, clock() at arrival); ``None`` asks for a rescan.
_Change = tuple[Path, bool, float] | None

_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    FileClosedEvent,
    DirDeletedEvent,
]


@dataclass(frozen=True, slots=True)
class Batch:
    """Paths that changed (written, moved in or away, deleted); ``rescan``: events were lost."""

    paths: set[Path] = field(default_factory=set)
    rescan: bool = False

    def __bool__(self) -> bool:
        return bool(self.paths) or self.rescan


class AdaptivePoll:
    """Poll interval: ``active`` while busy; when idle, ×``backoff`` per call up to ``idle_max``."""

    def __init__(self, active: float = 30, idle_max: float = 300, backoff: float = 2.0) -> None:
        if active <= 0 or idle_max < active or backoff < 1:
            raise ValueError(
                f"need 0 < active <= idle_max and backoff >= 1 "
                f"(got active={active}, idle_max={idle_max}, backoff={backoff})"
            )
        self.active = float(active)
        self.idle_max = float(idle_max)
        self.backoff = float(backoff)
        self._current = self.active

    def interval(self, busy: bool) -> float:
        """The next wait in seconds; ``busy`` means jobs are queued or running."""
        if busy:
            self._current = self.active
        else:
            self._current = min(self._current * self.backoff, self.idle_max)
        return self._current


def _new_observer() -> BaseObserver:
    """An observer that reports a rename in from outside as a move, not as a create."""
    if sys.platform.startswith("linux"):
        from watchdog.observers.inotify import InotifyObserver

        return InotifyObserver(generate_full_events=True)
    from watchdog.observers import Observer

    observer: BaseObserver = Observer()
    return observer


class _Handler(FileSystemEventHandler):
    """Runs in watchdog's thread: filters events and posts them into the loop."""

    def __init__(
        self,
        folder: Path,
        is_candidate: Callable[[Path], bool],
        post: Callable[[Path | None, bool], None],
    ) -> None:
        self._folder = folder
        self._is_candidate = is_candidate
        self._post = post

    def dispatch(self, event: FileSystemEvent) -> None:
        # An exception here would kill watchdog's dispatcher thread for good.
        try:
            super().dispatch(event)
        except Exception:
            logger.exception("watcher: could not handle %r; asking for a rescan", event)
            self._post(None, True)

    def _report(self, raw: bytes | str, *, immediate: bool) -> None:
        if not raw:
            return
        path = Path(os.fsdecode(raw))
        if self._is_candidate(path):
            self._post(path, immediate)

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._report(event.src_path, immediate=True)  # moved away ("" when moved in)
            self._report(event.dest_path, immediate=True)  # renamed in ("" when moved out)

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._report(event.src_path, immediate=False)

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._report(event.src_path, immediate=False)

    def on_closed(self, event: FileSystemEvent) -> None:
        self._report(event.src_path, immediate=True)

    def on_deleted(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._report(event.src_path, immediate=True)
        elif Path(os.fsdecode(event.src_path)) == self._folder:
            logger.warning("watcher: %s was deleted; no more file events", self._folder)
            self._post(None, True)


class Watcher:
    """File events of ``folder`` (non-recursive) as debounced batches; an async context manager.

    ``is_candidate`` runs in watchdog's thread, for paths that may no longer exist: judge by
    name. ``enabled=False`` starts no observer (pure polling). ``clock`` times the debounce.
    """

    def __init__(
        self,
        folder: Path,
        *,
        is_candidate: Callable[[Path], bool],
        debounce: float = 0.25,
        enabled: bool = True,
        max_queue: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if debounce < 0:
            raise ValueError(f"debounce must be >= 0, got {debounce}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.folder = folder
        self.debounce = debounce
        self.enabled = enabled
        self._is_candidate = is_candidate
        self._max_queue = max_queue
        self._clock = clock
        self._observer: BaseObserver | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._send: MemoryObjectSendStream[_Change] | None = None
        self._receive: MemoryObjectReceiveStream[_Change] | None = None
        self._pending: dict[Path, float] = {}  # debounced path -> time of its last event
        self._ready: set[Path] = set()
        self._rescan = False

    @property
    def watching(self) -> bool:
        """True while a watchdog observer is running."""
        return self._observer is not None

    @property
    def rescan_pending(self) -> bool:
        """True once events were lost (queue full, folder gone); the next batch has ``rescan``."""
        return self._rescan

    async def __aenter__(self) -> Watcher:
        if self._receive is not None:
            raise RuntimeError("Watcher is already running")
        self._token = anyio.lowlevel.current_token()
        self._send, self._receive = anyio.create_memory_object_stream[_Change](self._max_queue)
        await anyio.to_thread.run_sync(lambda: self.folder.mkdir(parents=True, exist_ok=True))
        if self.enabled:
            with anyio.CancelScope(shield=True):  # a cancel here must not orphan the threads
                self._observer = await anyio.to_thread.run_sync(self._start_observer)
        else:
            logger.info("watcher: file events off for %s; polling only", self.folder)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            # stop() takes the observer's lock, which its dispatcher holds while our handler
            # waits for this loop: call it from a worker thread, never from the loop.
            await anyio.to_thread.run_sync(_stop_observer, observer)
        if self._send is not None and self._receive is not None:
            self._send.close()
            self._receive.close()
        self._send = self._receive = None
        self._token = None

    async def next_batch(self, timeout: float) -> Batch:  # noqa: ASYNC109 - returns, never raises
        """Wait up to ``timeout`` s for a ready change, then return every change ready by then."""
        receive = self._receive
        if receive is None:
            raise RuntimeError("Watcher.next_batch() called outside `async with`")
        deadline = anyio.current_time() + timeout
        while True:
            self._drain(receive)
            batch = self._take_ready()
            if batch:
                return batch
            wait = deadline - anyio.current_time()
            if wait <= 0:
                return Batch()
            if self._pending:
                due = min(self._pending.values()) + self.debounce
                wait = min(wait, max(due - self._clock(), 0.0))
            with anyio.move_on_after(wait):
                self._record(await receive.receive())

    def _start_observer(self) -> BaseObserver | None:
        observer = _new_observer()
        handler = _Handler(self.folder, self._is_candidate, self._post)
        try:
            observer.schedule(
                handler, str(self.folder), recursive=False, event_filter=_EVENT_FILTER
            )
            observer.start()
        except OSError as e:
            logger.warning("watcher: cannot watch %s (%s); polling only", self.folder, e)
            return None
        logger.info("watcher: watching %s", self.folder)
        return observer

    def _post(self, path: Path | None, immediate: bool) -> None:
        """Watchdog's thread: hand a change (``None``: rescan) to the loop; never raise."""
        token = self._token
        if token is None:
            return
        try:
            anyio.from_thread.run_sync(self._deliver, path, immediate, token=token)
        except anyio.RunFinishedError:
            logger.debug("watcher: event loop gone; dropped a change of %s", path)

    def _deliver(self, path: Path | None, immediate: bool) -> None:
        """Loop thread: stamp and enqueue; a full queue means rescan."""
        send = self._send
        if send is None:
            return
        try:
            send.send_nowait(None if path is None else (path, immediate, self._clock()))
        except anyio.WouldBlock:
            if not self._rescan:
                logger.warning("watcher: event queue full (%d); will rescan", self._max_queue)
            self._rescan = True
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    def _drain(self, receive: MemoryObjectReceiveStream[_Change]) -> None:
        while True:
            try:
                change = receive.receive_nowait()
            except anyio.WouldBlock:
                return
            self._record(change)

    def _record(self, change: _Change) -> None:
        if change is None:
            self._rescan = True
            return
        path, immediate, at = change
        if immediate:
            self._pending.pop(path, None)
            self._ready.add(path)
        else:  # a write goes on: whatever was ready waits for it to end
            self._ready.discard(path)
            self._pending[path] = at

    def _take_ready(self) -> Batch:
        now = self._clock()
        for path in [p for p, at in self._pending.items() if now - at >= self.debounce]:
            del self._pending[path]
            self._ready.add(path)
        if not self._ready and not self._rescan:
            return Batch()
        batch = Batch(paths=self._ready, rescan=self._rescan)
        self._ready = set()
        self._rescan = False
        return batch


def _stop_observer(observer: BaseObserver) -> None:
    observer.stop()
    observer.join()
    logger.debug("watcher: observer stopped")

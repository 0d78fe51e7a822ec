"""The job registry: ``registry.json``, job folders with artifacts and event logs, the archive.

Layout under the state folder (SPEC §8)::

    registry.json          {"version": 1, "jobs": [...]}: active and recent jobs
    archive/YYYY-MM.jsonl  finished jobs older than keep_days, one JSON per line
    archive/YYYY-MM.rollup.json  their metrics by day (``rollups``), for ``opus metrics``
    jobs/<job_id>/         artifacts and events.jsonl (append-only)

A checkpoint (:meth:`Registry.save`) is one fsynced append of the job's snapshot
to its ``events.jsonl``, so its cost does not grow with history; ``registry.json``
is rewritten atomically by :meth:`Registry.flush`, at most once per
``flush_interval`` from ``save`` plus whenever the caller flushes. :meth:`open`
replays the event logs written after the last flush, so a crash between a save
and a flush loses nothing. Folders are 0700, files 0600.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .atomic import TEMP_PREFIX, atomic_write, fsync_dir, write_all
from .errors import RegistryError
from .lifecycle import FINISHED, Status
from .lock import cleanup_temp_files
from .models import Job, Priority, slug
from .rollups import RollupCache, ensure_rollups

__all__ = ("Registry",)

logger = logging.getLogger(__name__)

VERSION = 1
REGISTRY = "registry.json"
EVENTS = "events.jsonl"
ARCHIVED = "archived"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_STAMP = "%Y%m%dT%H%M%S"


def _local_now() -> datetime:
    return datetime.now().replace(microsecond=0)


_MARGIN_NS = 1_000_000_000
"""How far before its snapshot ``flush`` dates registry.json."""


class Registry:
    """Jobs of one state folder. Thread-safe; constructing does no I/O, :meth:`open` does.

    ``jobs()``, ``get()`` and friends return the registry's own ``Job`` objects:
    change one, then ``save()`` it.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        keep_days: int = 30,
        now: Callable[[], datetime] = _local_now,
        flush_interval: float = 1.0,
        max_finished: int = 1000,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.keep_days = keep_days
        self.flush_interval = flush_interval
        self.max_finished = max_finished
        self.archive_generation = 0
        self._rollups = RollupCache(self.state_dir / "archive", self.state_dir)
        self._made: set[str] = set()
        """Job folders this process made or found (``job_dir`` checks each once)."""
        self._month_cache: tuple[tuple[str, int, int], list[Job]] | None = None
        """Counts archive runs that moved jobs (for caches of archived data)."""
        """Finished jobs kept in registry.json; older ones go to the archive early."""
        self.repairs: list[str] = []
        """What the last :meth:`open` repaired, one line each."""
        self._now = now
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        """Held while ``flush`` writes registry.json (outside ``_lock``)."""
        self._jobs: dict[str, Job] = {}
        self._latest: dict[str, Job] = {}
        """Each FR's newest live job (``_jobs`` is in creation order)."""
        self._rows: dict[str, str] = {}  # id → compact JSON of the last saved snapshot
        self._dirty = False
        self._last_flush: datetime | None = None
        self._open = False

    @property
    def registry_file(self) -> Path:
        return self.state_dir / REGISTRY

    @property
    def jobs_dir(self) -> Path:
        return self.state_dir / "jobs"

    @property
    def archive_dir(self) -> Path:
        return self.state_dir / "archive"

    # -- start-up -------------------------------------------------------------------------

    def open(self) -> None:
        """Create the folders, remove stale temp files, load and repair, then archive."""
        with self._lock, _io(f"cannot open the registry in {self.state_dir}"):
            self.repairs = []
            for folder in (self.state_dir, self.jobs_dir, self.archive_dir):
                _mkdir(folder)
            for folder in (self.state_dir, self.archive_dir):
                self._note_removed(cleanup_temp_files(folder, TEMP_PREFIX))
            jobs, mtime = self._load()
            changed = self._replay_logs(jobs, mtime)
            ordered = sorted(jobs.values(), key=lambda j: _naive(j.created_at))
            self._jobs = {j.id: j for j in ordered}
            self._latest = {j.fr_id: j for j in ordered}
            self._rows = {j.id: j.model_dump_json() for j in ordered}
            for job_id in self._jobs:
                self._note_removed(cleanup_temp_files(self.jobs_dir / job_id, TEMP_PREFIX))
            self._open = True
            self._dirty = changed or mtime is None
            now = self._now()
            self._flush_locked(now)
            self._last_flush = now
            with _io("cannot write the archive's roll-ups"):
                ensure_rollups(self.archive_dir, self.state_dir)
        logger.info(
            "registry %s: %d job(s), %d repair(s)",
            self.state_dir,
            len(self._jobs),
            len(self.repairs),
        )
        self.archive()

    def _load(self) -> tuple[dict[str, Job], int | None]:
        """registry.json's jobs and mtime; a bad file is kept aside and ``({}, None)`` returned."""
        path = self.registry_file
        try:
            with open(path, "rb") as f:
                mtime = os.fstat(f.fileno()).st_mtime_ns
                raw = f.read()
        except FileNotFoundError:
            return {}, None
        try:
            doc = json.loads(raw)
            if not (isinstance(doc, dict) and doc.get("version") == VERSION):
                raise ValueError(f'not {{"version": {VERSION}, "jobs": [...]}}')
            rows = doc.get("jobs")
            if not isinstance(rows, list):
                raise ValueError('"jobs" is not a list')
            jobs = [Job.model_validate(row) for row in rows]
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, ValidationError
            aside = _unique(path.with_name(f"{REGISTRY}.corrupt-{self._now():{_STAMP}}"))
            os.replace(path, aside)
            problem = str(e).splitlines()[0]
            logger.warning(
                "%s cannot be read (%s): kept it as %s, rebuilding from the event logs",
                path,
                problem,
                aside.name,
            )
            self.repairs.append(f"{REGISTRY} unreadable ({problem}): kept as {aside.name}")
            return {}, None
        return {j.id: j for j in jobs}, mtime

    def _replay_logs(self, jobs: dict[str, Job], mtime: int | None) -> bool:
        """Apply the last snapshot of each event log newer than registry.json or unknown to it."""
        changed = False
        for entry in sorted(os.scandir(self.jobs_dir), key=lambda e: e.name):
            if not entry.is_dir(follow_symlinks=False):
                continue
            log = Path(entry.path) / EVENTS
            try:
                log_mtime = log.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if entry.name in jobs and mtime is not None and log_mtime < mtime:
                continue
            record = self._last_record(log)
            if record is None:
                continue
            if record.get("event") == ARCHIVED:
                if jobs.pop(entry.name, None) is not None:
                    changed = True
                    self.repairs.append(f"job {entry.name}: archived, dropped from {REGISTRY}")
                continue
            try:
                job = Job.model_validate(record["job"])
            except ValidationError as e:
                logger.warning("%s: last snapshot is not a job (%s); skipped", log, e.errors()[0])
                self.repairs.append(f"job {entry.name}: unreadable snapshot in {EVENTS}, skipped")
                continue
            if jobs.get(job.id) != job:
                jobs[job.id] = job
                changed = True
                what = record.get("event")
                self.repairs.append(f"job {job.id}: restored from {EVENTS} (last event {what})")
        return changed

    def _last_record(self, log: Path) -> dict[str, Any] | None:
        """The last snapshot or archive marker in ``log``, cutting a torn last line first."""
        fd = os.open(log, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                size = self._cut_torn(fd, log, size)
            for line in _reverse_lines(fd, size):
                record = _parse(line)
                if record is not None and ("job" in record or record.get("event") == ARCHIVED):
                    return record
            return None
        finally:
            os.close(fd)

    def _cut_torn(self, fd: int, path: Path, size: int) -> int:
        """Move a last line without newline to ``<name>.torn-<time>``; return the new size."""
        keep = _line_start(fd, size)
        aside = _unique(path.with_name(f"{path.name}.torn-{self._now():{_STAMP}}"))
        with open(aside, "xb", opener=_private_opener) as f:
            f.write(os.pread(fd, size - keep, keep))
            f.flush()
            os.fsync(f.fileno())
        os.ftruncate(fd, keep)
        os.fsync(fd)
        logger.warning(
            "%s: cut a torn last line (%d bytes), kept as %s", path, size - keep, aside.name
        )
        self.repairs.append(f"{path.parent.name}/{path.name}: torn last line kept as {aside.name}")
        return keep

    def _note_removed(self, removed: list[Path]) -> None:
        self.repairs.extend(f"removed stale temp file {p}" for p in removed)

    # -- jobs -----------------------------------------------------------------------------

    def create(
        self,
        *,
        fr_id: str,
        fr_path: str,
        title: str,
        priority: Priority,
        repo: str,
        branch: str,
        status: Status = Status.QUEUED,
        event: str = "created",
    ) -> Job:
        """A new job ``<YYYYmmdd-HHMMSS>-<fr-slug>-<4 hex>``, saved with ``event`` (a claim
        names its own: ``queued``)."""
        now = self._now()
        with self._lock:
            while True:
                job_id = f"{now:%Y%m%d-%H%M%S}-{slug(fr_id)}-{secrets.token_hex(2)}"
                if job_id not in self._jobs and not (self.jobs_dir / job_id).exists():
                    break
        job = Job(
            id=job_id,
            fr_id=fr_id,
            fr_path=fr_path,
            title=title,
            priority=priority,
            status=status,
            repo=repo,
            branch=branch,
            created_at=now,
            updated_at=now,
        )
        self.save(job, event)
        return job

    def save(self, job: Job, event: str, *, sync: bool = True, **data: Any) -> None:
        """Stamp ``updated_at``, append ``{time, event, job, **data}`` to the job's log (fsync,
        unless ``sync`` is false: an event nothing is resumed from, e.g. a stage's start).

        Rewrites registry.json only when the last flush is ``flush_interval`` old.
        """
        if "time" in data:
            raise ValueError("'time' is reserved in an event")
        with self._lock:
            self._require_open()
            now = self._now()
            job.updated_at = now
            row = job.model_dump_json()  # (pydantic-core writes it: 3× faster)
            extra = "," + _dumps(data)[1:-1] if data else ""
            line = (
                f'{{"time":{_dumps(now.isoformat())},"event":{_dumps(event)},"job":{row}{extra}}}'
            )
            self._append_event(job.id, line, sync=sync)
            newest = self._latest.get(job.fr_id)
            if job.id not in self._jobs or (newest is not None and newest.id == job.id):
                self._latest[job.fr_id] = job
            self._jobs[job.id] = job
            self._rows[job.id] = row
            self._dirty = True
            if job.status in FINISHED and len(self._jobs) > self.max_finished * 1.1 + 10:
                self._archive_locked(now)  # a batch now and then keeps flushes bounded
            last = self._last_flush
            if last is None or now < last or (now - last).total_seconds() >= self.flush_interval:
                self._flush_locked(now)

    def flush(self) -> bool:
        """Rewrite registry.json atomically if anything changed; True if it was written.

        The jobs are copied under the lock and written outside it, so saves (every
        checkpoint of every job) do not wait for a large registry.json to reach the disk.
        """
        with self._flushing:  # one writer at a time: a later snapshot is never overwritten
            with self._lock:
                self._require_open()
                if not self._dirty:
                    return False
                now = self._now()
                text = self._snapshot(now)
                taken = time.time_ns()
                self._dirty = False
                self._last_flush = now
            try:
                with _io(f"cannot write {self.registry_file}"):
                    atomic_write(self.registry_file, text.encode())
                    # dated before the snapshot (with a margin for the file system's coarse
                    # clock): an event log appended while the file was written is newer, so
                    # readers and the next start still read it
                    os.utime(self.registry_file, ns=(taken - _MARGIN_NS, taken - _MARGIN_NS))
            except BaseException:
                with self._lock:
                    self._dirty = True
                raise
        return True

    def _flush_locked(self, now: datetime) -> bool:
        # (with ``_lock`` held; a ``flush`` writing an older snapshot at the same time may
        # replace this one last: registry.json is then older, never wrong — its written_at
        # is older too, so readers read the newer job folders' events)
        if not self._dirty:
            return False
        with _io(f"cannot write {self.registry_file}"):
            atomic_write(self.registry_file, self._snapshot(now).encode())
        self._dirty = False
        self._last_flush = now
        return True

    def _snapshot(self, now: datetime) -> str:
        # written_at (the registry's clock, as job ids are): readers skip older job folders
        return (
            f'{{"version":{VERSION},"written_at":"{now:%Y%m%d-%H%M%S}","jobs":['
            + ",".join(self._rows.values())
            + "]}"
        )

    def _append_event(self, job_id: str, line: str, *, sync: bool = True) -> None:
        folder = self.job_dir(job_id)
        with _io(f"cannot append to {folder / EVENTS}"):
            self._append(folder / EVENTS, (line + "\n").encode(), sync=sync)

    def _append(self, path: Path, data: bytes, *, sync: bool = True) -> None:
        """One O_APPEND write (+ fsync); a torn last line left by a crash is cut off first."""
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                self._cut_torn(fd, path, size)
            write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if size == 0 and sync:
            fsync_dir(path.parent)

    def jobs(self) -> list[Job]:
        """The live (not archived) jobs, in creation order."""
        with self._lock:
            return list(self._jobs.values())

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def latest_for(self, fr_id: str) -> Job | None:
        """The newest live job of that FR."""
        with self._lock:
            return self._latest.get(fr_id)

    def latest(self) -> dict[str, Job]:
        """Each FR's newest live job, by FR id (a copy)."""
        with self._lock:
            return dict(self._latest)

    def active(self) -> list[Job]:
        """Live jobs whose status is not in ``lifecycle.FINISHED``."""
        with self._lock:
            return [j for j in self._jobs.values() if j.status not in FINISHED]

    # -- archive --------------------------------------------------------------------------

    def archive(self) -> int:
        """Move finished jobs to ``archive/YYYY-MM.jsonl``: those finished more than
        ``keep_days`` ago, and the oldest beyond the newest ``max_finished``.

        The cap keeps registry.json — and so a flush — bounded whatever the history.
        Order: archive line, then an ``archived`` marker in the job's log, then
        registry.json; a crash in between duplicates a job, never loses it.
        """
        with self._lock:
            self._require_open()
            count = self._archive_locked(self._now())
        if count:
            logger.info("archived %d finished job(s)", count)
        return count

    def _archive_locked(self, now: datetime) -> int:
        cutoff = now - timedelta(days=self.keep_days)
        finished = sorted(
            (j for j in self._jobs.values() if j.status in FINISHED),
            key=lambda j: _naive(j.finished_at or j.updated_at),
        )
        excess = max(0, len(finished) - self.max_finished)
        months: dict[str, list[str]] = {}
        for n, job in enumerate(finished):
            ended = _naive(job.finished_at or job.updated_at)
            if n < excess or ended < cutoff:
                months.setdefault(f"{ended:%Y-%m}.jsonl", []).append(job.id)
        if not months:
            return 0
        marker = f'{{"time":{_dumps(now.isoformat())},"event":"{ARCHIVED}","archive":'
        for name, ids in months.items():
            lines = "".join(self._rows[i] + "\n" for i in ids)
            with _io(f"cannot append to {self.archive_dir / name}"):
                self._append(self.archive_dir / name, lines.encode())
        with _io("cannot write the archive's roll-ups"):
            self._rollups.update(months)
        for name, ids in months.items():
            for job_id in ids:
                # a marker lost to a crash only duplicates the job (archived() dedupes)
                if (self.jobs_dir / job_id).is_dir():
                    line = marker + _dumps(f"archive/{name}") + "}"
                    self._append_event(job_id, line, sync=False)
                del self._jobs[job_id], self._rows[job_id]
        self._latest = {j.fr_id: j for j in self._jobs.values()}
        self._dirty = True
        self._flush_locked(now)
        self.archive_generation += 1
        return sum(len(ids) for ids in months.values())

    def archived_in(self, month: str) -> list[Job]:
        """The jobs archived in ``archive/<month>.jsonl`` (``YYYY-MM``), cached until the file
        changes — for the monthly budget, asked before every stage."""
        path = self.archive_dir / f"{month}.jsonl"
        try:
            st = path.stat()
        except FileNotFoundError:
            return []
        key = (month, st.st_size, st.st_mtime_ns)
        if self._month_cache is None or self._month_cache[0] != key:
            jobs: dict[str, Job] = {}
            for line in path.read_bytes().split(b"\n")[:-1]:
                record = _parse(line)
                if record is not None:
                    try:
                        job = Job.model_validate(record)
                    except ValidationError:
                        continue
                    jobs[job.id] = job
            self._month_cache = (key, list(jobs.values()))
        return self._month_cache[1]

    def archived(self) -> Iterator[Job]:
        """Every archived job, oldest month first, each id once."""
        seen: set[str] = set()
        for path in sorted(self.archive_dir.glob("[0-9][0-9][0-9][0-9]-[0-9][0-9].jsonl")):
            with open(path, "rb") as f:
                for line in f:
                    record = _parse(line) if line.endswith(b"\n") else None
                    if record is None:
                        continue
                    try:
                        job = Job.model_validate(record)
                    except ValidationError:
                        logger.warning("%s: skipped a line that is not a job", path)
                        continue
                    if job.id not in seen:
                        seen.add(job.id)
                        yield job

    # -- job folders ----------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        """``jobs/<job_id>/``, created (0700) if missing (once per job and process)."""
        folder = self.jobs_dir / _checked(job_id)
        if job_id not in self._made:
            with _io(f"cannot create {folder}"):
                _mkdir(folder)
            self._made.add(job_id)
        return folder

    def write_artifact(self, job_id: str, name: str, text: str, *, sync: bool = True) -> Path:
        """Write ``jobs/<job_id>/<name>`` atomically (0600) and return its path."""
        path = self.job_dir(job_id) / _checked_artifact(name)
        with _io(f"cannot write {path}"):
            atomic_write(path, text.encode(), sync=sync)
        return path

    def read_artifact(self, job_id: str, name: str) -> str | None:
        """The artifact's text, or None if it does not exist."""
        path = self.jobs_dir / _checked(job_id) / _checked_artifact(name)
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's complete event records, oldest first (unreadable lines skipped)."""
        try:
            raw = (self.jobs_dir / _checked(job_id) / EVENTS).read_bytes()
        except FileNotFoundError:
            return []
        lines = raw.split(b"\n")[:-1]  # the last piece is "" or a line still being written
        return [r for r in map(_parse, lines) if r is not None]

    def _require_open(self) -> None:
        if not self._open:
            raise RegistryError(f"the registry in {self.state_dir} is not open (call open())")


# -- file helpers -------------------------------------------------------------------------


@contextmanager
def _io(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise RegistryError(f"{what}: {e}") from e


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not folder.is_dir():
            raise
    else:
        fsync_dir(folder.parent)
    if folder.stat().st_mode & 0o777 != 0o700:
        folder.chmod(0o700)


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


def _unique(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}-{n}"), n + 1
    return candidate


def _line_start(fd: int, end: int) -> int:
    """Offset just after the last newline before ``end`` (0 if none)."""
    pos = end
    while pos > 0:
        step = min(1 << 16, pos)
        pos -= step
        i = os.pread(fd, step, pos).rfind(b"\n")
        if i >= 0:
            return pos + i + 1
    return 0


def _reverse_lines(fd: int, end: int) -> Iterator[bytes]:
    """The lines of the file's first ``end`` bytes (which end in a newline), last first."""
    pos, tail, step = max(end - 1, 0), b"", 1 << 13
    while True:
        while (i := tail.rfind(b"\n")) >= 0:
            yield tail[i + 1 :]
            tail = tail[:i]
        if pos == 0:
            break
        n = min(step, pos)
        pos -= n
        tail = os.pread(fd, n, pos) + tail
        step = min(step * 2, 1 << 20)
    if tail:
        yield tail


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _default(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    raise TypeError(f"cannot store a {type(value).__name__} in an event")


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), default=_default)


def _naive(moment: datetime) -> datetime:
    return moment.astimezone().replace(tzinfo=None) if moment.tzinfo else moment


def _checked(job_id: str) -> str:
    if not _NAME.fullmatch(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id


def _checked_artifact(name: str) -> str:
    if not _NAME.fullmatch(name) or name == EVENTS or name.startswith(f"{EVENTS}."):
        raise ValueError(f"not an artifact name: {name!r}")
    return name

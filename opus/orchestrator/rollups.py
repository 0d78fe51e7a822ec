"""What ``opus metrics`` needs of finished jobs, summed per day (SPEC §9, §12).

A :class:`Figures` holds, for a set of jobs, every figure ``opus metrics`` prints: counts by
day and status, sums (busy seconds, tokens, cost, recoveries), the first and last checkpoint
times, exact counts of iterations, and log-bucketed histograms of pipeline and stage
durations. Histograms make p50/p95 approximate: a bucket spans 2 % (``RATIO``), and a
quantile is read as the bucket's geometric middle, so it is within 1 % of the true value of
an element at that rank; counts, means, sums and rates are exact.

When the registry archives jobs into ``archive/YYYY-MM.jsonl`` it also adds them to that
month's roll-up, ``archive/YYYY-MM.rollup.json``: one :class:`Figures` per day the jobs were
created, the ids it holds (a job archived twice after a crash counts once) and how many
bytes of the archive file it covers. ``opus metrics --since N`` then reads the roll-ups of
the months that can hold jobs created in the window, never the archive itself — its cost
follows the window, not the history. A roll-up behind its archive file (written by an older
opus, or cut short by a crash) is brought up to date from the bytes it has not covered.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .atomic import atomic_write
from .lifecycle import Stage, Status
from .models import Job

__all__ = (
    "RATIO",
    "Figures",
    "Histogram",
    "MonthRollup",
    "RollupCache",
    "ensure_rollups",
    "job_figures",
    "rollups_since",
    "update_rollups",
)

log = logging.getLogger(__name__)

RATIO = 1.02
"""Width of a duration histogram's bucket: each spans ``[RATIO**i, RATIO**(i+1))`` seconds."""
_LOG = math.log(RATIO)
_ZERO = -(10**6)
"""The bucket of durations ≤ 0."""
SUCCEEDED = frozenset({Status.DONE, Status.REVIEW})
UNSUCCESSFUL = frozenset({Status.FAILED, Status.BLOCKED})


@dataclass
class Histogram:
    """Durations in log buckets, with their exact count and sum."""

    buckets: Counter[int] = field(default_factory=Counter)
    count: int = 0
    total: float = 0.0

    def add(self, seconds: float) -> None:
        self.buckets[_bucket(seconds)] += 1
        self.count += 1
        self.total += seconds

    def merge(self, other: Histogram) -> None:
        self.buckets.update(other.buckets)
        self.count += other.count
        self.total += other.total

    def quantile(self, q: float) -> float:
        """The value at rank ``round(q·(n−1))`` (as ``metrics`` ranks), within 1 %."""
        if not self.count:
            return 0.0
        rank = min(self.count - 1, max(0, round(q * (self.count - 1))))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen > rank:
                return 0.0 if index == _ZERO else RATIO ** (index + 0.5)
        return 0.0  # pragma: no cover - counts add up

    def summary(self) -> dict[str, float]:
        if not self.count:
            return {"count": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0}
        return {
            "count": self.count,
            "mean": round(self.total / self.count, 3),
            "p50": round(self.quantile(0.5), 3),
            "p95": round(self.quantile(0.95), 3),
        }

    def to_json(self) -> dict[str, Any]:
        return {"b": {str(k): v for k, v in self.buckets.items()}, "n": self.count, "s": self.total}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Histogram:
        buckets = Counter({int(k): int(v) for k, v in data.get("b", {}).items()})
        return cls(buckets, int(data.get("n", 0)), float(data.get("s", 0.0)))


def _bucket(seconds: float) -> int:
    return _ZERO if seconds <= 0 else math.floor(math.log(seconds) / _LOG)


@dataclass
class Figures:
    """The metrics of a set of jobs, mergeable."""

    per_day: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    pipeline: Histogram = field(default_factory=Histogram)
    stages: dict[str, Histogram] = field(default_factory=dict)
    iterations: Counter[int] = field(default_factory=Counter)
    busy: float = 0.0
    first: float | None = None
    last: float | None = None
    recoveries: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0

    @property
    def jobs(self) -> int:
        return sum(self.per_day.values())

    def add(self, job: Job, recoveries: int = 0) -> None:
        self.per_day[job.created_at.date().isoformat()] += 1
        self.statuses[job.status.value] += 1
        for cp in job.history:
            self.stages.setdefault(cp.stage.value, Histogram()).add(
                (cp.finished_at - cp.started_at).total_seconds()
            )
            if cp.stage is not Stage.DELIVERY:
                self.busy += (cp.finished_at - cp.started_at).total_seconds()
            self._span(cp.started_at.timestamp(), cp.finished_at.timestamp())
        delivered = [cp for cp in job.history if cp.stage is Stage.DELIVERY]
        if delivered and job.history:
            self.pipeline.add(
                (delivered[-1].finished_at - job.history[0].started_at).total_seconds()
            )
            self.iterations[delivered[-1].iteration] += 1
        self.recoveries += recoveries
        self.tokens_in += job.usage.input_tokens
        self.tokens_out += job.usage.output_tokens
        self.cost += job.usage.cost_usd

    def _span(self, start: float, end: float) -> None:
        self.first = start if self.first is None else min(self.first, start)
        self.last = end if self.last is None else max(self.last, end)

    def merge(self, other: Figures) -> None:
        self.per_day.update(other.per_day)
        self.statuses.update(other.statuses)
        self.pipeline.merge(other.pipeline)
        for stage, hist in other.stages.items():
            self.stages.setdefault(stage, Histogram()).merge(hist)
        self.iterations.update(other.iterations)
        self.busy += other.busy
        if other.first is not None and other.last is not None:
            self._span(other.first, other.last)
        self.recoveries += other.recoveries
        self.tokens_in += other.tokens_in
        self.tokens_out += other.tokens_out
        self.cost += other.cost

    def report(self, *, since_days: int, concurrency: int) -> dict[str, Any]:
        """The dictionary ``opus metrics --json`` prints."""
        succeeded = sum(self.statuses[s] for s in SUCCEEDED)
        failed = sum(self.statuses[s] for s in UNSUCCESSFUL)
        span = (self.last - self.first) if self.first is not None and self.last else 0.0
        return {
            "since_days": since_days,
            "jobs": self.jobs,
            "jobs_per_day": dict(sorted(self.per_day.items())),
            "statuses": dict(sorted(self.statuses.items())),
            "success_rate": round(succeeded / (succeeded + failed), 3)
            if succeeded + failed
            else None,
            "pipeline_seconds": self.pipeline.summary(),
            "stage_seconds": {s: h.summary() for s, h in sorted(self.stages.items())},
            "iterations_per_job": _exact_summary(self.iterations),
            "agent_utilization": round(self.busy / (span * concurrency), 3) if span else 0.0,
            "recoveries": self.recoveries,
            "tokens": {"input": self.tokens_in, "output": self.tokens_out},
            "cost_usd": round(self.cost, 4),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "per_day": dict(self.per_day),
            "statuses": dict(self.statuses),
            "pipeline": self.pipeline.to_json(),
            "stages": {s: h.to_json() for s, h in self.stages.items()},
            "iterations": {str(k): v for k, v in self.iterations.items()},
            "busy": self.busy,
            "first": self.first,
            "last": self.last,
            "recoveries": self.recoveries,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost": self.cost,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Figures:
        return cls(
            per_day=Counter({str(k): int(v) for k, v in data.get("per_day", {}).items()}),
            statuses=Counter({str(k): int(v) for k, v in data.get("statuses", {}).items()}),
            pipeline=Histogram.from_json(data.get("pipeline", {})),
            stages={s: Histogram.from_json(h) for s, h in data.get("stages", {}).items()},
            iterations=Counter({int(k): int(v) for k, v in data.get("iterations", {}).items()}),
            busy=float(data.get("busy", 0.0)),
            first=data.get("first"),
            last=data.get("last"),
            recoveries=int(data.get("recoveries", 0)),
            tokens_in=int(data.get("tokens_in", 0)),
            tokens_out=int(data.get("tokens_out", 0)),
            cost=float(data.get("cost", 0.0)),
        )


def _exact_summary(counts: Counter[int]) -> dict[str, float]:
    n = sum(counts.values())
    if not n:
        return {"count": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0}

    def at(q: float) -> float:
        rank, seen = min(n - 1, max(0, round(q * (n - 1)))), 0
        for value in sorted(counts):
            seen += counts[value]
            if seen > rank:
                return float(value)
        return 0.0  # pragma: no cover

    mean = sum(k * v for k, v in counts.items()) / n
    return {"count": n, "mean": round(mean, 3), "p50": at(0.5), "p95": at(0.95)}


def job_figures(jobs: Iterable[Job], events: Mapping[str, list[dict[str, Any]]]) -> Figures:
    """The figures of live jobs (``events``: each job's event log, for recoveries)."""
    figures = Figures()
    for job in jobs:
        figures.add(job, _recoveries(events.get(job.id, [])))
    return figures


def _recoveries(events: Iterable[Mapping[str, Any]]) -> int:
    return sum(1 for e in events if e.get("event") == "recovered")


# -- roll-up files -------------------------------------------------------------------------


@dataclass
class MonthRollup:
    """``archive/YYYY-MM.rollup.json``: the figures of that archive file's jobs, by day."""

    path: Path
    days: dict[str, Figures] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)
    upto: int = 0
    """Bytes of the archive file summed in."""

    @classmethod
    def for_archive(cls, archive: Path) -> MonthRollup:
        return cls(archive.with_name(archive.name.removesuffix(".jsonl") + ".rollup.json"))

    @classmethod
    def load(cls, archive: Path) -> MonthRollup:
        rollup = cls.for_archive(archive)
        try:
            data = json.loads(rollup.path.read_bytes())
            rollup.days = {d: Figures.from_json(f) for d, f in data["days"].items()}
            rollup.ids = set(data["ids"])
            rollup.upto = int(data["upto"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s: unreadable (%s); summing its archive again", rollup.path, e)
            rollup.days, rollup.ids, rollup.upto = {}, set(), 0
        return rollup

    def catch_up(self, archive: Path, state_dir: Path | None = None) -> int:
        """Sum in the archive lines past ``upto``; how many jobs were added.
        ``state_dir`` (the registry's) lets a job's event log count its recoveries."""
        try:
            with open(archive, "rb") as f:
                f.seek(self.upto)
                tail = f.read()
        except FileNotFoundError:
            return 0
        end = tail.rfind(b"\n") + 1  # a torn last line waits for its end
        added = 0
        for job in _jobs_in(tail[:end]):
            if job.id in self.ids:
                continue
            self.ids.add(job.id)
            day = job.created_at.date().isoformat()
            recoveries = _recoveries(_events(state_dir, job.id)) if state_dir else 0
            self.days.setdefault(day, Figures()).add(job, recoveries)
            added += 1
        self.upto += end
        return added

    def save(self) -> None:
        doc = {
            "version": 1,
            "upto": self.upto,
            "ids": sorted(self.ids),
            "days": {d: f.to_json() for d, f in sorted(self.days.items())},
        }
        atomic_write(self.path, json.dumps(doc, separators=(",", ":")).encode(), sync=False)


def _jobs_in(data: bytes) -> Iterator[Job]:
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            yield Job.model_validate_json(line)
        except ValidationError:
            continue


def _events(state_dir: Path, job_id: str) -> list[dict[str, Any]]:
    try:
        lines = (state_dir / "jobs" / job_id / "events.jsonl").read_bytes().split(b"\n")
    except OSError:
        return []
    out = []
    for line in lines:
        if b'"recovered"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def archive_months(archive_dir: Path, since: date) -> list[Path]:
    """The archive files that can hold jobs created on or after ``since`` (a job is archived
    in the month it finished, never before the month it was created)."""
    first = f"{since:%Y-%m}.jsonl"
    return sorted(
        p for p in archive_dir.glob("[0-9][0-9][0-9][0-9]-[0-9][0-9].jsonl") if p.name >= first
    )


def rollups_since(archive_dir: Path, since: date) -> tuple[Figures, set[str]]:
    """The archived jobs created on or after ``since``: their figures and ids. Read-only: a
    roll-up behind its archive is caught up in memory (the registry saves roll-ups)."""
    figures, ids = Figures(), set()
    cutoff = since.isoformat()
    for archive in archive_months(archive_dir, since):
        rollup = MonthRollup.load(archive)
        rollup.catch_up(archive)
        for day, day_figures in rollup.days.items():
            if day >= cutoff:
                figures.merge(day_figures)
        ids |= rollup.ids
    return figures, ids


SAVE_EVERY = 500
"""Jobs a cached roll-up takes in before it is saved: readers catch up the rest from the
archive file, so a save per archive run (O(month)) is not needed."""


class RollupCache:
    """The registry's roll-ups, kept in memory between archive runs."""

    def __init__(self, archive_dir: Path, state_dir: Path) -> None:
        self.archive_dir = archive_dir
        self.state_dir = state_dir
        self._months: dict[str, tuple[MonthRollup, int]] = {}

    def update(self, names: Iterable[str]) -> None:
        """After archiving into these files: sum their new lines in; save now and then."""
        for name in names:
            archive = self.archive_dir / name
            rollup, pending = self._months.get(name) or (MonthRollup.load(archive), 0)
            pending += rollup.catch_up(archive, self.state_dir)
            if pending >= SAVE_EVERY or not rollup.path.exists():
                rollup.save()
                pending = 0
            self._months[name] = (rollup, pending)


def update_rollups(archive_dir: Path, names: Iterable[str], state_dir: Path) -> None:
    """Bring the roll-ups of these archive files up to date and save them."""
    for name in names:
        archive = archive_dir / name
        rollup = MonthRollup.load(archive)
        if rollup.catch_up(archive, state_dir):
            rollup.save()


def ensure_rollups(archive_dir: Path, state_dir: Path) -> int:
    """Roll up the archive files that have none yet (an archive from an older opus); the
    number rolled up. Files with a roll-up are not read: the cost is one listing."""
    count = 0
    for archive in archive_months(archive_dir, date.min):
        if not MonthRollup.for_archive(archive).path.exists():
            update_rollups(archive_dir, [archive.name], state_dir)
            count += 1
    return count

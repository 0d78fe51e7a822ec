"""The archive's roll-ups: metrics of archived jobs without reading the archive."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from opus.orchestrator.lifecycle import Outcome, Stage, Status
from opus.orchestrator.metrics import compute
from opus.orchestrator.models import Checkpoint, Job, Priority, Usage
from opus.orchestrator.registry import Registry
from opus.orchestrator.rollups import Histogram, MonthRollup, rollups_since

NOW = datetime(2026, 11, 21, 10, 30, 0)


def job(n: int, created: datetime, status: Status = Status.DONE, seconds: float = 10.0) -> Job:
    t = created
    history = []
    for stage in (Stage.PLANNER, Stage.CODER, Stage.TESTER, Stage.REVIEWER, Stage.DELIVERY):
        history.append(
            Checkpoint(
                stage=stage,
                iteration=1 + n % 2,
                outcome=Outcome.OK,
                started_at=t,
                finished_at=t + timedelta(seconds=seconds),
            )
        )
        t += timedelta(seconds=seconds)
    return Job(
        id=f"{created:%Y%m%d-%H%M%S}-fr-{n}-{n:04x}",
        fr_id=f"FR-{n}",
        fr_path=f"FR-{n}.md",
        title=f"FR {n}",
        priority=Priority.MEDIUM,
        status=status,
        repo="app",
        branch=f"opus/fr-{n}",
        created_at=created,
        updated_at=t,
        finished_at=t,
        history=history,
        usage=Usage(input_tokens=100 + n, output_tokens=10, cost_usd=0.01),
    )


def test_histogram_quantiles_are_within_one_percent() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(3, 1.5) for _ in range(5000)]
    hist = Histogram()
    for v in values:
        hist.add(v)
    ordered = sorted(values)
    for q in (0.5, 0.95, 0.99):
        exact = ordered[round(q * (len(ordered) - 1))]
        assert abs(hist.quantile(q) - exact) / exact < 0.0101
    assert hist.count == 5000 and hist.total == pytest.approx(sum(values))
    back = Histogram.from_json(json.loads(json.dumps(hist.to_json())))
    assert back.quantile(0.95) == hist.quantile(0.95) and back.count == hist.count


def test_archived_jobs_are_counted_from_roll_ups_as_if_live(tmp_path: Path) -> None:
    state = tmp_path / ".opus"
    jobs = [
        job(
            n,
            NOW - timedelta(days=n % 40, hours=1),
            Status.FAILED if n % 7 == 0 else Status.DONE,
            seconds=1 + n % 13,
        )
        for n in range(120)
    ]
    direct = compute(jobs, {}, since_days=30, now=NOW)

    registry = Registry(state, now=lambda: NOW, keep_days=0)
    registry.open()
    for j in jobs:  # as finished jobs whose time has come: all archived
        registry._jobs[j.id] = j
        registry._rows[j.id] = j.model_dump_json()
    assert registry.archive() == 120
    rollups = sorted(p.name for p in (state / "archive").glob("*.rollup.json"))
    assert rollups == ["2026-10.rollup.json", "2026-11.rollup.json"]

    since = (NOW - timedelta(days=30)).date()
    from_rollups = compute(
        [], {}, since_days=30, now=NOW, archived=rollups_since(state / "archive", since)
    )
    exact = (
        "jobs",
        "jobs_per_day",
        "statuses",
        "success_rate",
        "tokens",
        "cost_usd",
        "iterations_per_job",
        "agent_utilization",
    )
    for key in exact:
        assert from_rollups[key] == direct[key], key
    assert from_rollups["jobs"] == sum(1 for j in jobs if j.created_at.date() >= since) < 120
    for key in ("mean", "count"):
        assert from_rollups["pipeline_seconds"][key] == direct["pipeline_seconds"][key]
    for key in ("p50", "p95"):
        got, want = from_rollups["pipeline_seconds"][key], direct["pipeline_seconds"][key]
        assert abs(got - want) <= 0.0101 * want
    assert from_rollups["stage_seconds"].keys() == direct["stage_seconds"].keys()


def test_a_job_archived_twice_counts_once_and_a_live_copy_not_again(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    a, b = job(1, NOW - timedelta(days=1)), job(2, NOW - timedelta(days=2))
    lines = [a.model_dump_json(), b.model_dump_json(), a.model_dump_json()]  # a crash's duplicate
    (archive / "2026-11.jsonl").write_text("\n".join(lines) + "\n")
    figures, ids = rollups_since(archive, (NOW - timedelta(days=30)).date())
    assert figures.jobs == 2 and ids == {a.id, b.id}
    data = compute([a], {}, since_days=30, now=NOW, archived=(figures, ids))
    assert data["jobs"] == 2  # the live copy of an archived job is not counted again


def test_a_roll_up_behind_its_archive_is_caught_up_and_a_torn_line_waits(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    path = archive / "2026-11.jsonl"
    path.write_text(job(1, NOW).model_dump_json() + "\n")
    rollup = MonthRollup.load(path)
    assert rollup.catch_up(path) == 1
    rollup.save()
    with open(path, "a") as f:
        f.write(job(2, NOW).model_dump_json() + "\n" + job(3, NOW).model_dump_json()[:40])
    figures, ids = rollups_since(archive, NOW.date())
    assert figures.jobs == 2 and len(ids) == 2  # the saved one, the tail; not the torn line
    assert MonthRollup.load(path).upto < path.stat().st_size  # reading never wrote


def test_opening_rolls_up_an_archive_written_before_roll_ups(tmp_path: Path) -> None:
    state = tmp_path / ".opus"
    (state / "archive").mkdir(parents=True)
    old = state / "archive" / "2025-01.jsonl"
    old.write_text("".join(job(n, datetime(2025, 1, 5)).model_dump_json() + "\n" for n in range(3)))
    Registry(state, now=lambda: NOW).open()
    rollup = MonthRollup.load(old)
    assert rollup.upto == old.stat().st_size and len(rollup.ids) == 3
    assert rollup.days["2025-01-05"].jobs == 3


def test_a_broken_roll_up_is_rebuilt_from_its_archive(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    path = archive / "2026-11.jsonl"
    path.write_text(job(1, NOW).model_dump_json() + "\n")
    MonthRollup.for_archive(path).path.write_text("{not json")
    figures, _ = rollups_since(archive, NOW.date())
    assert figures.jobs == 1

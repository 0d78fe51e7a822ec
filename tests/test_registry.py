"""The job registry on real files: atomic writes, crash recovery, corruption, archive, cost."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from opus.orchestrator.errors import RegistryError
from opus.orchestrator.lifecycle import Outcome, Stage, Status
from opus.orchestrator.models import Checkpoint, Job, Priority, Usage
from opus.orchestrator.registry import TEMP_PREFIX, Registry

START = datetime(2026, 11, 21, 10, 30, 0)


class Clock:
    """An injectable ``now`` that only moves when told."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "vault" / ".opus"


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    """A permissive umask, so the modes asserted below are the registry's doing."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def opened(state: Path, clock: Clock, **kwargs: object) -> Registry:
    registry = Registry(state, now=clock, **kwargs)  # type: ignore[arg-type]
    registry.open()
    return registry


def new_job(registry: Registry, fr_id: str = "FR-101", **kwargs: object) -> Job:
    return registry.create(
        fr_id=fr_id,
        fr_path=f"10_features/03_planned/{fr_id}.md",
        title=f"Title of {fr_id}",
        priority=Priority.HIGH,
        repo="app",
        branch=f"opus/{fr_id.lower()}",
        **kwargs,  # type: ignore[arg-type]
    )


def checkpoint(job: Job, stage: Stage, clock: Clock, outcome: Outcome = Outcome.OK) -> None:
    started = clock()
    clock.advance(seconds=5)
    job.status = Status.IN_PROGRESS
    job.stage = stage
    job.history.append(
        Checkpoint(
            stage=stage,
            iteration=job.iteration,
            outcome=outcome,
            started_at=started,
            finished_at=clock(),
            commit="0123abcd",
            artifact=f"{stage}-1.log",
            usage=Usage(input_tokens=120, output_tokens=40, cost_usd=0.012),
        )
    )
    job.usage = job.usage + Usage(input_tokens=120, output_tokens=40, cost_usd=0.012)


def finish(job: Job, status: Status, at: datetime) -> None:
    job.status = status
    job.stage = None
    job.finished_at = at


def registry_ids(state: Path) -> list[str]:
    doc = json.loads((state / "registry.json").read_text())
    assert doc["version"] == 1
    return [row["id"] for row in doc["jobs"]]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- basics ---------------------------------------------------------------------------------


def test_constructing_does_no_io_and_save_needs_open(state: Path, clock: Clock) -> None:
    registry = Registry(state, now=clock)
    assert not state.exists()
    with pytest.raises(RegistryError):
        new_job(registry)
    assert not state.exists()


def test_create_and_queries(state: Path, clock: Clock) -> None:
    registry = opened(state, clock)
    first = new_job(registry)
    assert re.fullmatch(r"20261121-103000-fr-101-[0-9a-f]{4}", first.id)
    assert (first.status, first.created_at, first.updated_at) == (Status.QUEUED, START, START)
    clock.advance(minutes=1)
    other = new_job(registry, "FR-7")
    clock.advance(minutes=1)
    second = new_job(registry)
    assert [j.id for j in registry.jobs()] == [first.id, other.id, second.id]
    assert registry.get(other.id) is other
    assert registry.get("nope") is None
    assert registry.latest_for("FR-101") is second
    assert registry.latest_for("FR-999") is None
    finish(second, Status.DONE, clock())
    registry.save(second, "finished")
    assert [j.id for j in registry.active()] == [first.id, other.id]
    events = registry.events(first.id)
    assert [e["event"] for e in events] == ["created"]
    assert events[0]["time"] == "2026-11-21T10:30:00"
    assert Job.model_validate(events[0]["job"]) == first


def test_save_records_data_stamps_time_and_rejects_bad_data(state: Path, clock: Clock) -> None:
    registry = opened(state, clock)
    job = new_job(registry)
    clock.advance(seconds=30)
    registry.save(job, "stage_started", stage=Stage.CODER, took=1.5, note=Path("a/b"))
    last = registry.events(job.id)[-1]
    assert list(last)[:3] == ["time", "event", "job"]
    assert (last["event"], last["stage"], last["took"], last["note"]) == (
        "stage_started",
        "coder",
        1.5,
        "a/b",
    )
    assert job.updated_at == START + timedelta(seconds=30)
    assert last["job"]["updated_at"] == "2026-11-21T10:30:30"
    with pytest.raises(ValueError):
        registry.save(job, "x", time="now")
    with pytest.raises(TypeError):
        registry.save(job, "x", thing=object())
    assert len(registry.events(job.id)) == 2  # neither bad save appended anything


def test_flush_writes_only_when_dirty(state: Path, clock: Clock) -> None:
    registry = opened(state, clock, flush_interval=3600)
    assert registry.flush() is False
    job = new_job(registry)
    assert registry_ids(state) == []  # within flush_interval: not rewritten by save
    assert registry.flush() is True
    assert registry_ids(state) == [job.id]
    assert registry.flush() is False


# -- files and modes ------------------------------------------------------------------------


def test_folders_0700_files_0600(state: Path, clock: Clock) -> None:
    state.mkdir(parents=True, mode=0o755)
    registry = opened(state, clock)
    job = new_job(registry)
    artifact = registry.write_artifact(job.id, "plan.md", "# Plan\n")
    finish(job, Status.DONE, clock())
    registry.save(job, "finished")
    clock.advance(days=31)
    assert registry.archive() == 1
    for folder in (state, state / "jobs", state / "archive", state / "jobs" / job.id):
        assert mode(folder) == 0o700, folder
    files = [
        state / "registry.json",
        state / "jobs" / job.id / "events.jsonl",
        artifact,
        state / "archive" / "2026-11.jsonl",
    ]
    for file in files:
        assert mode(file) == 0o600, file


def test_write_artifact_is_atomic_and_checked(state: Path, clock: Clock) -> None:
    registry = opened(state, clock)
    job = new_job(registry)
    path = registry.write_artifact(job.id, "plan.md", "first")
    assert path == state / "jobs" / job.id / "plan.md"
    inode = path.stat().st_ino
    registry.write_artifact(job.id, "plan.md", "second — ünïcode")
    assert registry.read_artifact(job.id, "plan.md") == "second — ünïcode"
    assert path.stat().st_ino != inode  # replaced, not rewritten in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["events.jsonl", "plan.md"]
    assert registry.read_artifact(job.id, "review-1.json") is None
    for bad in ("../x", "a/b", ".hidden", "events.jsonl", "", "events.jsonl.torn-1"):
        with pytest.raises(ValueError):
            registry.write_artifact(job.id, bad, "x")
    with pytest.raises(ValueError):
        registry.job_dir("../escape")


# -- persistence and recovery ---------------------------------------------------------------


def test_save_flush_reopen_restores_jobs_with_history(state: Path, clock: Clock) -> None:
    registry = opened(state, clock)
    job = new_job(registry)
    checkpoint(job, Stage.PLANNER, clock)
    registry.save(job, "checkpoint")
    checkpoint(job, Stage.CODER, clock, Outcome.REJECTED)
    job.pgids = [4242]
    registry.save(job, "checkpoint")
    registry.flush()
    again = opened(state, Clock(clock()))
    restored = again.get(job.id)
    assert restored == job
    assert restored is not None and [c.stage for c in restored.history] == ["planner", "coder"]
    assert again.repairs == []


def test_crash_between_save_and_flush_loses_nothing(state: Path, clock: Clock) -> None:
    registry = opened(state, clock, flush_interval=3600)
    first = new_job(registry)
    registry.flush()
    checkpoint(first, Stage.PLANNER, clock)
    registry.save(first, "checkpoint")
    second = new_job(registry, "FR-202")
    on_disk = json.loads((state / "registry.json").read_text())["jobs"]
    assert [row["id"] for row in on_disk] == [first.id]
    assert on_disk[0]["history"] == []  # the checkpoint is only in the event log
    # The "crashed" registry is simply never flushed; a successor opens the folder.
    successor = opened(state, Clock(clock()))
    assert successor.jobs() == [first, second]
    assert len(successor.repairs) == 2
    assert registry_ids(state) == [first.id, second.id]  # open() brought the file up to date


@pytest.mark.parametrize(
    "garbage",
    [
        b'{"version": 1, "jobs": [',
        b"\xff\xfe\x00garbage",
        b'{"version": 2, "jobs": []}',
        b'[{"id": "x"}]',
        b'{"version": 1, "jobs": {}}',
        b'{"version": 1, "jobs": [{"id": "x"}]}',
        b"",
    ],
)
def test_corrupt_registry_is_kept_aside_and_rebuilt(
    state: Path, clock: Clock, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    registry = opened(state, clock)
    jobs = [new_job(registry, f"FR-{n}") for n in (1, 2, 3)]
    checkpoint(jobs[1], Stage.PLANNER, clock)
    registry.save(jobs[1], "checkpoint")
    registry.flush()
    (state / "registry.json").write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="opus.orchestrator.registry"):
        rebuilt = opened(state, clock)
    assert rebuilt.jobs() == jobs
    assert (state / "registry.json.corrupt-20261121T103005").read_bytes() == garbage
    assert registry_ids(state) == [j.id for j in jobs]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "corrupt-20261121T103005" in warnings[0].getMessage()
    assert any("registry.json unreadable" in line for line in rebuilt.repairs)


def test_torn_event_line_is_cut_and_kept_aside(state: Path, clock: Clock) -> None:
    registry = opened(state, clock, flush_interval=3600)
    job = new_job(registry)
    registry.flush()
    checkpoint(job, Stage.PLANNER, clock)
    registry.save(job, "checkpoint")
    log = state / "jobs" / job.id / "events.jsonl"
    complete = log.read_bytes()
    fragment = b'{"time":"2026-11-21T10:31:00","event":"checkpoint","job":{"id":"' + job.id.encode()
    with open(log, "ab") as f:  # a crash in the middle of the next append
        f.write(fragment)
    assert [e["event"] for e in registry.events(job.id)] == ["created", "checkpoint"]

    successor = opened(state, Clock(clock()))
    assert successor.get(job.id) == job
    assert log.read_bytes() == complete
    torn = log.with_name("events.jsonl.torn-20261121T103005")
    assert torn.read_bytes() == fragment
    assert mode(torn) == 0o600
    assert any("torn" in line for line in successor.repairs)
    restored = successor.get(job.id)
    assert restored is not None
    successor.save(restored, "checkpoint")
    assert [e["event"] for e in successor.events(job.id)] == ["created", "checkpoint", "checkpoint"]


def test_save_cuts_a_torn_line_before_appending(state: Path, clock: Clock) -> None:
    registry = opened(state, clock)
    job = new_job(registry)
    log = state / "jobs" / job.id / "events.jsonl"
    with open(log, "ab") as f:
        f.write(b'{"time":"2026-')
    registry.save(job, "checkpoint")
    lines = log.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert [json.loads(line)["event"] for line in lines[:-1]] == ["created", "checkpoint"]
    assert log.with_name("events.jsonl.torn-20261121T103000").read_bytes() == b'{"time":"2026-'


def test_stale_temp_files_are_removed_on_open(state: Path, clock: Clock) -> None:
    registry = opened(state, clock)
    job = new_job(registry)
    registry.write_artifact(job.id, "plan.md", "plan")
    registry.flush()
    job_dir = state / "jobs" / job.id
    stale = [
        state / f"{TEMP_PREFIX}registry.json.k1ll3d",
        job_dir / f"{TEMP_PREFIX}plan.md.x9",
        state / "archive" / f"{TEMP_PREFIX}2026-11.jsonl.q",
    ]
    for path in stale:
        path.write_text("half a fi")
    (job_dir / "notes.txt").write_text("keep")
    successor = opened(state, clock)
    assert not any(path.exists() for path in stale)
    assert (job_dir / "notes.txt").read_text() == "keep"
    assert successor.read_artifact(job.id, "plan.md") == "plan"
    assert sum("stale temp file" in line for line in successor.repairs) == 3


# -- archive --------------------------------------------------------------------------------


def _archive_fixture(state: Path, clock: Clock) -> tuple[Registry, dict[str, Job]]:
    clock.now = datetime(2026, 9, 1, 9, 0, 0)
    registry = opened(state, clock)
    jobs = {name: new_job(registry, f"FR-{name}") for name in ("a", "b", "c", "d", "e")}
    finish(jobs["a"], Status.DONE, datetime(2026, 9, 10, 12, 0))
    finish(jobs["b"], Status.FAILED, datetime(2026, 10, 5, 8, 0))
    finish(jobs["c"], Status.CANCELLED, datetime(2026, 11, 15, 8, 0))  # recent
    jobs["d"].status = Status.IN_PROGRESS  # old but unfinished
    jobs["e"].status = Status.REVIEW  # old, waits for a human
    for job in jobs.values():
        registry.save(job, "update")
    registry.flush()
    clock.now = START
    return registry, jobs


def test_latest_for_follows_creation_and_archive(state: Path, clock: Clock) -> None:
    registry = opened(state, clock, keep_days=1)
    older = new_job(registry)
    clock.advance(minutes=1)
    newer = new_job(registry)
    assert registry.latest_for("FR-101") is newer
    registry.save(older, "touched")  # saving an older job does not make it the newest
    assert registry.latest_for("FR-101") is newer
    assert registry.latest() == {"FR-101": newer}
    finish(newer, Status.DONE, clock())
    registry.save(newer, "finished")
    clock.advance(days=2)
    assert registry.archive() == 1
    assert registry.latest_for("FR-101") is older  # the newest live one is the older job now
    assert opened(state, clock, keep_days=1).latest() == {"FR-101": older}


def test_archive_moves_old_finished_jobs_only(state: Path, clock: Clock) -> None:
    registry, jobs = _archive_fixture(state, clock)
    assert registry.archive() == 2
    kept = [jobs[n].id for n in "cde"]
    assert [j.id for j in registry.jobs()] == kept
    assert registry_ids(state) == kept
    assert sorted(p.name for p in (state / "archive").iterdir()) == [
        "2026-09.jsonl",
        "2026-09.rollup.json",
        "2026-10.jsonl",
        "2026-10.rollup.json",
    ]
    assert list(registry.archived()) == [jobs["a"], jobs["b"]]
    assert registry.events(jobs["a"].id)[-1]["event"] == "archived"
    assert (state / "jobs" / jobs["a"].id / "events.jsonl").exists()  # its folder is kept
    assert registry.archive() == 0

    successor = opened(state, Clock(START))  # archived jobs stay archived
    assert [j.id for j in successor.jobs()] == kept
    assert successor.repairs == []
    with open(state / "archive" / "2026-09.jsonl", "a") as f:  # a duplicate from a crash
        f.write(jobs["a"].model_dump_json() + "\n")
    assert [j.id for j in successor.archived()] == [jobs["a"].id, jobs["b"].id]


def test_open_archives_and_rebuild_does_not_resurrect(state: Path, clock: Clock) -> None:
    _, jobs = _archive_fixture(state, clock)
    successor = opened(state, Clock(START), keep_days=30)
    assert [j.id for j in successor.jobs()] == [jobs[n].id for n in "cde"]
    (state / "registry.json").write_text("not json")
    rebuilt = opened(state, Clock(START), keep_days=1000)
    assert [j.id for j in rebuilt.jobs()] == [jobs[n].id for n in "cde"]
    assert [j.id for j in rebuilt.archived()] == [jobs["a"].id, jobs["b"].id]


@pytest.mark.parametrize("registry_older", [True, False])
def test_crash_inside_archive_duplicates_never_loses(
    state: Path, clock: Clock, registry_older: bool
) -> None:
    registry, jobs = _archive_fixture(state, clock)
    path = state / "registry.json"
    before, before_ns = path.read_bytes(), path.stat().st_mtime_ns
    assert registry.archive() == 2
    path.write_bytes(before)  # as if killed before registry.json was replaced
    if registry_older:
        os.utime(path, ns=(before_ns, before_ns))
    successor = opened(state, Clock(START), keep_days=1000)  # keep_days: no second archive
    if registry_older:  # the archive markers in the event logs are newer: honoured
        assert [j.id for j in successor.jobs()] == [jobs[n].id for n in "cde"]
    ids = {j.id for j in successor.jobs()} | {j.id for j in successor.archived()}
    assert ids == {j.id for j in jobs.values()}
    assert [j.id for j in successor.archived()] == [jobs["a"].id, jobs["b"].id]


# -- cost and concurrency -------------------------------------------------------------------


def _written_bytes() -> int | None:
    try:
        text = Path("/proc/thread-self/io").read_text()
    except OSError:
        return None
    return int(re.search(r"^wchar: (\d+)$", text, re.M).group(1))  # type: ignore[union-attr]


def _save_cost(state: Path, n_jobs: int) -> tuple[int | None, int]:
    """Bytes one save writes with ``n_jobs`` in registry.json, and registry.json's size."""
    clock = Clock()
    template = Job(id="x", fr_id="FR-0", fr_path="n.md", title="t" * 200, priority=Priority.LOW,
                   status=Status.DONE, repo="app", branch="opus/fr-0", created_at=START,
                   updated_at=START, finished_at=START)  # fmt: skip
    rows = [
        template.model_copy(update={"id": f"20261121-000000-fr-{i}-beef"}).model_dump(mode="json")
        for i in range(n_jobs)
    ]
    state.mkdir(parents=True)
    (state / "registry.json").write_text(json.dumps({"version": 1, "jobs": rows}))
    registry = opened(state, clock, flush_interval=60, max_finished=n_jobs)
    job = new_job(registry)
    registry_file = state / "registry.json"
    inode, size = registry_file.stat().st_ino, registry_file.stat().st_size
    checkpoint(job, Stage.PLANNER, clock)
    before = _written_bytes()
    registry.save(job, "checkpoint")
    after = _written_bytes()
    assert registry_file.stat().st_ino == inode  # not rewritten within flush_interval
    assert len(registry.jobs()) == n_jobs + 1
    clock.advance(seconds=60)
    registry.save(job, "checkpoint")
    assert registry_file.stat().st_ino != inode  # … but once it is due
    written = None if before is None or after is None else after - before
    return written, size


def test_checkpoint_cost_is_flat_in_registry_size(tmp_path: Path) -> None:
    small, small_size = _save_cost(tmp_path / "small", 10)
    big, big_size = _save_cost(tmp_path / "big", 10_000)
    assert big_size > 100 * small_size
    if small is None or big is None:
        pytest.skip("no /proc/thread-self/io to count written bytes")
    assert 0 < small < 4096
    assert big <= 1.5 * small
    assert big < big_size / 100


def test_concurrent_saves_from_threads(state: Path, clock: Clock) -> None:
    registry = opened(state, clock, flush_interval=0)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            job = new_job(registry, f"FR-{n}")
            for i in range(8):
                job.iteration = 1 + i % 3
                registry.save(job, "tick", i=i)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    registry.flush()
    successor = opened(state, clock)
    assert sorted(j.fr_id for j in successor.jobs()) == ["FR-0", "FR-1", "FR-2", "FR-3"]
    for job in successor.jobs():
        assert [e.get("i") for e in successor.events(job.id)] == [None, *range(8)]
    assert successor.repairs == []


def test_finished_jobs_beyond_the_cap_go_to_the_archive(tmp_path: Path) -> None:
    clock = Clock()
    registry = opened(tmp_path, clock, keep_days=1000, max_finished=20)
    jobs = []
    for n in range(40):
        job = new_job(registry, fr_id=f"FR-{n}")
        job.status, job.finished_at = Status.DONE, clock()
        registry.save(job, "done")
        jobs.append(job)
        clock.advance(seconds=1)
    active = new_job(registry, fr_id="FR-active")
    # past 20 × 1.1 + 10 live jobs, the oldest finished beyond the newest 20 were archived
    live = {j.id for j in registry.jobs()}
    assert active.id in live
    assert {j.id for j in jobs[-20:]} <= live
    archived = {j.id for j in registry.archived()}
    assert archived and archived <= {j.id for j in jobs[:20]}
    assert live | archived == {j.id for j in jobs} | {active.id}
    assert len(live) < 35
    reopened = opened(tmp_path, clock, keep_days=1000, max_finished=20)
    assert {j.id for j in reopened.jobs()} <= live and active.id in {j.id for j in reopened.jobs()}


def test_readers_see_what_was_saved_after_registry_json(tmp_path: Path) -> None:
    """``read_jobs`` (the CLI's reader) after a flush: a later save in a named job's log and
    a job folder made after it are both read — registry.json is dated before its snapshot,
    and the job folders are listed only when one was made or removed since."""
    from opus.orchestrator.views import read_jobs

    state = tmp_path / ".opus"
    registry = Registry(state, now=datetime.now, flush_interval=3600)
    registry.open()
    first = new_job(registry, "FR-1")
    assert registry.flush()
    assert [j.status for j in read_jobs(state)] == [Status.QUEUED]
    first.status = Status.IN_PROGRESS
    registry.save(first, "started", sync=False)  # not flushed
    assert [j.status for j in read_jobs(state)] == [Status.IN_PROGRESS]
    new_job(registry, "FR-2")  # a new folder, not in registry.json
    assert [j.fr_id for j in read_jobs(state)] == ["FR-1", "FR-2"]
    before = time.time_ns()
    assert registry.flush()
    assert (state / "registry.json").stat().st_mtime_ns < before - 10**9 // 2  # dated back
    assert [j.fr_id for j in read_jobs(state)] == ["FR-1", "FR-2"]

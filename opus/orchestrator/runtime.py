"""What every job shares: the parts opus is built from, and how a job's state is recorded.

``Runtime`` is the one place that writes a job's state: to the registry (the checkpoint) and
then into the note (the mirror), in that order, so a crash between the two is repaired from
the registry on the next start.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

import anyio
import httpx

from .agents.base import Agent, StageExecutor
from .atomic import atomic_write
from .budget import new_alerts, over_caps, spent
from .config import Config
from .errors import NoteError
from .github import ResponseCache
from .lifecycle import FINISHED, WITH_STAGE, Stage, Status
from .models import Job
from .notify import Notifier
from .redact import Redactor
from .registry import Registry
from .sandbox import Sandbox
from .vault import Vault
from .workspace import Workspace

log = logging.getLogger(__name__)

#: Statuses a person sets that opus never overwrites in the note with its progress: a
#: request for changes made while the job ran is acted on once it rests in ``review``
#: (SPEC §2.4). Only the answer to the edit (``answer=True``) replaces it. An approval
#: written while the job ran is kept while it runs but not acted on: at rest the job's
#: status replaces it and the log says so — only what is there to see can be approved
#: (the branch at ``review``, the plan at ``plan-review``: SPEC §7, §16).
RESPECT = frozenset({Status.PAUSED, Status.CANCELLED, Status.APPROVED, Status.CHANGES_REQUESTED})

StopReason = Literal["pause", "preempt", "shutdown", "cancel"]
T = TypeVar("T")

#: Events nothing is resumed from: not fsynced (a crash of opus keeps them; only a power
#: loss could, and then the next checkpoint's snapshot carries the same state anyway).
UNSYNCED = frozenset({"started", "stage_started", "spawned", "waiting"})


@dataclass
class Control:
    """A request to a running job, checked at each stage boundary (``cancel`` acts at once)."""

    stop: StopReason | None = None
    scope: anyio.CancelScope | None = None
    finished: anyio.Event = field(default_factory=anyio.Event)

    def request(self, reason: StopReason) -> None:
        if self.stop in ("cancel", "shutdown") and reason in ("pause", "preempt"):
            return
        self.stop = reason
        if reason == "cancel" and self.scope is not None:
            self.scope.cancel()


def _nothing() -> None:
    return None


def local_now() -> datetime:
    """Local time to the millisecond (notes show it to the second)."""
    now = datetime.now()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


@dataclass
class Runtime:
    config: Config
    vault: Vault
    registry: Registry
    agents: Mapping[Stage, Agent]
    workspaces: Mapping[str, Workspace]
    notifier: Notifier
    redactor: Redactor
    now: Callable[[], datetime] = local_now
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    http_transport: httpx.AsyncBaseTransport | None = None
    """For tests: where GitHub and webhook requests go."""
    github_cache: ResponseCache = field(default_factory=ResponseCache)
    """ETags, bodies and the rate-limit reset of GitHub polls, kept from poll to poll."""
    other_spend: list[tuple[datetime, float]] = field(default_factory=list)
    """Spending outside jobs, (when, USD): ideation runs (SPEC §19)."""
    sandbox: Sandbox | None = None
    """Where agent processes run (SPEC §17); None: unsandboxed."""
    on_change: Callable[[Job], None] | None = None
    """Called after every recorded change (the dashboard, the demo's printer)."""
    executor: StageExecutor | None = None
    """Runs some stages on a cluster (``[executor] kind = "ray"``); None: all stages local."""
    _mirrored: dict[str, tuple[object, ...]] = field(default_factory=dict)
    """What each job's note last showed, so an unchanged note is not read again."""

    _budget_alerts: list[str] = field(default_factory=list)
    """``alert_at`` messages found by ``over_budget``, sent by ``check_budget``."""
    _budget_reached: str | None = None
    """The cap ``check_budget`` last told as reached, until spending is under it again."""

    def over_budget(self) -> str | None:
        caps = self.config.budget
        if not caps.daily_usd and not caps.monthly_usd:
            return None
        now = self.now()
        archived = self.registry.archived_in(f"{now:%Y-%m}")  # this month's spend counts too
        jobs = {j.id: j for j in [*archived, *self.registry.jobs()]}  # each job once
        day, month = spent(jobs.values(), now, self.other_spend)
        if caps.alert_at:
            told_file = self.config.state_dir / "budget-alerts.json"
            try:
                told = json.loads(told_file.read_bytes())
            except (OSError, ValueError):
                told = {}
            fresh = new_alerts(caps, day, month, now, told)
            if fresh:
                atomic_write(told_file, json.dumps(told).encode())
                self._budget_alerts += fresh
        return over_caps(caps, day, month)

    async def check_budget(self, job: Job | None) -> str | None:
        """``over_budget`` in a thread, then the ``budget`` notifications it found due (for
        ``job``'s FR; None: for an ideation's spend)."""
        caps = self.config.budget
        if not caps.daily_usd and not caps.monthly_usd:
            return None  # no caps: nothing to add up (before every stage of every job)
        why = await anyio.to_thread.run_sync(self.over_budget)
        alerts, self._budget_alerts = self._budget_alerts, []
        cap = why.split(":")[0] if why else None  # "daily budget reached"
        if cap is not None and cap != self._budget_reached:
            alerts.append(why or "")  # told once each time a cap is reached (SPEC §5.2)
        self._budget_reached = cap
        for message in alerts:
            log.warning("budget: %s", message)
            if job is not None:
                await self.notify("budget", job, message)
            else:
                await self.notifier.send(
                    "budget", fr_id="", title="ideation", status="", message=message
                )
        return why

    def executor_holds(self, stage: Stage) -> str | None:
        """Why ``stage`` cannot start now because it runs remote and the cluster is away."""
        if self.executor is None or not self.executor.remote(stage):
            return None
        return self.executor.ready()

    def workspace(self, job: Job) -> Workspace:
        return self.workspaces[job.repo]

    async def record(
        self,
        job: Job,
        event: str,
        *,
        note: bool = True,
        answer: bool = False,
        first: Sequence[Callable[[], object]] = (),
        **data: Any,
    ) -> Status | None:
        """Checkpoint ``job`` in the registry, then mirror it into its note if what the note
        shows changed — both in one hand-off to a worker thread (after ``first``, see
        ``record_then``).

        Returns the note's status as it was on disk (a person may have changed it), or None
        when the note was not touched. ``answer``: this is opus's answer to the person's
        status (see ``RESPECT``), which it replaces.
        """
        on_disk, _ = await self.record_then(
            job, event, _nothing, note=note, answer=answer, first=first, **data
        )
        return on_disk

    async def record_then(
        self,
        job: Job,
        event: str,
        then: Callable[[], T],
        *,
        note: bool = True,
        answer: bool = False,
        first: Sequence[Callable[[], object]] = (),
        **data: Any,
    ) -> tuple[Status | None, T]:
        """``record``, then ``then()`` in the same hand-off to a worker thread (a stage's
        start is recorded and its files are prepared in one). ``first`` run before the
        record, in that hand-off too: the files a checkpoint names are on disk before it."""
        job.updated_at = self.now()
        if job.status in FINISHED and job.finished_at is None:
            job.finished_at = job.updated_at
        sync = event not in UNSYNCED
        edit = self._changed_note(job, answer=answer) if note else None

        def boundary() -> tuple[Status | None, T]:
            for step in first:
                step()
            self.registry.save(job, event, sync=sync, **data)
            on_disk = edit() if edit is not None else None
            return on_disk, then()

        done = await anyio.to_thread.run_sync(boundary)
        if self.on_change is not None:
            self.on_change(job)
        return done

    async def create_job(self, event: str, **fields: Any) -> Job:
        """A new job in the registry, its first event ``event`` (a claim); the note is left
        to ``show`` or the job's first ``record``."""
        job = await anyio.to_thread.run_sync(lambda: self.registry.create(event=event, **fields))
        if self.on_change is not None:
            self.on_change(job)
        return job

    async def show(self, job: Job) -> Status | None:
        """Mirror ``job`` into its note if what the note shows changed since opus last wrote
        it (a ``record(..., note=False)`` left it to a later write)."""
        edit = self._changed_note(job)
        return await anyio.to_thread.run_sync(edit) if edit is not None else None

    def _changed_note(
        self, job: Job, *, answer: bool = False
    ) -> Callable[[], Status | None] | None:
        """The note write that brings the note up to ``job``, or None if it shows that."""
        shown = (
            job.status,
            job.stage,
            job.iteration,
            job.branch,
            job.pr_url,
            job.error,
            job.fr_path,
            job.round,
            job.plan_note,
        )
        if self._mirrored.get(job.id) == shown and not answer:
            return None
        self._mirrored[job.id] = shown  # (forgotten again if the write fails)
        return self._mirror_edit(job, answer=answer)

    async def mirror(self, job: Job, *, answer: bool = False) -> Status | None:
        """Write the job's status into its note's opus keys; a person's control status wins
        over progress, unless ``answer``: the job has acted on it (a round after approval)."""
        return await anyio.to_thread.run_sync(self._mirror_edit(job, answer=answer))

    def _mirror_edit(self, job: Job, *, answer: bool = False) -> Callable[[], Status | None]:
        """The note write ``mirror`` does, to run in a worker thread; it logs a failure and
        returns None then (the next record tries again)."""
        changes: dict[str, object | None] = {
            "status": job.status.value,
            "stage": job.stage.value if job.stage and job.status in WITH_STAGE else None,
            "iteration": _note_iteration(job),
            "round": job.round if job.round > 1 else None,
            "plan": f"[[{job.plan_note.removesuffix('.md')}]]" if job.plan_note else None,
            "job_id": job.id,
            "branch": job.branch,
            "pr_url": job.pr_url,
            "error": self.redactor(job.error) if job.error else None,
            "updated_at": self.now(),
        }
        path = self.config.root / job.fr_path
        # progress never overwrites a person's control, nor does a rest that waits for one;
        # an end (done, failed, blocked, …) answers it
        respect: frozenset[Status] = frozenset()
        if answer:
            pass  # opus answers the person's status: its own replaces it
        elif job.status in (Status.QUEUED, Status.IN_PROGRESS):
            respect = RESPECT
        elif job.status is Status.REVIEW:
            # an approval given before the branch was there to see approves nothing (a
            # manual approval must never merge unreviewed work); a request for changes does
            respect = RESPECT - {Status.APPROVED}
        elif job.status is Status.PLAN_REVIEW:
            respect = RESPECT - {Status.APPROVED, Status.CHANGES_REQUESTED}  # (no plan yet)

        def edit() -> Status | None:
            try:
                on_disk = self.vault.update(path, changes, respect=respect)
                person = on_disk in (Status.APPROVED, Status.CHANGES_REQUESTED)
                if person and not answer and on_disk not in respect and on_disk is not job.status:
                    log.warning(
                        "%s: `%s`, written before there was a result to judge, is not "
                        "acted on: the FR is %s; set it again now",
                        job.fr_id, on_disk, job.status,
                    )  # fmt: skip
                return on_disk
            except NoteError as e:
                log.warning("%s: cannot update the note: %s", job.fr_id, e.problem)
            except FileNotFoundError:
                log.warning("%s: its note %s is gone", job.fr_id, job.fr_path)
            self._mirrored.pop(job.id, None)  # try again at the next record
            return None

        return edit

    async def notify(self, event: str, job: Job, message: str, **details: str) -> None:
        await self.notifier.send(
            event,
            fr_id=job.fr_id,
            title=job.title,
            status=job.status.value,
            message=self.redactor(message),
            job_id=job.id,
            details={k: self.redactor(v) for k, v in details.items()},
        )


def _note_iteration(job: Job) -> int | None:
    """The note's ``iteration``: the pass of the coder→tester→reviewer loop (SPEC §2.2),
    kept at rest (the pass it ended in). Planning and ``plan-review`` come before pass 1:
    a re-plan numbers its own attempts in the artifacts, not in the note."""
    if job.stage is Stage.PLANNER or job.status is Status.PLAN_REVIEW:
        return 1
    return job.iteration or None

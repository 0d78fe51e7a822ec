"""Which FR runs when: claiming notes, a person's controls, slots, priority, preemption,
dependencies and settling what waits in review (SPEC §2.3, §4, §7)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import anyio
from anyio.abc import TaskGroup

from .delivery import Delivery
from .errors import OpusError, WorkspaceError
from .lifecycle import FINISHED, Status, check_transition
from .models import FeatureRequest, Job, slug
from .pipeline import Pipeline, next_step
from .plans import PlanGate
from .pr_feedback import github_trigger
from .reactions import Rounds, Trigger
from .runtime import Control, Runtime
from .supervisor import kill_group
from .vault import Scan, dependency_cycle

log = logging.getLogger(__name__)


#: Statuses opus writes into a note; a mismatch with the registry is repaired from it.
OPUS_SET = frozenset(
    {
        Status.QUEUED,
        Status.IN_PROGRESS,
        Status.REVIEW,
        Status.PLAN_REVIEW,
        Status.DONE,
        Status.FAILED,
        Status.BLOCKED,
    }
)


@dataclass
class Running:
    job: Job
    control: Control


_INSTEAD = {
    Status.REVIEW: "set changes-requested with feedback for a rework round, or cancelled "
    "and then planned for a fresh job",
    Status.PLAN_REVIEW: "set approved to start the coder on the plan, or changes-requested "
    "with feedback to re-plan",
    Status.DONE: "it is merged; a new FR asks for more",
}


class Scheduler:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.delivery = Delivery(rt)
        self.rounds = Rounds(rt)
        """Where every rework trigger starts its round (SPEC §15; reactions.py)."""
        self.plans = PlanGate(rt)
        self.running: dict[str, Running] = {}
        self.accepting = True
        self.finished = anyio.Event()
        """Set (and replaced) whenever a pipeline ends."""
        self._budget_told: str | None = None
        self._merged: dict[str, frozenset[str]] | None = None
        """The poll's merged branches by repository, while ``reconcile`` settles reviews."""
        self._archive_seen = -1
        self._done_archived: set[str] = set()
        self.only: set[str] | None = None
        """When set, only these FR ids are acted on (``Orchestrator.process``)."""
        self._unshown: list[Job] = []
        """Jobs claimed this tick whose note does not show them yet (``start_ready``)."""
        self._settled: dict[str, tuple[FeatureRequest, tuple[object, ...]]] = {}
        """Per FR id: the note (the scan's object) and job state a reconcile last acted on.
        Unchanged since, they need nothing more until the next poll settles reviews."""

    # -- start-up -------------------------------------------------------------------------------

    async def recover(self) -> list[Job]:
        """Kill what a dead predecessor left running; unfinished jobs go back to the queue."""
        recovered = []
        for job in self.rt.registry.jobs():
            if job.status in FINISHED:
                continue
            for pgid in job.pgids:
                if await anyio.to_thread.run_sync(kill_group, pgid):
                    log.warning(
                        "%s: killed agent process group %d left by a dead opus", job.fr_id, pgid
                    )
            job.pgids = []
            if job.status is Status.IN_PROGRESS:
                job.status = Status.QUEUED
                await self.rt.record(job, "recovered")
                done = f"{job.last.stage} of iteration {job.last.iteration}" if job.last else "none"
                log.info("%s: recovered job %s (last completed stage: %s)", job.fr_id, job.id, done)
                await self.rt.notify("recovered", job, f"resumes after {done} (job {job.id})")
                recovered.append(job)
        return recovered

    # -- reconciling notes with jobs -----------------------------------------------------------

    async def reconcile(self, scan: Scan, *, settle_reviews: bool = True) -> None:
        """Act on every note whose status and job disagree (cheap for notes at rest)."""
        latest = self.rt.registry.latest()
        todo = [
            fr for fr in scan.frs.values() if self._unsettled(fr, latest.get(fr.id), settle_reviews)
        ]
        self._merged = None  # this poll's, asked once when first needed
        for fr in sorted(todo, key=lambda f: (f.priority.rank, f.id)):
            job = latest.get(fr.id)
            try:
                await self._reconcile(fr, job, settle_reviews)
            except OpusError as e:  # a note, git or GitHub problem: this FR waits, others go on
                log.warning("%s: %s", fr.id, e)
                continue
            self._settled[fr.id] = (fr, self._state(latest.get(fr.id)))
        for gone in self._settled.keys() - scan.frs.keys():
            del self._settled[gone]
        if any(p.path == self.rt.config.planned_dir for p in scan.problems):
            return  # the folder could not be listed: absence proves nothing
        for job in self.rt.registry.jobs():
            if (
                job.status in (Status.QUEUED, Status.PAUSED)
                and job.fr_id not in scan.frs
                and job.id not in self.running
                and not (self.rt.config.root / job.fr_path).exists()  # not merely unreadable
            ):
                job.status = Status.CANCELLED
                job.error = "the note left the planned folder"
                await self.rt.record(job, "cancelled", note=False)
            elif settle_reviews and job.status is Status.REVIEW and job.fr_id not in scan.frs:
                # the person filed the note away; a merge still makes the job done
                try:
                    settled = await self._merged_or_closed(job)
                except OpusError as e:
                    log.warning("%s: %s", job.fr_id, e)
                    continue
                if settled is not None:
                    await self._end(job, settled, None, settled.value)

    async def _merged_or_closed(self, job: Job) -> Status | None:
        """``Delivery.merged_or_closed``, with the merged branches of every repository that
        has a job in review read once per poll (one git process each, not one per FR)."""
        if self._merged is None:
            reviewed = [j for j in self.rt.registry.jobs() if j.status is Status.REVIEW]
            self._merged = await self.delivery.merged_branches(reviewed)
        return await self.delivery.merged_or_closed(job, merged=self._merged)

    def _unsettled(self, fr: FeatureRequest, job: Job | None, settle_reviews: bool) -> bool:
        """Whether a reconcile has anything to do for this FR (a tick asks it of every note)."""
        if self.only is not None and fr.id not in self.only:
            return False
        if self._at_rest(fr, job):
            return False
        last = self._settled.get(fr.id)
        # unless reviews are settled, an FR whose note and job are as the last reconcile left
        # them has nothing new
        return settle_reviews or not last or last[0] is not fr or last[1] != self._state(job)

    def _state(self, job: Job | None) -> tuple[object, ...]:
        """What a reconcile of an FR reads besides its note: its job and whether it runs."""
        if job is None:
            return (None,)
        run = self.running.get(job.id)
        stop = run.control.stop if run is not None else "idle"
        return (job.id, job.status, job.updated_at, stop)

    def _at_rest(self, fr: FeatureRequest, job: Job | None) -> bool:
        """A note resting at a status its job agrees with (or that has no job): nothing to do."""
        status = fr.status
        if status in (Status.DONE, Status.FAILED, Status.BLOCKED):
            return job is None or job.status is status
        if status is Status.CANCELLED:
            return job is None or (job.status in FINISHED and job.id not in self.running)
        return False

    async def _reconcile(self, fr: FeatureRequest, job: Job | None, settle_reviews: bool) -> None:
        rt = self.rt
        run = self.running.get(job.id) if job else None
        status = fr.status or Status.PLANNED
        rel = fr.path.relative_to(rt.config.root).as_posix()
        if job is not None and job.fr_path != rel and fr.job_id == job.id:
            job.fr_path = rel  # the person renamed the note: follow it
            await rt.record(job, "note_renamed", note=False, path=rel)
        if fr.invalid is not None and (status is Status.PLANNED or job is None):
            if status is Status.PLANNED:
                key, problem = fr.invalid
                log.warning("%s: %s: bad value for `%s`: %s", fr.id, fr.path.name, key, problem)
                changes = {"status": "failed", "error": f"{key}: {problem}", "updated_at": rt.now()}
                await anyio.to_thread.run_sync(lambda: rt.vault.update(fr.path, changes))
            return  # (a job that exists still obeys a person's pause or cancel)
        if (
            job is not None
            and job.status in (Status.QUEUED, Status.PAUSED)
            and (job.priority is not fr.priority and fr.invalid is None)
        ):
            job.priority = fr.priority  # the person re-prioritised a waiting FR
            await rt.record(job, "reprioritised", note=False, priority=fr.priority.value)
        if status is Status.PLANNED:
            if job is not None and job.status is Status.PAUSED:
                job.status = Status.QUEUED
                await rt.record(job, "resumed")
                log.info("%s: resumed (job %s)", fr.id, job.id)
            elif job is not None and job.status in (Status.QUEUED, Status.IN_PROGRESS):
                if run is not None and run.control.stop == "pause":
                    run.control.stop = None  # resumed before the pause took effect
                await rt.mirror(job)
            elif job is not None and job.status in (Status.REVIEW, Status.PLAN_REVIEW, Status.DONE):
                # its branch waits for a person (or is merged): a second job would leave it
                # behind (or merge the same work again)
                what = "status planned (or a value opus does not know)"
                await self._refuse(job, f"{what} on an FR in {job.status}: {_INSTEAD[job.status]}")
            else:
                await self._claim(fr, "queued")
        elif status is Status.PAUSED:
            if run is not None:
                run.control.request("pause")
            elif job is not None and job.status in (Status.QUEUED, Status.IN_PROGRESS):
                job.status = Status.PAUSED
                await rt.record(job, "paused")
            elif job is not None and job.status is not Status.PAUSED:
                await self._refuse(job, f"paused: the FR is {job.status}, nothing runs to pause")
        elif status is Status.CANCELLED:
            if run is not None:
                run.control.request("cancel")
            elif job is not None and job.status in (
                Status.QUEUED,
                Status.IN_PROGRESS,
                Status.PAUSED,
                Status.REVIEW,
                Status.PLAN_REVIEW,
            ):
                await self._end(job, Status.CANCELLED, None, "cancelled")
        elif status is Status.APPROVED:
            if job is None or run is not None:
                pass  # a running job's approval is acted on when it comes to rest
            elif job.status is Status.PLAN_REVIEW:
                await self.plans.approve(job)
            elif job.merge_refused:
                log.info("%s: approved again: retrying the merge alone (job %s)", fr.id, job.id)
                await self._approved(job)
            elif job.status is Status.REVIEW:
                await self._approved(job)
            elif job.status is Status.DONE:
                await rt.mirror(job)  # merged before a crash hid it from the note
            elif job.status in FINISHED:
                await self._refuse(
                    job, f"approved: the FR is {job.status}; set planned to retry it"
                )
            elif job.status is Status.PAUSED:
                await self._refuse(job, "approved: the FR is paused; set planned to resume it")
        elif status is Status.CHANGES_REQUESTED:
            await self._changes_requested(fr, job, run is not None)
        elif status is Status.REVIEW and job is not None and job.status is Status.REVIEW:
            if settle_reviews and fr.job_id == job.id:
                settled = await self._merged_or_closed(job)
                if settled is not None:
                    await self._end(job, settled, None, settled.value)
                elif (trigger := await github_trigger(rt, job)) is not None:
                    await self.rounds.start(job, trigger)  # PR reviews, comments, CI
                elif (
                    await self.delivery.unmergeable(job)  # the base moved under it
                    and (trigger := await self.rounds.conflict(job)) is not None  # confirmed
                ):
                    await self.rounds.start(job, trigger)
        elif status in OPUS_SET:
            # the note may be older than the job (scanned before a pipeline moved on):
            # the registry decides whether a job still claims it
            claimed = job is not None and (
                fr.job_id in (None, job.id) or job.status not in FINISHED
            )
            if not claimed:
                if status in (Status.QUEUED, Status.IN_PROGRESS):
                    await self._claim(fr, "requeued")
            elif job is not None and job.status is not status and run is None:
                await rt.mirror(job)

    async def _refuse(self, job: Job, why: str) -> None:
        """A person's status opus cannot act on: the note shows the job's status again, and
        the log says why (the job's own ``error``, if any, is kept)."""
        log.warning("%s: %s", job.fr_id, why)
        await self.rt.mirror(job, answer=True)

    async def _approved(self, job: Job) -> None:
        """Merge an approved job; a branch that no longer merges cleanly gets a round."""
        job.status = check_transition(job.status, Status.APPROVED)
        trigger = await self.rounds.conflict(job)
        if trigger is not None:
            await self.rounds.start(job, trigger, answer=True)  # the approval led to it
            return
        result, error = await self.delivery.merge(job)
        await self._end(job, result, error, result.value)

    async def _changes_requested(self, fr: FeatureRequest, job: Job | None, running: bool) -> None:
        """A person's ``changes-requested``: a rework round for a job in review."""
        if job is None or running:
            return
        if job.status is Status.PLAN_REVIEW:
            if fr.feedback is None:
                job.error = "changes-requested needs a `feedback` text saying what to change"
                await self.rt.record(job, "feedback_missing", note=False)
                await self.rt.mirror(job, answer=True)
                return
            await self.plans.replan(job, fr.feedback)
        elif job.status is Status.REVIEW:
            if fr.feedback is None:
                job.error = "changes-requested needs a `feedback` text saying what to change"
                await self.rt.record(job, "feedback_missing", note=False)
                await self.rt.mirror(job, answer=True)  # back to review, with the error
                return
            await self.rounds.start(
                job, Trigger(source="person", feedback=fr.feedback), answer=True
            )
        elif job.status in FINISHED or job.status is Status.PAUSED:
            await self._refuse(job, f"changes-requested: the FR is {job.status}, nothing to rework")
        # (a job that has yet to come to rest gets its round when it does)

    async def _claim(self, fr: FeatureRequest, event: str) -> Job:
        rt = self.rt
        repo = fr.repo or rt.config.default_repo
        prefix = rt.config.repos[repo].branch_prefix
        rel = fr.path.relative_to(rt.config.root).as_posix()
        job = await rt.create_job(
            event,  # the job's first line says it was claimed
            fr_id=fr.id,
            fr_path=rel,
            title=fr.title,
            priority=fr.priority,
            repo=repo,
            branch=f"{prefix}{slug(fr.id)}",
        )
        # the note shows it when ``start_ready`` has decided: in-progress at once, or queued
        self._unshown.append(job)
        log.info("%s: %s as job %s (%s)", fr.id, event, job.id, fr.priority)
        return job

    async def _end(self, job: Job, status: Status, error: str | None, event: str) -> None:
        job.status = check_transition(job.status, status)
        job.stage, job.error = None, error
        # written even when the note showed this before: a person's approved that led here
        # (a merge refused again) is answered, not retried at every poll
        await self.rt.record(job, event, answer=True)
        level = logging.WARNING if status in (Status.FAILED, Status.BLOCKED) else logging.INFO
        log.log(
            level, "%s: %s%s (job %s)", job.fr_id, status, f": {error}" if error else "", job.id
        )
        if status.value in ("done", "blocked"):
            await self.rt.notify(status.value, job, error or f"merged {job.branch}")
        if status in (Status.DONE, Status.CANCELLED):
            path = self.rt.config.state_dir / "worktrees" / job.id
            if path.exists():
                try:
                    await anyio.to_thread.run_sync(self.rt.workspace(job).remove, path)
                except WorkspaceError as e:
                    log.warning("%s: could not remove worktree: %s", job.fr_id, e)

    # -- starting work ----------------------------------------------------------------------------

    def waiting(self, scan: Scan) -> list[tuple[Job, FeatureRequest]]:
        """Queued jobs whose note is present and whose dependencies are done, best first."""
        ready = []
        for job in self.rt.registry.jobs():
            fr = scan.frs.get(job.fr_id)
            if job.status is not Status.QUEUED or job.id in self.running or fr is None:
                continue
            if self.only is not None and job.fr_id not in self.only:
                continue
            if all(self._done(dep, scan) for dep in fr.depends_on) and not self._held(job):
                ready.append((job, fr))
        if len(ready) > 1:  # priority, then when opus first saw the FR (SPEC §4): a retry
            first: dict[str, datetime] = {}  # keeps the place its FR had
            for j in self.rt.registry.jobs():
                if j.fr_id not in first or j.created_at < first[j.fr_id]:
                    first[j.fr_id] = j.created_at
            ready.sort(key=lambda pair: (pair[0].priority.rank, first[pair[0].fr_id]))
        return ready

    def _held(self, job: Job) -> str | None:
        """Why a job whose next stage runs on the cluster cannot start now (SPEC §18)."""
        if self.rt.executor is None:
            return None  # every stage runs here (and the next step is not worked out)
        step = next_step(job, self.rt.config.pipeline.max_iterations)
        return self.rt.executor_holds(step[0]) if isinstance(step, tuple) else None

    def _done(self, fr_id: str, scan: Scan) -> bool:
        """Merged: its job says so; a note says ``done`` only for an FR opus never ran
        (a person's hand-written ``done`` on a job in review is not a merge)."""
        job = self.rt.registry.latest_for(fr_id)
        if job is not None:
            return job.status is Status.DONE
        fr = scan.frs.get(fr_id)
        return (fr is not None and fr.status is Status.DONE) or fr_id in self._archived_done()

    def _archived_done(self) -> set[str]:
        """FR ids whose archived job is done (read again only after an archive run)."""
        registry = self.rt.registry
        if self._archive_seen != registry.archive_generation:
            self._archive_seen = registry.archive_generation
            self._done_archived = {j.fr_id for j in registry.archived() if j.status is Status.DONE}
        return self._done_archived

    async def _explain_waits(self, scan: Scan) -> None:
        """Say in the note why a queued FR waits on a dependency that cannot come."""
        for job in self.rt.registry.jobs():
            fr = scan.frs.get(job.fr_id)
            if job.status is not Status.QUEUED or job.id in self.running or fr is None:
                continue
            why = None
            cycle = dependency_cycle(fr.id, scan.frs)
            if cycle is not None and not any(self._done(dep, scan) for dep in cycle):
                why = "depends_on: a cycle, each waits for the next: " + " → ".join(cycle)
            for dep in () if why else fr.depends_on:
                if dep == fr.id:
                    why = "depends_on: an FR cannot depend on itself"
                elif (
                    dep not in scan.frs
                    and self.rt.registry.latest_for(dep) is None
                    and (dep not in self._archived_done())
                ):
                    why = f"depends_on: no FR {dep} in the vault"
                else:
                    other = self.rt.registry.latest_for(dep)
                    if other is not None and other.status in (
                        Status.FAILED,
                        Status.BLOCKED,
                        Status.CANCELLED,
                    ):
                        why = f"waits for {dep}, which is {other.status}"
                if why:
                    break
            held = None if why else self._held(job)
            why = why or (f"waiting: {held}" if held else None)
            if why != job.error:
                job.error = why
                await self.rt.record(job, "waiting", reason=why or "")

    async def start_ready(self, tg: TaskGroup, scan: Scan) -> int:
        """Start as many waiting jobs as there are free slots; preempt if one must yield.

        A job claimed this tick shows in its note as its pipeline starts (``in-progress``)
        or, when it waits, as ``queued`` — written here, before anything starts.
        """
        waiting = await self._startable(scan)
        chosen = waiting[: max(self.rt.config.pipeline.concurrency - len(self.running), 0)]
        starting = {job.id for job, _ in chosen}
        unshown, self._unshown = self._unshown, []
        for job in unshown:
            if job.id not in starting and job.id not in self.running:
                await self.rt.show(job)
        for job, fr in chosen:
            control = Control()
            self.running[job.id] = Running(job, control)
            tg.start_soon(self._run, job, fr, control)
        if self.rt.config.pipeline.preempt and len(waiting) > len(chosen):
            self._preempt(waiting[len(chosen)][0])
        return len(chosen)

    async def _startable(self, scan: Scan) -> list[tuple[Job, FeatureRequest]]:
        """``waiting``, when new work may start (accepting, within the budget); else []."""
        if not self.accepting:
            return []
        await self._explain_waits(scan)
        waiting = self.waiting(scan)
        if not waiting:
            return []
        why = await self.rt.check_budget(waiting[0][0])  # (which tells a cap reached)
        if why:
            if why != self._budget_told:
                self._budget_told = why
                log.warning("budget: %s; %d FR(s) wait", why, len(waiting))
            return []
        self._budget_told = None
        return waiting

    def _preempt(self, best: Job) -> None:
        if any(r.control.stop == "preempt" for r in self.running.values()):
            return
        candidates = [r for r in self.running.values() if r.control.stop is None]
        if len(self.running) < self.rt.config.pipeline.concurrency or not candidates:
            return
        if any(r.job.priority.rank <= best.priority.rank for r in self.running.values()):
            return  # only when every slot holds a lower-priority job
        worst = max(candidates, key=lambda r: (r.job.priority.rank, r.job.created_at))
        if best.priority.rank < worst.job.priority.rank:
            log.info(
                "%s (%s) waits: %s (%s) yields at its next stage boundary",
                best.fr_id,
                best.priority,
                worst.job.fr_id,
                worst.job.priority,
            )
            worst.control.request("preempt")

    async def _run(self, job: Job, fr: FeatureRequest, control: Control) -> None:
        try:
            with anyio.CancelScope() as scope:
                control.scope = scope
                await Pipeline(self.rt, job, fr, control).run()
        except Exception as e:
            if isinstance(e, OSError):  # a full disk, a vanished folder: one line, no traceback
                where = f" ({e.filename})" if e.filename else ""
                log.error("%s: job %s stopped: %s%s", job.fr_id, job.id, e.strerror or e, where)
            else:
                log.exception("%s: internal error in job %s", job.fr_id, job.id)
            with anyio.CancelScope(shield=True):
                job.status, job.error, job.pgids = Status.FAILED, f"internal error: {e!r}", []
                await self.rt.record(job, "failed")
        finally:
            self.running.pop(job.id, None)
            control.finished.set()
            self.finished.set()
            self.finished = anyio.Event()

    # -- stopping ----------------------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Take no new work; let running stages finish within ``grace``; then cancel the rest."""
        self.accepting = False
        runs = list(self.running.values())
        for run in runs:
            run.control.request("shutdown")
        with anyio.move_on_after(grace):
            for run in runs:
                await run.control.finished.wait()
        for run in list(self.running.values()):
            log.warning(
                "%s: stage %s still running after %.0f s; stopping it",
                run.job.fr_id,
                run.job.stage,
                grace,
            )
            if run.control.scope is not None:
                run.control.scope.cancel()
        for run in runs:
            await run.control.finished.wait()

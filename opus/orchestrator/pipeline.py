"""One job: planner → coder → tester → reviewer (looping) → delivery, checkpointed (SPEC §3).

The next stage is derived from the job's last checkpoint alone (``next_step``), so a job
resumed after a crash, a pause or a preemption carries on exactly where it stopped and a
completed stage is never run again.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path

import anyio

from . import prompts
from .agents.base import StageContext, StageResult
from .delivery import Delivery, auto_approves
from .errors import (
    AgentError,
    AgentOutputError,
    AgentStalled,
    ConflictMarkers,
    OpusError,
    WorkspaceError,
)
from .lifecycle import FINISHED, Outcome, Stage, Status, check_transition
from .models import Checkpoint, FeatureRequest, Feedback, Job, Usage
from .plans import PlanGate
from .reactions import Rounds, artifact_tag, rework_feedback
from .runtime import Control, Runtime
from .supervisor import with_retries
from .workspace import worktree_fingerprint

log = logging.getLogger(__name__)

Step = tuple[Stage, int]
BLOCK = "block"
FINISH = "finish"
PLAN_REVIEW = "plan-review"


MAX_PLAN = 256 * 1024
"""Characters of a plan kept: it goes into every later prompt and into a vault note, which
opus itself refuses to read past 1 MiB (SPEC §2.4)."""
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def plan_text(output: str, redact: Callable[[str], str] = str) -> str:
    """The planner's output as the plan: terminal escapes and control characters (a NUL,
    colour codes) taken out, then ``redact``-ed (a secret split by an escape is whole
    again by then), and no longer than ``MAX_PLAN`` (its start is kept)."""
    text = redact(_CONTROL.sub("", output))
    if len(text) > MAX_PLAN:
        cut = len(text) - MAX_PLAN
        text = text[:MAX_PLAN] + f"\n\n[… {cut} more characters of the planner's output cut]\n"
    return text


def next_step(job: Job, max_iterations: int) -> Step | str:
    """The stage to run next after the job's last checkpoint, or BLOCK / FINISH /
    PLAN_REVIEW (the plan waits for a person, SPEC §16)."""
    last = job.last
    if last is None:
        return (Stage.PLANNER, 1)
    if job.round > last.round:
        return (Stage.CODER, 1)  # a rework round starts with the coder (SPEC §15)
    if last.outcome is Outcome.ERROR:
        return FINISH
    if last.outcome is Outcome.REJECTED:
        if last.iteration >= max_iterations:
            return BLOCK
        return (Stage.CODER, last.iteration + 1)
    if last.stage is Stage.PLANNER:
        if job.plan_revision > last.iteration:
            return (Stage.PLANNER, job.plan_revision)  # a person asked for a new plan
        if job.plan_gate:
            return PLAN_REVIEW
    following = {
        Stage.PLANNER: (Stage.CODER, 1),
        Stage.CODER: (Stage.TESTER, last.iteration),
        Stage.TESTER: (Stage.REVIEWER, last.iteration),
        Stage.REVIEWER: (Stage.DELIVERY, last.iteration),
    }
    return following.get(last.stage, FINISH)


class Pipeline:
    """Runs one job from its last checkpoint to a resting status or a requested stop."""

    def __init__(self, rt: Runtime, job: Job, fr: FeatureRequest, control: Control) -> None:
        self.rt = rt
        self.job = job
        self.fr = fr
        self.control = control
        self.delivery = Delivery(rt)
        self.rounds = Rounds(rt)
        self.plans = PlanGate(rt)
        self.worktree: Path = rt.config.state_dir / "worktrees" / job.id
        self.head = ""
        """The worktree's HEAD as opus last left it (only the coder's commits move it)."""

    @property
    def max_iterations(self) -> int:
        return self.rt.config.pipeline.max_iterations

    async def run(self) -> Job:
        try:
            await self._steps()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._interrupted()
            raise
        await self.rt.show(self.job)  # what the last boundary left for the next write
        await self.rt.check_budget(self.job)  # alert_at for the last stage's spend, now
        return self.job

    async def _steps(self) -> None:
        job = self.job
        first = next_step(job, self.max_iterations)
        if isinstance(first, tuple) and self.control.stop is None:
            # say so in the note at once; the worktree takes a while
            job.status = check_transition(job.status, Status.IN_PROGRESS)
            job.stage, job.iteration = first
            await self.rt.record(job, "started")
        if not await self._prepare():
            return
        while True:
            step = next_step(job, self.max_iterations)
            if step == FINISH:
                await self._settle_finished()
                return
            if step == BLOCK:
                await self._block()
                return
            if step == PLAN_REVIEW:
                await self.plans.wait(job)
                return
            assert isinstance(step, tuple)
            if await self._should_stop(step):
                return
            await self._run_stage(*step)
            if job.status is not Status.IN_PROGRESS:
                return

    # -- the boundaries ---------------------------------------------------------------------

    async def _prepare(self) -> bool:
        """Create (or, on resume, reset) the worktree. False when the job failed."""
        job, ws = self.job, self.rt.workspace(self.job)
        try:
            if job.base_commit is None:
                reusable = await self._retire_earlier()
                created = await anyio.to_thread.run_sync(
                    lambda: ws.create(job.id, job.branch, reusable=reusable)
                )
                job.branch, job.base_commit = created.branch, created.base_commit
                self.worktree, self.head = created.path, created.base_commit
                await self.rt.record(job, "worktree", note=False, path=str(created.path))
            else:
                created = await anyio.to_thread.run_sync(ws.attach, job.id, job.branch)
                self.worktree, job.branch = created.path, created.branch
                last = job.last
                self.head = (last.commit if last and last.commit else None) or job.base_commit
                await anyio.to_thread.run_sync(ws.reset, self.worktree, self.head)
        except WorkspaceError as e:
            await self._finish(Status.FAILED, f"repository unusable: {e}", event="failed")
            return False
        return True

    async def _retire_earlier(self) -> set[str]:
        """A retry (SPEC §7): remove the worktrees the FR's finished jobs left, and return
        the commits they made, so the FR's branch still at one of them is reused (reset to
        the base) instead of a suffixed one. A branch a person committed to is kept."""
        job, ws = self.job, self.rt.workspace(self.job)
        earlier = [
            j
            for j in self.rt.registry.jobs()
            if j.fr_id == job.fr_id and j.id != job.id and j.status in FINISHED
        ]
        for old in earlier:
            path = self.rt.config.state_dir / "worktrees" / old.id
            if path.exists():
                try:
                    await anyio.to_thread.run_sync(ws.remove, path)
                except WorkspaceError as e:
                    log.warning("%s: could not remove worktree %s: %s", job.fr_id, path, e)
        return {c for j in earlier for c in (j.base_commit, *(cp.commit for cp in j.history)) if c}

    async def _should_stop(self, step: Step) -> bool:
        """Honour pause, preemption, shutdown and the budget before ``step`` starts.

        A job that stops here shows ``step`` as its stage: where it will resume.
        """
        reason = self.control.stop
        if reason in ("pause", "preempt") or reason is None:
            self.job.stage, self.job.iteration = step
        if reason == "pause":
            await self._set(Status.PAUSED, "paused")
            log.info("%s: paused at %s (job %s)", self.job.fr_id, self.job.stage, self.job.id)
            return True
        if reason == "preempt":
            await self._set(Status.QUEUED, "preempted")
            log.info("%s: yields its slot (job %s)", self.job.fr_id, self.job.id)
            return True
        if reason in ("shutdown", "cancel"):
            return True
        if step[0] is Stage.DELIVERY:
            return False  # delivery spends nothing: never held back by the budget
        why = await self.rt.check_budget(self.job)
        if why:
            await self._set(Status.QUEUED, "budget")
            log.warning("%s: waits: %s (job %s)", self.job.fr_id, why, self.job.id)
            return True
        held = self.rt.executor_holds(step[0])
        if held:  # the cluster is away: wait queued, fail nothing (SPEC §18)
            self.job.error = f"waiting: {held}"
            await self._set(Status.QUEUED, "waiting")
            log.warning("%s: waits: %s (job %s)", self.job.fr_id, held, self.job.id)
            return True
        return False

    async def _set(self, status: Status, event: str) -> None:
        self.job.status = check_transition(self.job.status, status)
        await self.rt.record(self.job, event)

    async def _interrupted(self) -> None:
        """Cancelled mid-stage: by a person (→ cancelled) or by shutdown (→ resumable)."""
        job = self.job
        job.pgids = []
        if job.status in FINISHED or job.status is Status.REVIEW:
            return  # it ended just before the cancel landed
        if self.control.stop == "cancel":
            await self._finish(Status.CANCELLED, None, event="cancelled")
            await self._remove_worktree()
        else:
            await self.rt.record(job, "interrupted", note=False)
        log.info("%s: interrupted (%s) in %s", job.fr_id, self.control.stop or "cancel", job.stage)

    # -- one stage ----------------------------------------------------------------------------

    async def _run_stage(self, stage: Stage, iteration: int) -> None:
        job, rt = self.job, self.rt
        job.status = check_transition(job.status, Status.IN_PROGRESS)
        job.stage, job.iteration, job.error = stage, iteration, None
        # the stage's start and its files (prompt, feedback; the worktree's fingerprint) in
        # one hand-off; a stage that does not start after all rewrites them when it does
        on_disk, prepared = await rt.record_then(
            job,
            "stage_started",
            (lambda: None)
            if stage is Stage.DELIVERY
            else partial(self._prepare_stage, stage, iteration),
            stage=stage.value,
            iteration=iteration,
        )
        if on_disk is Status.CANCELLED:
            self.control.request("cancel")
            await anyio.lowlevel.checkpoint()  # a person's cancel lands here
        elif on_disk is Status.PAUSED:
            self.control.request("pause")
        if await self._should_stop((stage, iteration)):
            return
        log.info("%s: %s, iteration %d (job %s)", job.fr_id, stage, iteration, job.id)
        started = rt.now()
        if stage is Stage.DELIVERY:
            await self._deliver(started)
            return
        head_before = self.head
        assert prepared is not None
        ctx, before = prepared
        try:
            result, attempts = await self._call_agent(ctx, head_before)
        except AgentError as e:
            await self._stage_failed(stage, iteration, started, e)
            return
        for key, value in result.meta.items():
            job.agent_versions[f"{stage}.{key}"] = value
        if result.usage is not None:
            job.usage = job.usage + result.usage
        # what the stage leaves on disk goes in the checkpoint's hand-off, before its record
        files: list[Callable[[], object]] = []
        if stage is not Stage.CODER:
            files.append(partial(self._drop_changes, before, head_before))
        outcome, artifact = await self._judge(stage, iteration, result, head_before, files)
        await self._checkpoint(
            stage, iteration, outcome, started, attempts, artifact, result, files=files
        )

    def _drop_changes(self, before: object, head: str) -> None:
        """Only the coder changes the branch: reset what a planner, tester or reviewer left
        in the worktree (in a worker thread)."""
        if before != worktree_fingerprint(self.worktree):
            self.rt.workspace(self.job).reset(self.worktree, head)

    async def _call_agent(self, ctx: StageContext, head: str) -> tuple[StageResult, int]:
        """The stage's agent, retried on retryable errors from a clean worktree. What failed
        attempts spent is added to the result's usage (or to the final error's)."""
        job, rt, stage = self.job, self.rt, ctx.stage
        agent = rt.agents[stage]
        failed = Usage()

        async def attempt(n: int) -> StageResult:
            nonlocal failed
            if n > 1 and self.control.stop == "shutdown" and self.control.scope is not None:
                # stopping: no new attempt in the grace; the stage runs again on the next start
                log.info("%s: %s not retried: opus is stopping", job.fr_id, stage)
                self.control.scope.cancel()
                await anyio.lowlevel.checkpoint()
            if n > 1:
                await anyio.to_thread.run_sync(rt.workspace(job).reset, self.worktree, head)
                ctx.output_file.unlink(missing_ok=True)
            if stage is Stage.CODER:  # a conflict round: the base comes in first
                await self.rounds.prepare_coder(job, self.worktree, head)
            try:
                result = await agent.run(ctx)
                if stage is Stage.PLANNER and not (result.output or "").strip():
                    # as a reviewer without a verdict: a failed attempt, never an empty plan
                    empty = AgentOutputError("planner gave no plan (no output file, no output)")
                    empty.usage = result.usage
                    raise empty
                return result
            except AgentError as e:
                failed = failed + (e.usage or Usage())
                if isinstance(e, AgentStalled):
                    await rt.notify("stuck", job, f"{stage} stalled (attempt {n}): {e}")
                raise
            finally:
                if rt.redactor:  # (nothing to hide: no hand-off)
                    await anyio.to_thread.run_sync(self._scrub, ctx.output_file)

        def retrying(n: int, e: AgentError, delay: float) -> None:
            log.warning("%s: %s attempt %d failed (%s); retrying in %.1f s",
                        job.fr_id, stage, n, rt.redactor(str(e)), delay)  # fmt: skip

        try:
            result, attempts = await with_retries(
                attempt, retries=rt.config.pipeline.retries, on_retry=retrying
            )
        except AgentError as e:
            e.usage = failed
            raise
        if failed:
            result.usage = (result.usage or Usage()) + failed
        return result, attempts

    async def _stage_failed(
        self, stage: Stage, iteration: int, started: datetime, e: AgentError
    ) -> None:
        """The agent kept failing: an ``error`` checkpoint, then failed (stalled: blocked)."""
        job = self.job
        spent: Usage | None = e.usage or None
        if spent:
            job.usage = job.usage + spent
        attempts = getattr(e, "attempts", 1)
        result = StageResult(usage=spent) if spent else None
        log_name = await self._log_artifact(stage, artifact_tag(job.round, iteration))
        await self._checkpoint(
            stage, iteration, Outcome.ERROR, started, attempts, log_name, result, error=str(e)
        )
        if isinstance(e, AgentStalled):
            await self._finish(Status.BLOCKED, f"{stage} stalled repeatedly: {e}", "blocked")
        else:
            await self._finish(Status.FAILED, f"{stage} failed: {e}", "failed")

    def _prepare_stage(self, stage: Stage, iteration: int) -> tuple[StageContext, object]:
        """The stage's context, and the worktree's fingerprint before it runs: every file
        read and written for it (in a worker thread)."""
        job, rt = self.job, self.rt
        before = worktree_fingerprint(self.worktree)
        folder = rt.registry.job_dir(job.id)
        plan = rt.registry.read_artifact(job.id, "plan.md")
        # OPUS_FEEDBACK_FILE for every stage from iteration 2, and in a rework round
        feedback = job.feedback if iteration > 1 or job.round > 1 else None
        tag = artifact_tag(job.round, iteration)
        diff = ""
        if stage is Stage.REVIEWER:
            assert job.base_commit is not None
            diff = rt.workspace(job).diff(self.worktree, job.base_commit)
        prompt = rt.redactor(
            prompts.render(
                stage,
                self.fr,
                iteration=iteration,
                plan=plan,
                feedback=feedback,
                base_commit=job.base_commit or "",
                diff=diff,
                rework=rework_feedback(job),
                plan_feedback=job.plan_feedback if stage is Stage.PLANNER else None,
            )
        )
        # rebuilt on a rerun: no fsync needed
        prompt_file = rt.registry.write_artifact(
            job.id, f"prompt-{stage}-{tag}.md", prompt, sync=False
        )
        feedback_file = None
        if feedback is not None:
            feedback_file = rt.registry.write_artifact(
                job.id, f"feedback-{tag}.json", feedback.model_dump_json(indent=2)
            )
        output_file = folder / f"output-{stage}-{tag}"
        output_file.unlink(missing_ok=True)
        agent_cfg = rt.config.agents.for_stage(stage)
        ctx = StageContext(
            stage=stage,
            iteration=iteration,
            job_id=job.id,
            fr=self.fr,
            worktree=self.worktree,
            artifacts=folder,
            prompt=prompt,
            prompt_file=prompt_file,
            output_file=output_file,
            log_file=folder / f"{stage}-{tag}.log",
            base_commit=job.base_commit or "",
            plan=plan,
            round=job.round,
            feedback=feedback,
            feedback_file=feedback_file,
            timeout=agent_cfg.timeout or rt.config.pipeline.stage_timeout,
            stall_timeout=rt.config.pipeline.stall_timeout,
            redactor=rt.redactor,
            on_spawn=self._spawned,
            on_exit=self._exited,
            sandbox=rt.sandbox,
        )
        return ctx, before

    def _scrub(self, path: Path) -> None:
        """Redact secrets from what an agent left in the artifact folder."""
        if not self.rt.redactor:
            return
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        clean = self.rt.redactor(text)
        if clean != text:
            self.rt.registry.write_artifact(self.job.id, path.name, clean)

    def _spawned(self, pgid: int) -> None:
        self.job.pgids = [*self.job.pgids, pgid]
        self.rt.registry.save(self.job, "spawned", sync=False, pgid=pgid)

    def _exited(self, pgid: int) -> None:
        self.job.pgids = [p for p in self.job.pgids if p != pgid]

    async def _judge(
        self,
        stage: Stage,
        iteration: int,
        result: StageResult,
        head_before: str,
        files: list[Callable[[], object]],
    ) -> tuple[Outcome, str | None]:
        """Turn an agent's result into the checkpoint's outcome (and the next feedback);
        the artifacts to write go to ``files``, written in the checkpoint's hand-off."""
        job, rt = self.job, self.rt
        write = rt.registry.write_artifact
        tag = artifact_tag(job.round, iteration)
        if stage is Stage.PLANNER:
            plan = plan_text(result.output, rt.redactor)
            files.append(partial(write, job.id, "plan.md", plan))
            files.extend(self.plans.planned(job, self.fr, plan))  # the plan note (SPEC §16)
            return Outcome.OK, "plan.md"
        if stage is Stage.CODER:
            if not result.passed:
                return await self._coder_rejected(
                    tag,
                    "patch_failed",
                    iteration,
                    f"The coder's change could not be applied: {result.output}",
                )
            where = f"round {job.round}, iteration {iteration}" if job.round > 1 else None
            message = f"opus({job.fr_id}): coder, {where or f'iteration {iteration}'}"
            try:
                commit = await anyio.to_thread.run_sync(
                    lambda: rt.workspace(job).commit_all(
                        self.worktree, message, since=head_before, branch=job.branch
                    )
                )
            except ConflictMarkers as e:
                return await self._coder_rejected(
                    tag,
                    "conflict_markers",
                    iteration,
                    f"Nothing was committed: {e}. Resolve those conflicts and remove every "
                    "marker line.",
                )
            if commit is None:
                return await self._coder_rejected(
                    tag, "no_changes", iteration, "The coder changed nothing in the working tree."
                )
            self.head = commit
            return Outcome.OK, f"coder-{tag}.log"
        if stage is Stage.TESTER:
            if result.passed:
                return Outcome.OK, f"tester-{tag}.log"
            outcome, _ = self._reject(
                "tests_failed",
                iteration,
                "The tests failed.",
                test_output=rt.redactor(result.output),
            )
            return outcome, f"tester-{tag}.log"
        verdict = result.verdict
        assert verdict is not None, "the reviewer returned no verdict"
        name = f"review-{tag}.json"
        files.append(partial(write, job.id, name, rt.redactor(verdict.model_dump_json(indent=2))))
        if verdict.verdict == "approve":
            job.confidence = verdict.confidence
            return Outcome.OK, name
        self._reject(
            "changes_requested",
            iteration,
            verdict.summary or "The reviewer requested changes.",
            issues=verdict.issues,
        )
        return Outcome.REJECTED, name

    async def _coder_rejected(
        self, tag: str, reason: str, iteration: int, message: str
    ) -> tuple[Outcome, str | None]:
        """A rejected coder iteration; its log is the checkpoint's artifact, if it has one."""
        outcome, _ = self._reject(reason, iteration, message)
        return outcome, await self._log_artifact(Stage.CODER, tag)

    async def _log_artifact(self, stage: Stage, tag: str) -> str | None:
        """``<stage>-<tag>.log`` when the stage's agent left one (a process's output)."""
        name = f"{stage}-{tag}.log"
        path = self.rt.registry.job_dir(self.job.id) / name
        return name if await anyio.to_thread.run_sync(path.exists) else None

    def _reject(
        self, reason: str, iteration: int, message: str, **more: object
    ) -> tuple[Outcome, str | None]:
        feedback = Feedback.model_validate(
            {"iteration": iteration, "reason": reason, "message": message, **more}
            | {"round": self.job.round}
        )
        self.job.feedback = Feedback.model_validate_json(
            self.rt.redactor(feedback.model_dump_json())
        )
        return Outcome.REJECTED, None

    async def _checkpoint(
        self,
        stage: Stage,
        iteration: int,
        outcome: Outcome,
        started: datetime,
        attempts: int,
        artifact: str | None,
        result: StageResult | None = None,
        *,
        error: str | None = None,
        files: Sequence[Callable[[], object]] = (),
    ) -> None:
        """Add the stage's checkpoint and record it, ``files`` written first (one hand-off)."""
        job, rt = self.job, self.rt
        earlier = job.history
        job.history = [
            *earlier,
            Checkpoint(
                stage=stage,
                iteration=iteration,
                outcome=outcome,
                started_at=started,
                finished_at=rt.now(),
                commit=self.head,
                attempts=attempts,
                artifact=artifact,
                usage=result.usage if result else None,
                error=rt.redactor(error) if error else None,
                round=job.round,
            ),
        ]
        try:
            # the note shows the stage that comes next, written as it starts (or as the job
            # stops)
            await rt.record(
                job,
                "checkpoint",
                note=False,
                first=files,
                stage=stage.value,
                iteration=iteration,
                outcome=outcome.value,
            )
        except Exception:  # (a plan note's OSError too; a cancel lands after the record)
            job.history = earlier  # not recorded: whatever records the job next must not show it
            raise

    # -- endings ------------------------------------------------------------------------------

    async def _deliver(self, started: datetime) -> None:
        job = self.job
        trigger = await self.rounds.conflict(job)
        if trigger is not None:  # the base moved under the branch: a round resolves it
            await self.rounds.start(job, trigger)
            return
        try:
            status, error = await self.delivery.deliver(job, self.fr, self.worktree)
        except OpusError as e:
            await self._checkpoint(
                Stage.DELIVERY, job.iteration, Outcome.ERROR, started, 1, None, error=str(e)
            )
            await self._finish(Status.FAILED, f"delivery failed: {e}", "failed")
            return
        await self._checkpoint(Stage.DELIVERY, job.iteration, Outcome.OK, started, 1, "pr.md")
        await self._finish(status, error, status.value)
        if status is Status.DONE:
            await self._remove_worktree()

    async def _settle_finished(self) -> None:
        """The last checkpoint ended the pipeline but the job is not at rest (opus died
        between that checkpoint and the ending): end it as the checkpoint says."""
        job, last = self.job, self.job.last
        if job.status not in (Status.QUEUED, Status.IN_PROGRESS) or last is None:
            return
        if last.outcome is Outcome.ERROR:
            await self._finish(Status.FAILED, f"{last.stage} failed: {last.error}", "failed")
        elif last.stage is Stage.DELIVERY:
            job.status = check_transition(job.status, Status.IN_PROGRESS)
            status, error = Status.REVIEW, None
            if auto_approves(self.rt.config, self.fr, job.confidence):
                status, error = await self.delivery.merge(job)  # a no-op if merged already
            await self._finish(status, error, status.value)
            if status is Status.DONE:
                await self._remove_worktree()

    async def _block(self) -> None:
        feedback = self.job.feedback
        reason = feedback.message if feedback else "the reviewer never approved"
        why = {
            "tests_failed": "tests still failing",
            "changes_requested": "reviewer still requests changes",
            "no_changes": "the coder changed nothing",
            "patch_failed": "the coder's patch did not apply",
            "conflict_markers": "conflict markers still left",
        }.get(feedback.reason if feedback else "", "not approved")
        error = f"{why} after {self.max_iterations} iterations: {reason}"
        details: dict[str, str] = {}
        if feedback is not None:
            tests = feedback.test_output or await self._last_test_output()
            details["test_output"] = tests[-4000:]
            details["review_issues"] = json.dumps(
                [i.model_dump(exclude_none=True) for i in feedback.issues]
            )
        await self._finish(Status.BLOCKED, error.splitlines()[0][:300], "blocked", **details)

    async def _last_test_output(self) -> str:
        """The last tester run's log (its tests passed; the reviewer still asked for changes):
        the other side of a block (SPEC §3)."""
        runs = [c for c in self.job.history if c.stage is Stage.TESTER and c.artifact]
        if not runs or runs[-1].artifact is None:
            return ""
        path = self.rt.registry.job_dir(self.job.id) / runs[-1].artifact

        def tail() -> str:
            try:
                with open(path, "rb") as f:
                    f.seek(max(0, f.seek(0, os.SEEK_END) - 8000))
                    return self.rt.redactor(f.read().decode("utf-8", "replace"))
            except OSError:
                return ""

        return await anyio.to_thread.run_sync(tail)

    async def _finish(self, status: Status, error: str | None, event: str, **details: str) -> None:
        job = self.job
        job.status = check_transition(job.status, status)
        job.error = self.rt.redactor(error.splitlines()[0][:500]) if error else None
        job.pgids = []
        await self.rt.record(job, event)
        level = logging.WARNING if status in (Status.FAILED, Status.BLOCKED) else logging.INFO
        log.log(
            level, "%s: %s%s (job %s)", job.fr_id, status, f": {job.error}" if error else "", job.id
        )
        if status.value in ("review", "done", "failed", "blocked"):
            message = job.error or (
                f"ready for review: {job.pr_url or job.branch}"
                if status is Status.REVIEW
                else f"merged {job.branch}"
            )
            await self.rt.notify(status.value, job, message, **details)

    async def _remove_worktree(self) -> None:
        try:
            await anyio.to_thread.run_sync(self.rt.workspace(self.job).remove, self.worktree)
        except WorkspaceError as e:
            log.warning("%s: could not remove worktree: %s", self.job.fr_id, e)
        if self.rt.sandbox is not None:  # the job's private HOME goes with its worktree
            await anyio.to_thread.run_sync(self.rt.sandbox.discard, self.job.id)

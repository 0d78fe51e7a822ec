"""What starts a rework round (SPEC §15): a person's feedback, PR reviews, CI, conflicts.

After the first delivery an FR rests in ``review``; a **rework round** runs the coder →
tester → reviewer loop again on the same branch and worktree, with the round's feedback as
the coder's first input, delivers again and returns to ``review``.

The seam
--------
Whatever notices a reason for rework builds a ``Trigger`` and hands it to
``Rounds.start``::

    trigger = Trigger(source="github-review", feedback=markdown, keys=("review:123",))
    status = await Rounds(rt).start(job, trigger)

- ``source`` says who asked: ``person`` (a note's ``changes-requested`` + ``feedback``),
  ``github-review`` / ``github-comment`` (a PR review or review comments), ``ci`` (a failing
  check run or commit status), ``conflict`` (the branch no longer merges into the base).
- ``feedback`` is markdown for the coder: it becomes the first iteration's
  ``OPUS_FEEDBACK_FILE`` (``reason: "rework"``) and a section of every coder prompt of the
  round.
- ``keys`` are the stable ids the trigger consumes (a review's id, each comment's id, a
  check run's id and head sha …). They are stored with the job in the registry
  (``Job.reacted``), so a trigger whose keys were all acted on already is ignored, also
  after a restart: ``start`` returns None then and changes nothing.

``start`` takes a job in ``review`` or ``approved`` (back to ``queued``: the scheduler
gives it a slot, the pipeline resumes in the new round), or ``in-progress`` at its
delivery (a conflict found before delivering: the running pipeline carries on in the new
round). It records the round (``round`` event, the ``round`` key in the note, a
``trigger-r<N>.md`` artifact) before anything runs, so a crash resumes in that round.
A trigger that would start round ``[reactions] max_rounds + 1`` makes the job ``blocked``
with the trigger in ``error`` and notifies the person (``blocked`` event).

"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio

from .errors import WorkspaceError
from .lifecycle import Stage, Status, check_transition
from .models import Feedback, Job, Round

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ("Rounds", "Source", "Trigger", "artifact_tag", "rework_feedback")

log = logging.getLogger(__name__)

Source = Literal["person", "github-review", "github-comment", "ci", "conflict"]

#: Job statuses a round may start from.
STARTS_FROM = frozenset({Status.REVIEW, Status.APPROVED, Status.IN_PROGRESS})


@dataclass(frozen=True)
class Trigger:
    """One reason for a rework round (see the module docstring)."""

    source: Source
    feedback: str
    """Markdown for the coder."""
    keys: tuple[str, ...] = ()
    """Stable ids this trigger consumes (for dedupe across polls and restarts)."""
    base: str | None = None
    """For ``conflict``: the base commit to bring into the branch (``conflict`` builds it)."""

    @property
    def summary(self) -> str:
        """One line for ``error`` and logs."""
        first = next(
            (ln.strip("# ").strip() for ln in self.feedback.splitlines() if ln.strip()), ""
        )
        return f"{self.source}: {first}"[:300]


def artifact_tag(round_: int, iteration: int) -> str:
    """The suffix of a stage's artifacts: ``2`` in round 1, ``r2-1`` in round 2."""
    return str(iteration) if round_ <= 1 else f"r{round_}-{iteration}"


class Rounds:
    """Starts rework rounds for jobs (the one door every trigger goes through)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def start(self, job: Job, trigger: Trigger, *, answer: bool = False) -> Status | None:
        """Start the job's next round from ``trigger``; return the job's new status
        (``queued``, ``in-progress`` or ``blocked`` when ``max_rounds`` is used up), or None
        when the trigger was acted on already (every key known) and nothing changed.
        ``answer``: the round answers the person's status in the note (their
        ``changes-requested``, or the ``approved`` that found the conflict); a round from
        anything else leaves a person's status there to be acted on when it rests."""
        rt = self.rt
        if job.status not in STARTS_FROM:
            raise ValueError(f"{job.fr_id}: a round cannot start from {job.status}")
        if trigger.keys and set(trigger.keys) <= set(job.reacted):
            log.debug("%s: %s already acted on", job.fr_id, trigger.summary)
            return None
        job.reacted = [*job.reacted, *(k for k in trigger.keys if k not in job.reacted)]
        feedback = rt.redactor(trigger.feedback.strip() or "(no text given)")
        number = job.round + 1
        cap = rt.config.reactions.max_rounds
        if number > cap:
            job.status = check_transition(job.status, Status.BLOCKED)
            job.stage = None
            job.error = rt.redactor(f"max_rounds ({cap}) used up; {trigger.summary}")
            await rt.record(job, "blocked", answer=True, source=trigger.source)
            log.warning("%s: blocked: %s (job %s)", job.fr_id, job.error, job.id)
            await rt.notify("blocked", job, job.error, feedback=feedback)
            return job.status
        await anyio.to_thread.run_sync(
            rt.registry.write_artifact, job.id, f"trigger-r{number}.md", feedback
        )
        job.round = number
        job.rounds = [
            *job.rounds,
            Round(
                round=number,
                source=trigger.source,
                feedback=feedback,
                started_at=rt.now(),
                base=trigger.base,
            ),
        ]
        if trigger.base is not None:
            job.base_commit = trigger.base  # what the round's diffs are against
        job.feedback = Feedback(
            iteration=0, reason="rework", message=feedback, round=number, source=trigger.source
        )
        if job.status is not Status.IN_PROGRESS:
            job.status = check_transition(job.status, Status.QUEUED)
        job.stage, job.iteration, job.error = Stage.CODER, 1, None
        await rt.record(job, "round", answer=answer, round=number, source=trigger.source)
        log.info("%s: round %d (%s) (job %s)", job.fr_id, number, trigger.summary, job.id)
        return job.status

    async def conflict(self, job: Job) -> Trigger | None:
        """A ``conflict`` trigger when the job's branch no longer merges cleanly into the
        base (SPEC §7), with the conflicting paths as the coder's feedback; else None."""
        ws, d = self.rt.workspace(job), self.rt.config.delivery
        # a PR merges into the base as the remote has it: fetched now (the local one may lag)
        remote = d.remote if d.kind == "github" else None
        token = self.rt.environ.get(d.token_env) if remote else None

        def check() -> tuple[list[str], str]:
            ref = ws.fetch_base(remote, token) if remote else None
            paths = ws.conflicts_with_base(job.branch, forked_from=job.base_commit, base_ref=ref)
            return paths, (ws.base_commit(ref) if paths else "")

        try:
            paths, target = await anyio.to_thread.run_sync(check)
        except WorkspaceError as e:  # the merge or delivery that follows reports it
            log.warning("%s: cannot check for conflicts: %s", job.fr_id, e)
            return None
        if not paths:
            return None
        base = f"{remote}/{ws.base}" if remote else ws.base
        how = "rebased onto" if self.rt.config.reactions.update == "rebase" else "merged"
        listed = "\n".join(f"- `{p}`" for p in paths)
        feedback = (
            f"The branch no longer merges cleanly into `{base}` (now at {target[:12]}): "
            f"conflicts in {', '.join(paths)}.\n\n"
            f"opus {how} `{base}` into this worktree and left the conflicts in place:\n\n"
            f"{listed}\n\n"
            "Resolve every conflict: keep the intent of both sides, remove every conflict "
            "marker (`<<<<<<<`, `=======`, `>>>>>>>`), and keep the tests passing. opus "
            "refuses to commit a file that still holds a marker."
        )
        return Trigger(source="conflict", feedback=feedback, keys=(), base=target)

    async def prepare_coder(self, job: Job, worktree: Path, head: str) -> None:
        """Before a coder attempt in a conflict round: if ``head`` lacks the round's base
        commit, bring it in (conflicts left in place). Idempotent, so a retried attempt or
        a resumed round starts from the same state."""
        last = job.rounds[-1] if job.round > 1 and job.rounds else None
        if last is None or last.round != job.round or last.base is None:
            return
        ws, base = self.rt.workspace(job), last.base
        if await anyio.to_thread.run_sync(ws.contains, head, base):
            return
        mode = self.rt.config.reactions.update
        paths = await anyio.to_thread.run_sync(
            lambda: ws.bring_base_in(worktree, base, since=head, mode=mode)
        )
        log.info(
            "%s: brought %s into the worktree (%s): %s",
            job.fr_id,
            base[:12],
            mode,
            f"conflicts in {', '.join(paths)}" if paths else "no conflict",
        )


def rework_feedback(job: Job) -> Feedback | None:
    """The current round's request, for every coder prompt of the round (None in round 1)."""
    if job.round <= 1 or not job.rounds:
        return None
    last = job.rounds[-1]
    return Feedback(
        iteration=0, reason="rework", message=last.feedback, round=last.round, source=last.source
    )

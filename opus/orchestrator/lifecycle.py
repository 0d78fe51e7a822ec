"""The states an FR and its job move through, and the one table of legal moves."""

from __future__ import annotations

from enum import StrEnum

from .errors import IllegalTransition


class Status(StrEnum):
    """An FR's ``status`` in its note, and its job's status in the registry."""

    PLANNED = "planned"
    """Eligible: a person put it (back) into the planned folder."""
    QUEUED = "queued"
    """Accepted; waiting for a free slot, a dependency or the budget."""
    IN_PROGRESS = "in-progress"
    """A pipeline is running; ``stage`` and ``iteration`` say where."""
    REVIEW = "review"
    """Delivered; the branch or PR waits for a human."""
    APPROVED = "approved"
    """A person approved: opus merges, then ``done``."""
    DONE = "done"
    """Merged into the base branch."""
    FAILED = "failed"
    """Could not be done; ``error`` says why."""
    BLOCKED = "blocked"
    """Needs a human: iterations used up, a stall, or a merge conflict."""
    PAUSED = "paused"
    """A person paused it; the checkpoint is kept."""
    CANCELLED = "cancelled"
    """A person cancelled it; the branch is kept."""
    PLAN_REVIEW = "plan-review"
    """The plan waits for a person (SPEC §16): ``approved`` lets the coder start."""
    CHANGES_REQUESTED = "changes-requested"
    """A person's request (with ``feedback``): a rework round, or a new plan. Only a note
    holds it; the job answers it by going back to the queue."""

    @classmethod
    def parse(cls, value: object) -> Status | None:
        """A status as written by a person: any case; None when missing or unknown."""
        if value is None:
            return None
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            return None


class Stage(StrEnum):
    """Where a running pipeline is."""

    PLANNER = "planner"
    """Writes the plan."""
    CODER = "coder"
    """Changes the worktree."""
    TESTER = "tester"
    """Runs the test suite."""
    REVIEWER = "reviewer"
    """Reviews the diff; returns a verdict."""
    DELIVERY = "delivery"
    """Keeps the branch or pushes it and opens a pull request."""


class Outcome(StrEnum):
    """How a stage ended, as recorded in a checkpoint."""

    OK = "ok"
    """The stage succeeded (the reviewer: approved)."""
    REJECTED = "rejected"
    """Tests failed, changes were requested, or the coder changed nothing."""
    ERROR = "error"
    """The stage failed."""


#: Statuses at which an FR rests: nothing runs until a person or a merge moves it.
RESTING = frozenset(
    {
        Status.REVIEW,
        Status.PLAN_REVIEW,
        Status.DONE,
        Status.FAILED,
        Status.BLOCKED,
        Status.PAUSED,
        Status.CANCELLED,
    }
)
#: Statuses that end a job for good; a new attempt is a new job.
FINISHED = frozenset({Status.DONE, Status.FAILED, Status.BLOCKED, Status.CANCELLED})
#: Statuses during which the note carries ``stage``.
WITH_STAGE = frozenset({Status.QUEUED, Status.IN_PROGRESS, Status.PAUSED})

_S = Status
TRANSITIONS: dict[Status, frozenset[Status]] = {
    _S.PLANNED: frozenset({_S.QUEUED, _S.FAILED, _S.CANCELLED, _S.PAUSED}),
    _S.QUEUED: frozenset(
        {_S.IN_PROGRESS, _S.PLAN_REVIEW, _S.PAUSED, _S.CANCELLED, _S.FAILED, _S.BLOCKED}
    ),
    _S.IN_PROGRESS: frozenset(
        {
            _S.QUEUED,
            _S.REVIEW,
            _S.PLAN_REVIEW,
            _S.DONE,
            _S.FAILED,
            _S.BLOCKED,
            _S.PAUSED,
            _S.CANCELLED,
        }
    ),
    # a rework round (SPEC §15) takes a job in review back to the queue
    _S.REVIEW: frozenset({_S.APPROVED, _S.QUEUED, _S.DONE, _S.CANCELLED, _S.BLOCKED, _S.FAILED}),
    _S.APPROVED: frozenset({_S.DONE, _S.QUEUED, _S.BLOCKED, _S.FAILED, _S.CANCELLED}),
    _S.PLAN_REVIEW: frozenset({_S.QUEUED, _S.CANCELLED, _S.FAILED, _S.BLOCKED}),
    _S.PAUSED: frozenset({_S.QUEUED, _S.CANCELLED, _S.FAILED}),
    _S.DONE: frozenset(),
    _S.FAILED: frozenset(),
    # a merge refused for a reason outside the branch: `approved` retries the merge (SPEC §7)
    _S.BLOCKED: frozenset({_S.APPROVED}),
    _S.CANCELLED: frozenset(),
    _S.CHANGES_REQUESTED: frozenset(),
}


def can_transition(old: Status, new: Status) -> bool:
    return old == new or new in TRANSITIONS[old]


def check_transition(old: Status, new: Status) -> Status:
    """Return ``new`` if a job may move from ``old`` to it, else raise IllegalTransition."""
    if not can_transition(old, new):
        raise IllegalTransition(f"a job cannot go from {old} to {new}")
    return new

"""The records opus reads and keeps: feature requests, jobs, checkpoints, verdicts, usage."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .lifecycle import Outcome, Stage, Status


class Priority(StrEnum):
    """An FR's priority; ``rank`` orders them, critical first."""

    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @classmethod
    def parse(cls, value: object) -> Priority:
        """Accept ``critical``…``low`` (any case), ``P0``–``P3``, ``0``–``3``; else ValueError."""
        if isinstance(value, bool):
            raise ValueError(f"unknown priority {value!r}")
        if isinstance(value, int):
            if 0 <= value <= 3:
                return _BY_RANK[value]
            raise ValueError(f"unknown priority {value!r}")
        text = str(value).strip().lower()
        if text in _BY_NAME:
            return _BY_NAME[text]
        match = re.fullmatch(r"p?([0-3])", text)
        if match:
            return _BY_RANK[int(match.group(1))]
        raise ValueError(
            f"unknown priority {value!r} (use critical, high, medium, low, P0–P3 or 0–3)"
        )


_RANK = {Priority.CRITICAL: 0, Priority.HIGH: 1, Priority.MEDIUM: 2, Priority.LOW: 3}
_BY_RANK = {rank: p for p, rank in _RANK.items()}
_BY_NAME = {p.value: p for p in Priority}


def slug(text: str) -> str:
    """A branch-safe slug of an FR id: ``FR-101`` → ``fr-101``."""
    s = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.")
    s = re.sub(r"\.{2,}", ".", s)
    return s.removesuffix(".lock") or "fr"


class FeatureRequest(BaseModel):
    """A note in the planned folder, as the person wrote it."""

    model_config = ConfigDict(frozen=True)

    id: str
    title: str
    path: Path
    """Absolute path of the note."""
    body: str
    priority: Priority = Priority.MEDIUM
    repo: str | None = None
    """The repository's name in ``[repos.NAME]``; None means the default one."""
    depends_on: tuple[str, ...] = ()
    approval: Literal["manual", "auto"] | None = None
    status: Status | None = None
    """The note's status as opus reads it (a person's unknown value reads as ``planned``)."""
    job_id: str | None = None
    stage: Stage | None = None
    iteration: int | None = None
    error: str | None = None
    feedback: str | None = None
    """A person's text for a rework round or a new plan (SPEC §15, §16)."""
    plan_approval: bool | None = None
    """Overrides ``[approval] plan`` for this FR."""
    invalid: tuple[str, str] | None = None
    """``(key, problem)`` when a person's key holds a bad value: the FR must fail."""
    problems: tuple[tuple[str, str], ...] = ()
    """Every ``(key, problem)`` of the note (``invalid`` is the first)."""
    aliases: tuple[str, ...] = ()
    """The note's ``aliases`` (Obsidian's): other names ``opus show`` and friends accept."""


class Usage(BaseModel):
    """Tokens and cost of one stage, or summed over a job."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    cost_estimated: bool = False
    """True when opus computed the cost from prices instead of the backend reporting it."""

    def __bool__(self) -> bool:
        """Whether anything was spent."""
        return bool(self.input_tokens or self.output_tokens or self.cost_usd)

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cost_usd=round(self.cost_usd + other.cost_usd, 6),
            cost_estimated=self.cost_estimated or other.cost_estimated,
        )


class Issue(BaseModel):
    severity: Literal["blocker", "major", "minor", "nit"] = "major"
    message: str
    file: str | None = None
    line: int | None = None


class Verdict(BaseModel):
    """The reviewer's answer (SPEC §5.3)."""

    verdict: Literal["approve", "request_changes"]
    confidence: int = Field(default=0, ge=0, le=100)
    summary: str = ""
    issues: list[Issue] = Field(default_factory=list)


class Feedback(BaseModel):
    """What the coder is told at the start of the next iteration."""

    iteration: int
    """The iteration that produced it."""
    reason: Literal[
        "tests_failed",
        "changes_requested",
        "no_changes",
        "patch_failed",
        "conflict_markers",
        "rework",
    ]
    message: str
    round: int = 1
    source: str | None = None
    """For ``rework``: what started the round (a reactions.Trigger's source)."""
    test_output: str = ""
    issues: list[Issue] = Field(default_factory=list)


class Checkpoint(BaseModel):
    """One finished stage of a job."""

    stage: Stage
    iteration: int
    outcome: Outcome
    started_at: datetime
    finished_at: datetime
    commit: str | None = None
    """The worktree's HEAD when the stage ended."""
    attempts: int = 1
    artifact: str | None = None
    """File name in the job's artifact folder."""
    usage: Usage | None = None
    error: str | None = None
    round: int = 1
    """The rework round it belongs to (SPEC §15)."""


class Round(BaseModel):
    """One rework round: its number and what started it."""

    round: int
    source: str
    feedback: str
    started_at: datetime
    base: str | None = None
    """For a conflict round: the base commit brought into the branch."""


class Job(BaseModel):
    """One attempt to carry an FR through the pipeline (mutable; saved by the registry)."""

    model_config = ConfigDict(validate_assignment=True)

    id: str
    fr_id: str
    fr_path: str
    """Relative to the vault."""
    title: str
    priority: Priority
    status: Status
    stage: Stage | None = None
    iteration: int = 1
    repo: str
    branch: str
    base_commit: str | None = None
    created_at: datetime
    updated_at: datetime
    error: str | None = None
    pr_url: str | None = None
    pr_number: int | None = None
    usage: Usage = Field(default_factory=Usage)
    history: list[Checkpoint] = Field(default_factory=list)
    feedback: Feedback | None = None
    confidence: int | None = None
    """The approving reviewer's confidence."""
    pgids: list[int] = Field(default_factory=list)
    """Process groups of agents running now (killed on recovery)."""
    agent_versions: dict[str, str] = Field(default_factory=dict)
    finished_at: datetime | None = None
    round: int = 1
    """The current rework round (SPEC §15): 1 up to the first delivery, then 2, 3, …"""
    rounds: list[Round] = Field(default_factory=list)
    """What started each round after the first, in order."""
    reacted: list[str] = Field(default_factory=list)
    """Stable ids of the triggers already acted on (a GitHub comment is acted on once)."""
    plan_note: str | None = None
    """The plan note's file name in ``[vault] plans`` (SPEC §16), once written."""
    plan_gate: bool = False
    """True while the plan waits for a person at ``plan-review``."""
    plan_revision: int = 1
    """The planner run the job wants: a person's ``changes-requested`` asks for the next."""
    plan_feedback: str | None = None
    """The person's text for the next planner run."""

    @property
    def last(self) -> Checkpoint | None:
        return self.history[-1] if self.history else None

    @property
    def merge_refused(self) -> bool:
        """Blocked after its pipeline delivered: the merge was refused, and ``approved``
        retries the merge alone (SPEC §7)."""
        last = self.last
        return (
            self.status is Status.BLOCKED
            and last is not None
            and last.stage is Stage.DELIVERY
            and last.outcome is Outcome.OK
        )

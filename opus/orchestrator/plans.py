"""Plan notes and the plan gate (SPEC §16).

With ``[vault] plans`` set, each job's plan is also a note of its own, ``<FR id> plan.md``
in that folder, linked from the FR by ``plan: "[[FR-101 plan]]"``. The note belongs to the
person once written: opus rewrites it only when the FR's planner runs again.

With ``[approval] plan = true`` (or the note's ``plan_approval: true``) the job stops after
the planner at ``plan-review``:

- ``approved``: the plan note's text as the person left it becomes the plan (the job's
  ``plan.md``) and the coder starts;
- ``changes-requested`` + ``feedback``: the planner runs again (revision 2, 3, …) with the
  feedback and the plan as it stands, and the gate waits again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .atomic import atomic_write
from .config import Config
from .lifecycle import Status, check_transition
from .models import FeatureRequest, Feedback, Job

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ("PlanGate", "gated", "note_name", "note_text")

log = logging.getLogger(__name__)


def gated(config: Config, fr: FeatureRequest) -> bool:
    """Whether the FR's plan waits for a person: the note's ``plan_approval``, else the config."""
    return fr.plan_approval if fr.plan_approval is not None else config.approval.plan


def note_name(fr_id: str) -> str:
    return f"{fr_id} plan.md"


def note_text(path: Path) -> str | None:
    """A plan note's body (its frontmatter dropped), or None when it is gone or unreadable."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end != -1:
            text = text[end + 5 :]
    return text.lstrip("\n")


def _render(fr: FeatureRequest, config: Config, plan: str) -> str:
    stem = fr.path.stem
    head = f'---\nfr: "[[{stem}]]"\n---\n'
    if not plan.lstrip().startswith("# "):
        head += f"# Plan for {fr.id}: {fr.title}\n\n"
    return head + plan.strip() + "\n"


class PlanGate:
    """Writes plan notes and moves jobs through ``plan-review``."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def _path(self, job: Job) -> Path | None:
        folder = self.rt.config.plans_dir
        return folder / job.plan_note if folder is not None and job.plan_note else None

    def planned(self, job: Job, fr: FeatureRequest, plan: str) -> list[Callable[[], None]]:
        """The planner finished: arm the gate; returns the write of the plan note (for the
        planner's checkpoint to run in its hand-off, before its record)."""
        folder = self.rt.config.plans_dir
        writes = []
        if folder is not None:
            name = note_name(fr.id)
            text = _render(fr, self.rt.config, plan)

            def write() -> None:
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write(folder / name, text.encode(), mode=0o644)

            writes.append(write)
            job.plan_note = name
        job.plan_gate = gated(self.rt.config, fr)
        job.plan_feedback = None
        return writes

    async def wait(self, job: Job) -> None:
        """Stop at ``plan-review`` and tell the person."""
        rt = self.rt
        job.status = check_transition(job.status, Status.PLAN_REVIEW)
        job.stage = None
        await rt.record(job, "plan-review")
        where = (
            f"[[{job.plan_note.removesuffix('.md')}]]"
            if job.plan_note
            else str(rt.config.state_dir / "jobs" / job.id / "plan.md")  # (no plan notes)
        )
        log.info("%s: the plan waits for a person: %s (job %s)", job.fr_id, where, job.id)
        await rt.notify("plan-review", job, f"plan ready for review: {where}")

    async def approve(self, job: Job) -> None:
        """``approved`` at ``plan-review``: the note as the person left it is the plan."""
        rt, path = self.rt, self._path(job)
        if path is not None:
            text = await anyio.to_thread.run_sync(note_text, path)
            if text is not None and text.strip():
                await anyio.to_thread.run_sync(
                    rt.registry.write_artifact, job.id, "plan.md", rt.redactor(text)
                )
            else:
                log.warning(
                    "%s: plan note %s is gone or empty; the last plan stands", job.fr_id, path
                )
        job.plan_gate = False
        job.status = check_transition(job.status, Status.QUEUED)
        await rt.record(job, "plan_approved", answer=True)
        log.info("%s: plan approved (job %s)", job.fr_id, job.id)

    async def replan(self, job: Job, feedback: str) -> None:
        """``changes-requested`` at ``plan-review``: the planner runs again with ``feedback``."""
        rt, path = self.rt, self._path(job)
        if path is not None:  # the planner revises the plan as the person left it
            text = await anyio.to_thread.run_sync(note_text, path)
            if text is not None and text.strip():
                await anyio.to_thread.run_sync(
                    rt.registry.write_artifact, job.id, "plan.md", rt.redactor(text)
                )
        job.plan_revision += 1
        job.plan_feedback = rt.redactor(feedback)
        job.feedback = Feedback(
            iteration=job.plan_revision - 1,
            reason="rework",
            message=job.plan_feedback,
            source="person",
        )
        job.status = check_transition(job.status, Status.QUEUED)
        job.error = None
        await rt.record(job, "replan", answer=True, revision=job.plan_revision)
        log.info("%s: re-plan (revision %d) (job %s)", job.fr_id, job.plan_revision, job.id)

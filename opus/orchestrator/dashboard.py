"""The dashboard note: what runs, waits and finished, readable in Obsidian (SPEC §10, §20).

Tables with a wiki-link for every FR, each FR once (its latest job, in its current state),
a Mermaid ``gantt`` of the last day's pipelines by stage, and ``updated_at`` in the notes'
date-time form. ``SECTIONS`` renders the tables in order; a module with more to show (the
ideas waiting, the review rounds) adds a function there.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath

from .atomic import atomic_write
from .budget import spent
from .lifecycle import FINISHED, Status
from .models import Job
from .vault import Scan

__all__ = ("SECTIONS", "Board", "render_dashboard", "write_dashboard")

AWAITING = frozenset(s for s in Status if s.value in ("review", "plan-review"))
"""Statuses waiting on a person's review (``plan-review`` where the plan gate exists)."""
RECENT = 10
"""Finished FRs listed under "Recent outcomes"."""
GANTT_WINDOW = timedelta(days=1)


def _age(since: datetime, now: datetime) -> str:
    seconds = max(0, int((now - since).total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def _cell(text: object) -> str:
    """A table cell: one line, its pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def link(job: Job) -> str:
    """A wiki-link to the FR's note (path without ``.md``, so never ambiguous), escaped for
    a table cell, shown as the FR's id."""
    target = str(PurePosixPath(job.fr_path).with_suffix(""))
    return f"[[{target}\\|{job.fr_id}]]"


def _table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["*(none)*"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(c) if i else c for i, c in enumerate(r)) + " |" for r in rows]
    return lines


def latest_per_fr(jobs: Sequence[Job]) -> list[Job]:
    """Each FR's latest job: an FR shows once, in its current state."""
    latest: dict[str, Job] = {}
    for job in jobs:
        old = latest.get(job.fr_id)
        if old is None or job.created_at >= old.created_at:
            latest[job.fr_id] = job
    return list(latest.values())


@dataclass(frozen=True)
class Board:
    """What a section renders from: every job the registry holds, each FR's latest one
    (``current``: an FR shows once, in its current state), the time, the scan."""

    jobs: Sequence[Job]
    current: Sequence[Job]
    now: datetime
    scan: Scan
    extra: Sequence[str] = ()
    """Lines of a section of their own (the ideas waiting, SPEC §19)."""


def running(b: Board) -> list[str]:
    jobs, now = b.current, b.now
    rows = [
        [link(j), j.title, str(j.stage or ""), str(j.iteration), _round(j), _age(j.created_at, now)]
        for j in jobs
        if j.status is Status.IN_PROGRESS
    ]
    head = ["FR", "title", "stage", "iteration", "round", "elapsed"]
    return ["## Running", "", *_table(head, rows)]


def queued(b: Board) -> list[str]:
    jobs = b.current
    rows = [
        [link(j), j.title, str(j.status), str(j.priority), waits_for(j, b)]
        for j in jobs
        if j.status in (Status.QUEUED, Status.PAUSED)
    ]
    return ["## Queued", "", *_table(["FR", "title", "status", "priority", "waiting for"], rows)]


def waits_for(job: Job, b: Board) -> str:
    """What a queued FR waits for: a person, what its ``error`` says (a dependency that
    cannot come, the budget, the cluster), the FRs it depends on that are not done, else a
    free slot."""
    if job.status is Status.PAUSED:
        return "a person: paused"
    if job.error:
        return job.error
    fr = b.scan.frs.get(job.fr_id)
    status = {j.fr_id: j.status for j in b.current}
    pending = []
    for dep in fr.depends_on if fr is not None else ():
        now = status.get(dep) or (b.scan.frs[dep].status if dep in b.scan.frs else None)
        if now is not Status.DONE:
            pending.append(f"{dep} ({now or 'planned'})")
    return ", ".join(pending) if pending else "a free slot"


def awaiting_review(b: Board) -> list[str]:
    jobs, now = b.current, b.now
    rows = [
        [
            link(j),
            j.title,
            f"the plan [[{j.plan_note.removesuffix('.md')}]]"
            if j.status is Status.PLAN_REVIEW and j.plan_note
            else f"`{j.branch}`",
            j.pr_url or "",
            _round(j),
            _age(j.updated_at, now),
        ]
        for j in jobs
        if j.status in AWAITING
    ]
    return [
        "## Awaiting review",
        "",
        *_table(["FR", "title", "branch", "pull request", "round", "waiting"], rows),
    ]


def _round(job: Job) -> str:
    """``2 (person)`` once rework started (SPEC §15); empty in the first round."""
    if job.round <= 1:
        return ""
    source = job.rounds[-1].source if job.rounds else ""
    return f"{job.round}" + (f" ({source})" if source else "")


def recent_outcomes(b: Board) -> list[str]:
    done = sorted(
        (j for j in b.current if j.status in FINISHED),
        key=lambda j: j.finished_at or j.updated_at,
        reverse=True,
    )[:RECENT]
    rows = [
        [
            link(j),
            j.title,
            f"**{j.status}**",
            f"{(j.finished_at or j.updated_at):%Y-%m-%d %H:%M}",
            j.error or "",
        ]
        for j in done
    ]
    return [
        "## Recent outcomes",
        "",
        *_table(["FR", "title", "status", "finished", "error"], rows),
    ]


_GANTT_UNSAFE = re.compile(r"[:;#\n\r]")


def gantt(b: Board) -> list[str]:
    """A Mermaid ``gantt``: one section per job of the last day, one bar per stage run."""
    jobs, now = b.jobs, b.now
    since = now - GANTT_WINDOW
    fmt = "%Y-%m-%d %H:%M:%S"
    sections: list[str] = []
    per_fr = Counter(j.fr_id for j in jobs)
    for job in sorted(jobs, key=lambda j: j.created_at):
        bars = []
        for cp in job.history:
            if cp.finished_at < since:
                continue
            tag = "done" if cp.outcome == "ok" else "crit"
            end = max(cp.finished_at, cp.started_at + timedelta(seconds=1))
            bars.append(f"    {cp.stage} {cp.iteration} :{tag}, {cp.started_at:{fmt}}, {end:{fmt}}")
        if job.status is Status.IN_PROGRESS and job.stage is not None:
            start = job.updated_at
            end = max(now, start + timedelta(seconds=1))
            bars.append(f"    {job.stage} {job.iteration} :active, {start:{fmt}}, {end:{fmt}}")
        if bars:
            title = _GANTT_UNSAFE.sub(" ", f"{job.fr_id} {job.title}")[:60].strip()
            if per_fr[job.fr_id] > 1:
                title += f" ({job.created_at:%H:%M})"  # an earlier job of the same FR
            sections += [f"    section {title}", *bars]
    if not sections:
        return ["## The last day", "", "*(no pipeline ran in the last 24 hours)*"]
    return [
        "## The last day",
        "",
        "```mermaid",
        "gantt",
        "    dateFormat YYYY-MM-DD HH:mm:ss",
        "    axisFormat %H:%M",
        *sections,
        "```",
    ]


def extra(b: Board) -> list[str]:
    return list(b.extra)


def unreadable(b: Board) -> list[str]:
    if not b.scan.problems:
        return []
    rows = [[f"`{p.path.name}`", p.message] for p in b.scan.problems]
    return ["## Notes opus cannot read", "", *_table(["note", "problem"], rows)]


Section = Callable[[Board], list[str]]
SECTIONS: list[Section] = [
    running,
    queued,
    awaiting_review,
    recent_outcomes,
    gantt,
    extra,
    unreadable,
]
"""The dashboard's sections, in order (one that returns no lines is left out)."""


def render_dashboard(
    jobs: Sequence[Job],
    scan: Scan,
    *,
    now: datetime,
    extra: Sequence[str] = (),
    other_spend: Sequence[tuple[datetime, float]] = (),
) -> str:
    """The note's text; ``extra`` lines (a section of their own, e.g. waiting ideas) go
    before the notes opus cannot read. ``other_spend`` (ideation's) counts in the cost, as
    it does toward the budget."""
    today, month = spent(jobs, now, other_spend)
    current = latest_per_fr(jobs)
    count = {s: sum(1 for j in current if j.status is s) for s in Status}
    lines = [
        "---",
        f"updated_at: {now.replace(microsecond=0).isoformat()}",
        "---",
        "# opus dashboard",
        "",
        f"{count[Status.IN_PROGRESS]} running · "
        f"{count[Status.QUEUED] + count[Status.PAUSED]} queued · "
        f"{sum(count[s] for s in AWAITING)} awaiting review · "
        f"today's cost ${today:.2f} (month ${month:.2f})",
    ]
    board = Board(jobs, current, now, scan, extra)
    for section in SECTIONS:
        block = section(board)
        lines += ["", *block] if block else []
    return "\n".join(lines) + "\n"


def write_dashboard(
    path: Path,
    jobs: Sequence[Job],
    scan: Scan,
    *,
    now: datetime,
    extra: Sequence[str] = (),
    other_spend: Sequence[tuple[datetime, float]] = (),
) -> None:
    """Rewrite the dashboard note atomically (only when its content changed)."""
    text = render_dashboard(jobs, scan, now=now, extra=extra, other_spend=other_spend)
    try:
        old = path.read_text(encoding="utf-8")
    except OSError:
        old = None
    if old is not None and old.split("---", 2)[-1] == text.split("---", 2)[-1]:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode("utf-8"), mode=0o644, sync=False)  # derived, rewritten

"""The dashboard note: what runs, waits and finished, readable in Obsidian (SPEC §10)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from .atomic import atomic_write
from .budget import spent
from .lifecycle import FINISHED, Status
from .models import Job
from .vault import Scan


def _age(since: datetime, now: datetime) -> str:
    seconds = max(0, int((now - since).total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def render_dashboard(
    jobs: Sequence[Job], scan: Scan, *, now: datetime, extra: Sequence[str] = ()
) -> str:
    """The note's text; ``extra`` lines (a section of their own, e.g. waiting ideas) go
    before the notes opus cannot read."""
    running = [j for j in jobs if j.status is Status.IN_PROGRESS]
    queued = [j for j in jobs if j.status in (Status.QUEUED, Status.PAUSED)]
    review = [j for j in jobs if j.status is Status.REVIEW]
    recent = sorted(
        (j for j in jobs if j.status in FINISHED),
        key=lambda j: j.finished_at or j.updated_at,
        reverse=True,
    )[:10]
    today, month = spent(jobs, now)
    lines = [
        "---",
        f"updated_at: {now.isoformat()}",
        "---",
        "# opus dashboard",
        "",
        f"{len(running)} running · {len(queued)} queued · {len(review)} awaiting review · "
        f"today's cost ${today:.2f} (month ${month:.2f})",
        "",
        "## Running",
        "",
    ]
    lines += [
        f"- [[{Path(j.fr_path).stem}|{j.fr_id}]] {j.title} — {j.stage}, iteration "
        f"{j.iteration}, {_age(j.created_at, now)}"
        for j in running
    ] or ["(none)"]
    lines += ["", "## Queued", ""]
    lines += [
        f"- [[{Path(j.fr_path).stem}|{j.fr_id}]] {j.title} — {j.status}, {j.priority}"
        for j in queued
    ] or ["(none)"]
    lines += ["", "## Awaiting review", ""]
    lines += [
        f"- [[{Path(j.fr_path).stem}|{j.fr_id}]] {j.title} — `{j.branch}`"
        + (f" {j.pr_url}" if j.pr_url else "")
        for j in review
    ] or ["(none)"]
    lines += ["", "## Recent outcomes", ""]
    lines += [
        f"- {j.fr_id} {j.title} — **{j.status}**" + (f": {j.error}" if j.error else "")
        for j in recent
    ] or ["(none)"]
    if extra:
        lines += ["", *extra]
    if scan.problems:
        lines += ["", "## Notes opus cannot read", ""]
        lines += [f"- `{p.path.name}`: {p.message}" for p in scan.problems]
    return "\n".join(lines) + "\n"


def write_dashboard(
    path: Path, jobs: Sequence[Job], scan: Scan, *, now: datetime, extra: Sequence[str] = ()
) -> None:
    """Rewrite the dashboard note atomically (only when its content changed)."""
    text = render_dashboard(jobs, scan, now=now, extra=extra)
    try:
        old = path.read_text(encoding="utf-8")
    except OSError:
        old = None
    if old is not None and old.split("---", 2)[-1] == text.split("---", 2)[-1]:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode("utf-8"), mode=0o644, sync=False)  # derived, rewritten

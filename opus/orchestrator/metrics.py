"""Figures from the registry, the event logs and the archive's roll-ups (SPEC §9
``opus metrics``); no database. p50/p95 of durations come from 2 %-wide log buckets
(within 1 %, see ``rollups``); everything else is exact."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta
from typing import Any

from .models import Job
from .rollups import Figures, job_figures


def window_start(now: datetime, since_days: int) -> date:
    """``--since N``: jobs created on or after the date N days before ``now``."""
    return (now - timedelta(days=since_days)).date()


def compute(
    jobs: Iterable[Job],
    events: Mapping[str, list[dict[str, Any]]],
    *,
    since_days: int,
    now: datetime,
    concurrency: int = 3,
    archived: tuple[Figures, set[str]] | None = None,
) -> dict[str, Any]:
    """The figures of ``jobs`` (live ones; ``events`` their event logs) created in the window,
    plus ``archived``: the archive's roll-ups for that window and the ids they hold (a job in
    both counts once)."""
    since = window_start(now, since_days)
    rolled = archived[1] if archived else set()
    figures = job_figures(
        (j for j in jobs if j.created_at.date() >= since and j.id not in rolled), events
    )
    if archived:
        figures.merge(archived[0])
    return figures.report(since_days=since_days, concurrency=concurrency)


def render(data: Mapping[str, Any]) -> str:
    p = data["pipeline_seconds"]
    lines = [
        f"jobs in the last {data['since_days']} day(s): {data['jobs']}  "
        + "  ".join(f"{k}={v}" for k, v in data["statuses"].items()),
        "jobs per day: "
        + (", ".join(f"{d} {n}" for d, n in data["jobs_per_day"].items()) or "none"),
        "success rate: "
        + (f"{data['success_rate']:.0%}" if data["success_rate"] is not None else "n/a"),
        f"pipeline duration: mean {p['mean']:.1f} s, p50 {p['p50']:.1f} s, "
        f"p95 {p['p95']:.1f} s over {p['count']} delivered job(s)",
        f"iterations per job: mean {data['iterations_per_job']['mean']:.2f}",
        "stage durations (mean / p95 s): "
        + ", ".join(
            f"{s} {v['mean']:.1f}/{v['p95']:.1f}" for s, v in data["stage_seconds"].items()
        ),
        f"agent utilization: {data['agent_utilization']:.0%}",
        f"recoveries: {data['recoveries']}",
        f"tokens: {data['tokens']['input']} in, {data['tokens']['output']} out; "
        f"cost ${data['cost_usd']:.4f}",
    ]
    if "ideas" in data:
        ideas = data["ideas"]
        lines.append(
            f"ideas: {ideas['proposed']} proposed, {ideas['taken_up']} taken up "
            f"({ideas['dropped_as_duplicates']} dropped as duplicates; ${ideas['cost_usd']:.4f})"
        )
    return "\n".join(lines)

"""Figures from the registry and the event logs (SPEC §9 ``opus metrics``); no database."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from .lifecycle import Stage, Status
from .models import Job


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index], 3)


def _summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"count": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0}
    return {
        "count": len(values),
        "mean": round(statistics.fmean(values), 3),
        "p50": _pct(values, 0.5),
        "p95": _pct(values, 0.95),
    }


def compute(
    jobs: Iterable[Job],
    events: Mapping[str, list[dict[str, Any]]],
    *,
    since_days: int,
    now: datetime,
    concurrency: int = 3,
) -> dict[str, Any]:
    since = now - timedelta(days=since_days)
    chosen = [j for j in jobs if j.created_at.replace(tzinfo=None) >= since]
    per_day = Counter(j.created_at.date().isoformat() for j in chosen)
    statuses = Counter(j.status.value for j in chosen)
    succeeded = statuses[Status.DONE] + statuses[Status.REVIEW]
    failed = statuses[Status.FAILED] + statuses[Status.BLOCKED]
    durations, iterations = [], []
    stage_seconds: dict[str, list[float]] = defaultdict(list)
    busy = 0.0
    first: datetime | None = None
    last: datetime | None = None
    for job in chosen:
        for cp in job.history:
            seconds = (cp.finished_at - cp.started_at).total_seconds()
            stage_seconds[cp.stage.value].append(seconds)
            if cp.stage is not Stage.DELIVERY:
                busy += seconds
            first = cp.started_at if first is None else min(first, cp.started_at)
            last = cp.finished_at if last is None else max(last, cp.finished_at)
        delivered = [cp for cp in job.history if cp.stage is Stage.DELIVERY]
        if delivered and job.history:
            durations.append(
                (delivered[-1].finished_at - job.history[0].started_at).total_seconds()
            )
            iterations.append(float(delivered[-1].iteration))
    span = (last - first).total_seconds() if first and last else 0.0
    recovered = sum(
        1 for j in chosen for e in events.get(j.id, []) if e.get("event") == "recovered"
    )
    usage_in = sum(j.usage.input_tokens for j in chosen)
    usage_out = sum(j.usage.output_tokens for j in chosen)
    return {
        "since_days": since_days,
        "jobs": len(chosen),
        "jobs_per_day": dict(sorted(per_day.items())),
        "statuses": dict(sorted(statuses.items())),
        "success_rate": round(succeeded / (succeeded + failed), 3) if succeeded + failed else None,
        "pipeline_seconds": _summary(durations),
        "stage_seconds": {s: _summary(v) for s, v in sorted(stage_seconds.items())},
        "iterations_per_job": _summary(iterations),
        "agent_utilization": round(busy / (span * concurrency), 3) if span else 0.0,
        "recoveries": recovered,
        "tokens": {"input": usage_in, "output": usage_out},
        "cost_usd": round(sum(j.usage.cost_usd for j in chosen), 4),
    }


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
    return "\n".join(lines)

"""Hard spending caps (SPEC §5.2): what the stages of today and this month cost."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from .config import BudgetSection
from .models import Job


def spent(
    jobs: Iterable[Job], now: datetime, other: Iterable[tuple[datetime, float]] = ()
) -> tuple[float, float]:
    """(today, this month) in USD, summed over the checkpoints that finished in each window,
    plus ``other`` spending outside jobs (ideation runs), as (when, USD)."""
    day = month = 0.0
    costs = [
        (cp.finished_at, cp.usage.cost_usd)
        for job in jobs
        for cp in job.history
        if cp.usage is not None and cp.usage.cost_usd
    ]
    for when, cost in [*costs, *other]:
        if (when.year, when.month) == (now.year, now.month):
            month += cost
            if when.date() == now.date():
                day += cost
    return round(day, 6), round(month, 6)


def over_budget(
    caps: BudgetSection,
    jobs: Iterable[Job],
    now: datetime,
    other: Iterable[tuple[datetime, float]] = (),
) -> str | None:
    """Why no new stage may start, or None. A cap of 0 means no limit."""
    if not caps.daily_usd and not caps.monthly_usd:
        return None
    day, month = spent(jobs, now, other)
    if caps.daily_usd and day >= caps.daily_usd:
        return f"daily budget reached: ${day:.2f} of ${caps.daily_usd:.2f}"
    if caps.monthly_usd and month >= caps.monthly_usd:
        return f"monthly budget reached: ${month:.2f} of ${caps.monthly_usd:.2f}"
    return None

"""Hard spending caps (SPEC §5.2): what the stages of today and this month cost, and the
``alert_at`` shares of a cap whose first crossing sends a ``budget`` notification (§20)."""

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
    return over_caps(caps, day, month)


def over_caps(caps: BudgetSection, day: float, month: float) -> str | None:
    """``over_budget`` for sums already made."""
    if caps.daily_usd and day >= caps.daily_usd:
        return f"daily budget reached: ${day:.2f} of ${caps.daily_usd:.2f}"
    if caps.monthly_usd and month >= caps.monthly_usd:
        return f"monthly budget reached: ${month:.2f} of ${caps.monthly_usd:.2f}"
    return None


def new_alerts(
    caps: BudgetSection, day: float, month: float, now: datetime, told: dict[str, list[float]]
) -> list[str]:
    """Messages for each ``alert_at`` share of a cap spent for the first time in its period;
    ``told`` (period key → shares already told: ``"2026-12-01"``, ``"2026-12"``) is updated
    and keeps only the current periods."""
    periods = [
        (f"{now:%Y-%m-%d}", "daily", caps.daily_usd, day),
        (f"{now:%Y-%m}", "monthly", caps.monthly_usd, month),
    ]
    for key in list(told):
        if key not in (periods[0][0], periods[1][0]):
            del told[key]
    messages = []
    for key, name, cap, used in periods:
        if not cap:
            continue
        done = told.setdefault(key, [])
        crossed = [share for share in sorted(caps.alert_at) if used >= cap * share / 100]
        fresh = [share for share in crossed if share not in done]
        done.extend(fresh)
        messages += [
            f"{share:g} % of the {name} budget spent: ${used:.2f} of ${cap:.2f}" for share in fresh
        ]  # one each (SPEC §20), also for shares one stage's spend crossed together
    return messages

"""The daily and monthly caps end to end (SPEC §5.2): agents that report their cost, a cap
that stops new stages, a ``budget`` notification, and work that resumes once it is raised."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from opus.orchestrator import Orchestrator, Summary, load_config

from .conftest import Vault

NOTE = "---\nid: {id}\ntitle: Thing {id}\npriority: {priority}\n---\n# Thing\n\nDo {id}.\n"
APPROVE = {"verdict": "approve", "confidence": 95, "summary": "Looks good."}
DAY = datetime(2026, 11, 21, 10, 0, 0)


def clock(start: datetime) -> Callable[[], datetime]:
    """A fixed clock the test moves by assigning ``clock.at``."""

    def now() -> datetime:
        return now.at  # type: ignore[attr-defined, no-any-return]

    now.at = start  # type: ignore[attr-defined]
    return now


def notify_section(events_file: Path) -> str:
    script = (
        "import json, os, sys; "
        f"open({str(events_file)!r}, 'a').write(json.dumps(json.load(sys.stdin)) + '\\n')"
    )
    return f'kind = "command"\ncommand = {json.dumps([sys.executable, "-c", script])}'


def config(vault: Vault, events_file: Path, *, daily: float = 0, monthly: float = 0) -> None:
    vault.write_config(
        pipeline="stage_timeout = 60\nstall_timeout = 30\nretries = 1\nconcurrency = 1",
        budget=f"daily_usd = {daily}\nmonthly_usd = {monthly}",
        **{"[[notify]]": notify_section(events_file)},
    )


def events(events_file: Path) -> list[dict[str, Any]]:
    if not events_file.exists():
        return []
    return [json.loads(line) for line in events_file.read_text().splitlines()]


def status(note: Path) -> str:
    data = yaml.safe_load(note.read_text().split("---\n")[1])
    return str(data.get("status"))


def reached(event: dict[str, Any]) -> bool:
    return event["event"] == "budget" and "budget reached" in event["message"]


async def run_once(vault: Vault, now: Callable[[], datetime]) -> Summary:
    async with Orchestrator(load_config(vault.config), now=now) as orch:
        return await orch.run_once()


@pytest.fixture
def events_file(tmp_path: Path) -> Path:
    return tmp_path / "notifications.jsonl"


@pytest.mark.anyio
async def test_a_reached_cap_keeps_queued_frs_waiting_until_it_is_raised(
    vault: Vault, events_file: Path
) -> None:
    usage = {"input_tokens": 1000, "output_tokens": 100, "cost_usd": 0.6}
    vault.script({"*": {"reviewer": [{"verdict": APPROVE, "usage": usage}]}})
    config(vault, events_file, daily=0.5)
    notes = {
        i: vault.note(f"FR-{i}.md", NOTE.format(id=f"FR-{i}", priority=p))
        for i, p in ((1, "high"), (2, "medium"), (3, "low"))
    }
    now = clock(DAY)
    async with Orchestrator(load_config(vault.config), now=now) as orch:
        summary = await orch.run_once()
        # FR-1 ran its stages and spent 0.60 of 0.50: the others do not start
        assert summary.statuses["FR-2"] == summary.statuses["FR-3"] == "queued"
        assert [status(notes[i]) for i in (2, 3)] == ["queued", "queued"]
        assert len(vault.runs("reviewer", "FR-1")) == 1
        assert vault.runs("planner", "FR-2") == [] and vault.runs("planner", "FR-3") == []
        budget = [e for e in events(events_file) if reached(e)]
        assert len(budget) == 1
        assert "daily budget reached" in budget[0]["message"]
        assert "0.60" in budget[0]["message"] and "0.50" in budget[0]["message"]

        # still over the cap: nothing starts, and the same orchestrator does not tell again
        summary = await orch.run_once()
        assert summary.statuses["FR-2"] == "queued"
        assert vault.runs("planner", "FR-2") == []
        assert len([e for e in events(events_file) if reached(e)]) == 1

        # the cap raised: opus.toml rewritten and reloaded into the running orchestrator
        config(vault, events_file, daily=10)
        await orch.reload(load_config(vault.config))
        summary = await orch.run_once()
    assert summary.statuses == {"FR-1": "review", "FR-2": "review", "FR-3": "review"}
    assert [status(notes[i]) for i in (1, 2, 3)] == ["review"] * 3
    assert len(vault.runs("reviewer", "FR-1")) == 1  # FR-1's stages did not run again
    jobs = json.loads((vault.state / "registry.json").read_text())["jobs"]
    assert sorted(j["usage"]["cost_usd"] for j in jobs) == [0.6, 0.6, 0.6]


@pytest.mark.anyio
async def test_the_fr_that_reaches_the_cap_is_still_delivered(
    vault: Vault, events_file: Path
) -> None:
    usage = {"input_tokens": 1000, "output_tokens": 100, "cost_usd": 0.6}
    vault.script({"*": {"reviewer": [{"verdict": APPROVE, "usage": usage}]}})
    config(vault, events_file, daily=0.5)
    note = vault.note("FR-1.md", NOTE.format(id="FR-1", priority="high"))
    vault.note("FR-2.md", NOTE.format(id="FR-2", priority="medium"))
    summary = await run_once(vault, clock(DAY))
    assert vault.runs("planner", "FR-2") == []
    assert summary.statuses == {"FR-1": "review", "FR-2": "queued"}
    assert status(note) == "review"


@pytest.mark.anyio
async def test_the_cap_stops_a_running_fr_at_the_next_stage_and_it_resumes_there(
    vault: Vault, events_file: Path
) -> None:
    usage = {"input_tokens": 10, "output_tokens": 10, "cost_usd": 1.25}
    vault.script({"FR-1": {"planner": [{"output": "# Plan\n", "usage": usage}]}})
    config(vault, events_file, daily=1)
    note = vault.note("FR-1.md", NOTE.format(id="FR-1", priority="high"))
    now = clock(DAY)

    summary = await run_once(vault, now)
    assert summary.statuses == {"FR-1": "queued"}
    assert status(note) == "queued"
    assert len(vault.runs("planner")) == 1 and vault.runs("coder") == []
    (job,) = json.loads((vault.state / "registry.json").read_text())["jobs"]
    assert [(c["stage"], c["outcome"]) for c in job["history"]] == [("planner", "ok")]
    assert job["usage"]["cost_usd"] == 1.25

    # the next day the daily cap starts again from zero: the job resumes after the planner
    now.at = DAY + timedelta(days=1)  # type: ignore[attr-defined]
    summary = await run_once(vault, now)
    assert summary.statuses == {"FR-1": "review"}
    assert len(vault.runs("planner")) == 1
    assert len(vault.runs("coder")) == 1


@pytest.mark.anyio
async def test_the_monthly_cap_counts_the_whole_month(vault: Vault, events_file: Path) -> None:
    usage = {"input_tokens": 10, "output_tokens": 10, "cost_usd": 2.0}
    vault.script({"*": {"planner": [{"output": "# Plan\n", "usage": usage}]}})
    config(vault, events_file, monthly=3)
    now = clock(DAY)
    vault.note("FR-1.md", NOTE.format(id="FR-1", priority="medium"))
    assert (await run_once(vault, now)).statuses == {"FR-1": "review"}

    # a later day of the same month: 2.00 spent of 3.00, so FR-2 starts; its planner brings
    # the month to 4.00, so FR-2 waits after it and FR-3 does not start
    now.at = DAY + timedelta(days=2)  # type: ignore[attr-defined]
    vault.note("FR-2.md", NOTE.format(id="FR-2", priority="medium"))
    vault.note("FR-3.md", NOTE.format(id="FR-3", priority="low"))
    summary = await run_once(vault, now)
    assert summary.statuses == {"FR-1": "review", "FR-2": "queued", "FR-3": "queued"}
    assert vault.runs("coder", "FR-2") == [] and vault.runs("planner", "FR-3") == []
    (budget,) = [e for e in events(events_file) if reached(e)]
    assert "monthly budget reached" in budget["message"]

    # the next month starts from zero
    now.at = datetime(2026, 12, 1, 9, 0, 0)  # type: ignore[attr-defined]
    summary = await run_once(vault, now)
    assert summary.statuses == {"FR-1": "review", "FR-2": "review", "FR-3": "review"}
    assert len(vault.runs("planner", "FR-2")) == 1


@pytest.mark.anyio
async def test_agents_without_cost_never_hit_the_cap(vault: Vault, events_file: Path) -> None:
    config(vault, events_file, daily=0.01)
    for i in (1, 2):
        vault.note(f"FR-{i}.md", NOTE.format(id=f"FR-{i}", priority="medium"))
    summary = await run_once(vault, clock(DAY))
    assert summary.statuses == {"FR-1": "review", "FR-2": "review"}
    assert [e["event"] for e in events(events_file)] == ["review", "review"]


@pytest.mark.anyio
async def test_alert_at_tells_the_first_time_each_share_is_spent(
    vault: Vault, events_file: Path
) -> None:
    usage = {"input_tokens": 10, "output_tokens": 10, "cost_usd": 0.3}
    vault.script({"*": {"planner": [{"output": "# Plan\n", "usage": usage}]}})
    config(vault, events_file, daily=1)  # alert_at defaults to [50, 75, 90]
    for i in (1, 2, 3):
        vault.note(f"FR-{i}.md", NOTE.format(id=f"FR-{i}", priority="high"))
    now = clock(DAY)
    await run_once(vault, now)  # 0.30, 0.60, 0.90 spent by the three planners
    alerts = [e["message"] for e in events(events_file) if "% of the" in e["message"]]
    assert alerts == [
        "50 % of the daily budget spent: $0.60 of $1.00",
        "75 % of the daily budget spent: $0.90 of $1.00",
        "90 % of the daily budget spent: $0.90 of $1.00",
    ]  # 75 % and 90 % were crossed by one stage: each share is told
    await run_once(vault, now)  # a restart does not tell again
    assert len([e for e in events(events_file) if "% of the" in e["message"]]) == 3


@pytest.mark.anyio
async def test_the_last_stages_spend_is_told_when_its_pipeline_ends(
    vault: Vault, events_file: Path
) -> None:
    """The reviewer's $6 of a $10 cap: the 50 % alert comes with this FR's ending, not
    before the next FR's first stage (there may be none for a long time)."""
    usage = {"input_tokens": 10, "output_tokens": 10, "cost_usd": 6.0}
    verdict = {"verdict": "approve", "confidence": 95}
    vault.script({"*": {"reviewer": [{"verdict": verdict, "usage": usage}]}})
    config(vault, events_file, daily=10)
    note = vault.note("FR-1.md", NOTE.format(id="FR-1", priority="high"))
    await run_once(vault, clock(DAY))
    assert status(note) == "review"
    told = [(e["event"], e["fr_id"], e["message"]) for e in events(events_file)]
    assert ("budget", "FR-1", "50 % of the daily budget spent: $6.00 of $10.00") in told
    assert [t for t in told if t[0] == "budget"] == [told[-1]]  # once, after the review


@pytest.mark.anyio
async def test_a_cap_the_last_stage_reaches_is_told_at_once_and_once(
    vault: Vault, events_file: Path
) -> None:
    usage = {"input_tokens": 10, "output_tokens": 10, "cost_usd": 6.0}
    verdict = {"verdict": "approve", "confidence": 95}
    vault.script({"*": {"reviewer": [{"verdict": verdict, "usage": usage}]}})
    config(vault, events_file, daily=5)
    vault.note("FR-1.md", NOTE.format(id="FR-1", priority="high"))
    now = clock(DAY)
    await run_once(vault, now)  # no FR waits afterwards: the pipeline's end tells it
    assert [e["message"] for e in events(events_file) if reached(e)] == [
        "daily budget reached: $6.00 of $5.00"
    ]
    vault.note("FR-2.md", NOTE.format(id="FR-2", priority="high"))
    await run_once(vault, now)  # a new process (a restart) tells it once more, FR-2 waiting
    assert len([e for e in events(events_file) if reached(e)]) == 2
    assert vault.runs("planner", "FR-2") == []

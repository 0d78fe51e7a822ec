"""Ideation end to end (SPEC §19): a real scripted ideator process, a real repository and
vault, the Orchestrator's idle tick, ``opus ideate`` and ``opus metrics``."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from click.testing import CliRunner, Result

from opus.cli import main
from opus.orchestrator import Orchestrator, load_config
from opus.orchestrator.ideation import near_duplicate, next_category, parse_idea
from opus.orchestrator.lifecycle import Status

from .conftest import Vault, git

IDEATOR = Path(__file__).parent / "agents" / "ideator.py"
IDEA = (
    "# Cache the greeting table\n\nGreetings are rebuilt on every call.\n\n"
    "## Acceptance criteria\n\n- [ ] built once\n- [ ] a test proves it\n"
)


START = datetime.now().replace(hour=9, minute=0, second=0, microsecond=0)


class Now:
    """The Orchestrator's clock: real time, from ``start`` if given, plus an offset a test
    moves forward."""

    def __init__(self, start: datetime | None = None) -> None:
        self.start, self.began = start or datetime.now(), time.monotonic()
        self.offset = timedelta()

    def __call__(self) -> datetime:
        now = self.start + timedelta(seconds=time.monotonic() - self.began) + self.offset
        return now.replace(microsecond=now.microsecond // 1000 * 1000)


def configure(
    vault: Vault, answers: list[Any], *, max_open: int = 5, extra: str = "", **sections: str
) -> Path:
    ideas, calls = vault.root.parent / "ideas.json", vault.root.parent / "ideator.jsonl"
    ideas.write_text(json.dumps(answers))
    command = json.dumps([sys.executable, str(IDEATOR)])
    vault.write_config(
        **{
            "agents.ideator": f'kind = "command"\ncommand = {command}\n'
            f"env = {{ IDEAS = {json.dumps(str(ideas))}, CALLS = {json.dumps(str(calls))} }}",
            "ideation": f"enabled = true\ninterval = 3600\nmax_open = {max_open}\n"
            f'categories = ["testing", "security", "documentation"]\n{extra}',
            **sections,
        }
    )
    return calls


def ideator_calls(calls: Path) -> list[dict[str, Any]]:
    if not calls.exists():
        return []
    return [json.loads(line) for line in calls.read_text().splitlines()]


def ideas_dir(vault: Vault) -> Path:
    return vault.root / "10_features" / "01_ideas"


def idea_notes(vault: Vault) -> list[Path]:
    folder = ideas_dir(vault)
    return sorted(folder.glob("*.md")) if folder.exists() else []


def front(note: Path) -> tuple[dict[str, Any], str, str]:
    text = note.read_text()
    _, head, body = text.split("---\n", 2)
    data = yaml.safe_load(head)
    assert isinstance(data, dict)
    return data, head, body


def exists(path: str) -> bool:
    return Path(path).exists()


async def cli(*args: str) -> Result:
    """``opus ARGS`` in a thread (the command runs its own event loop)."""
    return await anyio.to_thread.run_sync(lambda: CliRunner().invoke(main, list(args)))


def orchestrator(vault: Vault, now: Now | None = None) -> Orchestrator:
    return Orchestrator(load_config(vault.config), now=now or Now())


@pytest.mark.anyio
async def test_an_idle_service_writes_one_idea_note(vault: Vault) -> None:
    calls = configure(vault, [IDEA])
    async with orchestrator(vault) as orch:
        summary = await orch.run_once()
        await orch.run_once()  # the interval has not passed: no second idea
    assert summary.statuses == {}
    (note,) = idea_notes(vault)
    data, head, body = front(note)
    assert data["status"] == "idea" and data["source"] == "opus"
    assert data["title"] == "Cache the greeting table"
    assert data["category"] == "testing"  # the first category, never used before
    assert data["id"].startswith("IDEA-") and note.name.startswith(data["id"])
    assert re.search(r"(?m)^created: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$", head)  # unquoted
    assert body.startswith("# Cache the greeting table\n\n")
    assert "## Acceptance criteria" in body
    assert list(vault.planned.iterdir()) == []  # never into the planned folder
    (call,) = ideator_calls(calls)
    assert call["stage"] == "planner"  # the planner's read-only treatment
    # the ideator's scribble went with its worktree; the repository is untouched
    assert not exists(call["worktree"])
    assert git(vault.repo, "status", "--porcelain") == ""
    assert "scribble" not in git(vault.repo, "log", "--all", "--stat")
    dashboard = (vault.root / "00_system" / "opus-dashboard.md").read_text()
    assert "## Ideas waiting" in dashboard and "Cache the greeting table" in dashboard


@pytest.mark.anyio
async def test_the_ideator_sees_every_title_and_alias(vault: Vault) -> None:
    calls = configure(vault, [IDEA])
    done = vault.root / "10_features" / "04_done"
    done.mkdir(parents=True)
    (done / "FR-7.md").write_text(
        "---\nid: FR-7\nstatus: done\naliases: [Greeting cache v0]\n---\n# Say hello in French\n"
    )
    (vault.planned / "FR-8.md").write_text("---\nid: FR-8\nstatus: done\n---\n# Shout it\n")
    ideas_dir(vault).mkdir(parents=True)
    (ideas_dir(vault) / "mine.md").write_text("---\nstatus: idea\n---\n# A person's own idea\n")
    (done / "scratch.md").write_text("# Not an FR: no frontmatter keys\n")
    async with orchestrator(vault) as orch:
        await orch.run_once()
    (call,) = ideator_calls(calls)
    prompt = call["prompt"]
    for title in ("Say hello in French", "Greeting cache v0", "Shout it", "A person's own idea"):
        assert f"- {title}\n" in prompt
    assert "Not an FR" not in prompt
    assert "**testing**" in prompt and "## Acceptance criteria" in prompt
    assert "a few hours" in prompt
    assert "README.md" in prompt and "# app" in prompt  # the repository context


@pytest.mark.anyio
async def test_no_ideation_while_work_runs(vault: Vault) -> None:
    calls = configure(vault, [IDEA])
    vault.note("FR-1.md", "---\nid: FR-1\n---\n# One\n\nDo it.\n")
    async with orchestrator(vault) as orch:
        assert (await orch.run_once()).statuses == {"FR-1": "review"}
        job = orch.rt.registry.latest_for("FR-1")
        assert job is not None
        assert orch.ideation.due([job.model_copy(update={"status": Status.QUEUED})], busy=False)
        assert orch.ideation.due([], busy=True) == "work is queued or running"
    (call,) = ideator_calls(calls)
    delivered = job.history[-1].finished_at
    assert call["at"] >= delivered.timestamp()  # only once the FR rested
    assert "- One\n" in call["prompt"]


@pytest.mark.anyio
async def test_max_open_is_respected(vault: Vault) -> None:
    second = IDEA.replace("Cache the greeting table", "Document every public function")
    calls = configure(vault, [IDEA, second], max_open=1)
    now = Now()
    async with orchestrator(vault, now) as orch:
        await orch.run_once()
        now.offset += timedelta(hours=2)
        await orch.run_once()  # one idea waits: max_open = 1
        assert len(idea_notes(vault)) == 1 and len(ideator_calls(calls)) == 1
        why = orch.ideation.due([], busy=False)
        assert why == "1 idea(s) wait (max_open 1)"
        # a person takes the idea up: it leaves the ideas folder, a slot frees
        (note,) = idea_notes(vault)
        os.replace(note, vault.planned / note.name)
        assert orch.ideation.due([], busy=False) is None
        result = await cli("ideate", "--config", str(vault.config))
        assert result.exit_code == 1 and "already serves this vault" in result.output
    result = await cli("ideate", "--config", str(vault.config), "--category", "documentation")
    assert result.exit_code == 0, result.output
    assert "Document every public function" in result.output
    assert [front(n)[0]["category"] for n in idea_notes(vault)] == ["documentation"]
    result = await cli("ideate", "--config", str(vault.config))
    assert result.exit_code == 1 and "max_open 1" in result.output


@pytest.mark.anyio
async def test_categories_rotate_least_recently_used_across_restarts(vault: Vault) -> None:
    titles = ["Fuzz the parser", "Sign the releases", "Write a tutorial", "Test the CLI"]
    answers = [IDEA.replace("Cache the greeting table", t) for t in titles]
    calls = configure(vault, answers)
    now = Now()
    seen = []
    for step in range(4):
        now.offset = timedelta(hours=2 * step)
        async with orchestrator(vault, now) as orch:  # a restart each time
            if step == 1:
                run = await orch.ideate("documentation")  # a person's choice
            else:
                await orch.run_once()
                run = orch.ideation.ledger.runs[-1]
        seen.append(run.category)
    assert seen == ["testing", "documentation", "security", "testing"]
    assert len(ideator_calls(calls)) == 4
    assert next_category(["a", "b"], {}) == "a"


@pytest.mark.anyio
async def test_a_near_duplicate_title_is_dropped_and_logged(
    vault: Vault, caplog: pytest.LogCaptureFixture
) -> None:
    configure(vault, ["# Cache the greetings table\n\nAgain.\n\n## Acceptance criteria\n\n- x\n"])
    (vault.planned / "FR-3.md").write_text(
        "---\nid: FR-3\nstatus: done\n---\n# Cache the greeting table\n"
    )
    with caplog.at_level(logging.INFO, logger="opus"):
        async with orchestrator(vault) as orch:
            await orch.run_once()
            (run,) = orch.ideation.ledger.runs
    assert idea_notes(vault) == []
    assert run.outcome == "duplicate" and "Cache the greeting table" in (run.detail or "")
    assert any("duplicate" in r.getMessage() for r in caplog.records)
    assert near_duplicate("Add dark mode", ["Add a dark mode"]) == "Add a dark mode"
    assert near_duplicate("Add dark mode", ["Rotate the logs"]) is None


@pytest.mark.anyio
async def test_an_answer_without_title_or_body_writes_nothing(vault: Vault) -> None:
    configure(vault, ["just some thoughts, no heading"])
    async with orchestrator(vault) as orch:
        await orch.run_once()
        (run,) = orch.ideation.ledger.runs
    assert run.outcome == "invalid" and "heading" in (run.detail or "")
    assert idea_notes(vault) == []
    with pytest.raises(ValueError, match="no body"):
        parse_idea("# Title only\n\n")
    with pytest.raises(ValueError, match="no acceptance criteria"):
        parse_idea("# A title\n\nJust do it.\n")
    body = "Why.\n\n**Acceptance Criteria**\n- [ ] x"
    assert parse_idea(f"intro\n# A title #\n{body}\n") == ("A title", body)


@pytest.mark.anyio
async def test_ideation_spend_counts_toward_the_budget(vault: Vault) -> None:
    paid = {"output": IDEA, "usage": {"input_tokens": 900, "output_tokens": 120, "cost_usd": 0.5}}
    configure(vault, [paid], budget="daily_usd = 0.4")
    now = Now(START)  # the two hours below stay on one day, whenever the suite runs
    async with orchestrator(vault, now) as orch:
        await orch.run_once()
        (run,) = orch.ideation.ledger.runs
        assert run.usage is not None and run.usage.cost_usd == 0.5
        assert orch.rt.over_budget() == "daily budget reached: $0.50 of $0.40"
    vault.note("FR-1.md", "---\nid: FR-1\n---\n# One\n\nDo it.\n")
    now.offset = timedelta(hours=2)
    async with orchestrator(vault, now) as orch:  # the spend is remembered across a restart
        summary = await orch.run_once()
        assert orch.ideation.due([], busy=False) == "daily budget reached: $0.50 of $0.40"
    assert summary.statuses == {"FR-1": "queued"}
    assert len(idea_notes(vault)) == 1


@pytest.mark.anyio
async def test_an_idea_moved_into_planned_runs_to_review_and_counts_as_taken_up(
    vault: Vault,
) -> None:
    configure(vault, [IDEA])
    async with orchestrator(vault) as orch:
        await orch.run_once()
    (note,) = idea_notes(vault)
    idea_id = front(note)[0]["id"]
    os.replace(note, vault.planned / note.name)  # the person's approval
    async with orchestrator(vault) as orch:
        summary = await orch.run_once()
    assert summary.statuses == {idea_id: "review"}
    assert vault.runs("coder", idea_id)
    result = await cli("metrics", "--config", str(vault.config), "--json")
    assert result.exit_code == 0, result.output
    ideas = json.loads(result.output)["ideas"]
    assert (ideas["proposed"], ideas["taken_up"]) == (1, 1)
    text = (await cli("metrics", "--config", str(vault.config))).output
    assert "ideas: 1 proposed, 1 taken up" in text


@pytest.mark.anyio
async def test_a_failing_ideator_writes_nothing_and_waits_for_the_interval(vault: Vault) -> None:
    calls = configure(vault, [{"exit": 3}, IDEA])
    now = Now()
    async with orchestrator(vault, now) as orch:
        await orch.run_once()
        await orch.run_once()  # no retry before the interval
        (run,) = orch.ideation.ledger.runs
        assert run.outcome == "failed" and "the ideator failed" in (run.detail or "")
        assert idea_notes(vault) == [] and len(ideator_calls(calls)) == 1
        now.offset = timedelta(hours=1, seconds=1)
        await orch.run_once()
    assert len(idea_notes(vault)) == 1
    assert git(vault.repo, "worktree", "list").count("\n") == 0  # no ideation worktree left


@pytest.mark.anyio
async def test_in_the_sandbox_the_ideator_cannot_write_the_repository(
    vault: Vault, tmp_path: Path
) -> None:
    writable = json.dumps(str(tmp_path))  # where the scripted ideator logs its calls
    calls = configure(vault, [IDEA], sandbox=f'kind = "bwrap"\npaths = [{writable}]')
    async with orchestrator(vault) as orch:
        assert orch.rt.sandbox is not None
        await orch.run_once()
    (call,) = ideator_calls(calls)
    assert call["scribbled"] is False  # the planner's policy: the worktree read-only
    assert len(idea_notes(vault)) == 1
    assert not exists(str(vault.state / "sandbox" / Path(call["worktree"]).name))


@pytest.mark.anyio
async def test_ideation_spend_is_told_by_alert_at(vault: Vault) -> None:
    told = vault.root.parent / "told.jsonl"
    script = f"import sys; open({str(told)!r}, 'a').write(sys.stdin.read() + '\\n')"
    paid = {"output": IDEA, "usage": {"input_tokens": 900, "output_tokens": 120, "cost_usd": 0.6}}
    notify = f'kind = "command"\ncommand = {json.dumps([sys.executable, "-c", script])}'
    configure(vault, [paid], budget="daily_usd = 1", **{"[[notify]]": notify})
    async with orchestrator(vault) as orch:
        await orch.run_once()
    assert len(idea_notes(vault)) == 1
    events = [json.loads(line) for line in told.read_text().splitlines() if line.strip()]
    budget = [(e["event"], e["fr_id"], e["title"], e["message"]) for e in events]
    assert budget == [("budget", "", "ideation", "50 % of the daily budget spent: $0.60 of $1.00")]
    dashboard = (vault.root / "00_system" / "opus-dashboard.md").read_text()
    assert "today's cost $0.60 (month $0.60)" in dashboard  # counted as toward the budget
    # the ideator's request is a state file like any other (SPEC §8)
    ideation = vault.state / "ideation"
    (request,) = ideation.glob("*/request.md")
    assert [oct(p.stat().st_mode & 0o777) for p in (ideation, request.parent, request)] == [
        "0o700",
        "0o700",
        "0o600",
    ]
    result = await cli("ideate", "--category", "nonsense", "--config", str(vault.config))
    assert result.exit_code == 2 and "not one of [ideation] categories" in result.output

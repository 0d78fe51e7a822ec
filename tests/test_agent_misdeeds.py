"""Agents that do something odd but not wrong (SPEC §3, §5.1): what opus delivers is what
its stages judged, whatever branch the coder left the worktree on."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from opus.orchestrator import StageContext
from opus.orchestrator.agents.fake import ScriptedAgent, writes
from opus.orchestrator.config import load_config
from opus.orchestrator.lifecycle import Status
from opus.orchestrator.service import Orchestrator

from .conftest import GIT_ENV, Vault, git
from .test_cli_basics import meta, opus
from .test_pipeline_flow import fr, registry

GIT_ENV_FULL = {**os.environ, **GIT_ENV}


def review(ctx: StageContext) -> dict[str, Any]:
    return {"verdict": "approve", "confidence": 90, "summary": "ok", "issues": []}


@pytest.mark.anyio
@pytest.mark.parametrize("leave", ["side-branch", "detached"])
async def test_a_coder_that_leaves_the_branch_has_its_work_delivered(
    vault: Vault, leave: str
) -> None:
    note = fr(vault, "FR-1")

    def coder(ctx: StageContext) -> None:
        def run(*args: str) -> None:
            subprocess.run(["git", *args], cwd=ctx.worktree, check=True, env=GIT_ENV_FULL)

        run("checkout", "-q", *(["-b", "side"] if leave == "side-branch" else ["--detach"]))
        (ctx.worktree / "side.txt").write_text("the work\n")
        run("add", "side.txt")
        run("commit", "-qm", "the agent's own commit")

    agents = {s: ScriptedAgent() for s in ("planner", "tester")}
    agents.update(coder=coder, reviewer=review)  # type: ignore[dict-item]
    async with Orchestrator(load_config(vault.config), agents=dict(agents)) as orch:
        job = await orch.process("FR-1")
    assert job.status is Status.REVIEW and meta(note)["branch"] == "opus/fr-1"
    assert git(vault.repo, "show", "opus/fr-1:side.txt") == "the work"
    worktree = vault.state / "worktrees" / job.id
    assert git(worktree, "symbolic-ref", "HEAD") == "refs/heads/opus/fr-1"
    assert job.history[-1].commit == git(vault.repo, "rev-parse", "opus/fr-1")


def test_a_json_plan_in_the_output_file_is_the_plan(vault: Vault) -> None:
    """SPEC §5.1: the plan is the output file's content; JSON that is not opus's own
    ``{"plan": …}`` / ``{"usage": …}`` envelope is that content, not a reason to drop it."""
    plan = '{"steps": ["add the endpoint", "add its test"]}'
    vault.script({"FR-1": {"planner": [{"output": plan}]}})
    note = fr(vault, "FR-1")
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(note)["status"] == "review"
    (job,) = registry(vault)
    artifacts = vault.state / "jobs" / str(job["id"])
    assert (artifacts / "plan.md").read_text() == plan
    assert plan in (artifacts / "prompt-coder-1.md").read_text()


@pytest.mark.anyio
async def test_an_empty_plan_is_a_failed_attempt_not_a_plan(vault: Vault) -> None:
    note = fr(vault, "FR-1")
    answers = iter(["", "  \n", "# Plan\n\n1. Do it.\n"])

    def planner(ctx: StageContext) -> str:
        return next(answers)

    vault.write_config(pipeline="retries = 2\nstage_timeout = 60")
    coder, tester = ScriptedAgent(writes({"x.txt": "x\n"})), ScriptedAgent()
    agents: dict[str, Any] = {"planner": planner, "coder": coder, "tester": tester}
    agents["reviewer"] = review
    async with Orchestrator(load_config(vault.config), agents=agents) as orch:
        job = await orch.process("FR-1")
    assert job.status is Status.REVIEW, meta(note)
    assert job.history[0].attempts == 3
    assert (vault.state / "jobs" / job.id / "plan.md").read_text().startswith("# Plan")


def test_a_huge_plan_with_control_characters_is_cut_and_cleaned(vault: Vault) -> None:
    """The plan goes into every later prompt and into a vault note (which opus refuses to
    read past 1 MiB): it is cut to MAX_PLAN, and NULs and terminal escapes are left out."""
    from opus.orchestrator.pipeline import MAX_PLAN

    noisy = "\x1b[1m# Plan\x1b[0m\x00\n" + "1. Do it.\n" * (MAX_PLAN // 5)
    vault.script({"FR-1": {"planner": [{"output": noisy}]}})
    fr(vault, "FR-1")
    assert opus(vault, "run", "--once")[0] == 0
    (job,) = registry(vault)
    plan = (vault.state / "jobs" / str(job["id"]) / "plan.md").read_text()
    assert plan.startswith("# Plan\n1. Do it.\n")
    assert len(plan) < MAX_PLAN + 100 and "characters of the planner's output cut" in plan
    note = vault.root / "10_features" / "05_plans" / "FR-1 plan.md"
    assert note.stat().st_size < 2**20 and "\x00" not in note.read_text()


def test_a_secret_split_by_a_terminal_escape_is_redacted_in_the_plan() -> None:
    from opus.orchestrator.pipeline import plan_text
    from opus.orchestrator.redact import Redactor

    redact = Redactor(["ghp_SECRETTOKEN123"])
    assert plan_text("token ghp_SECRET\x1b[0mTOKEN123 here\x00", redact) == "token *** here"


@pytest.mark.anyio
async def test_a_coder_on_someone_elses_branch_leaves_that_branch_alone(vault: Vault) -> None:
    """opus's commit goes onto the job's branch, never onto a branch the coder switched to."""
    git(vault.repo, "branch", "persons-branch")
    theirs = git(vault.repo, "rev-parse", "persons-branch")
    note = fr(vault, "FR-1")

    def coder(ctx: StageContext) -> None:
        subprocess.run(["git", "checkout", "-q", "persons-branch"], cwd=ctx.worktree,
                       check=True, env=GIT_ENV_FULL)  # fmt: skip
        (ctx.worktree / "work.txt").write_text("uncommitted work\n")

    agents = {s: ScriptedAgent() for s in ("planner", "tester")}
    agents.update(coder=coder, reviewer=review)  # type: ignore[dict-item]
    async with Orchestrator(load_config(vault.config), agents=dict(agents)) as orch:
        job = await orch.process("FR-1")
    assert job.status is Status.REVIEW and meta(note)["branch"] == "opus/fr-1"
    assert git(vault.repo, "rev-parse", "persons-branch") == theirs
    assert git(vault.repo, "show", "opus/fr-1:work.txt") == "uncommitted work"

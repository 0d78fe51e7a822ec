"""Edge cases of the core found by a review: crashes at awkward moments, notes that are
briefly unreadable or renamed, a person's controls racing a stage, spend of failed attempts,
archived history, and preemption's exact rule.

Each drives real things: a real vault, a real git repo, the scripted agents as child
processes through ``opus run --once``, or the library with ScriptedAgent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from opus.orchestrator import Orchestrator, ScriptedAgent, StageResult, Status, load_config
from opus.orchestrator.agents.base import StageContext
from opus.orchestrator.views import set_status

from .conftest import Vault, git
from .test_cli_basics import meta, opus
from .test_pipeline_flow import fr


def jobs(vault: Vault) -> list[dict[str, Any]]:
    return json.loads((vault.state / "registry.json").read_text())["jobs"]  # type: ignore[no-any-return]


def job_of(vault: Vault, fr_id: str) -> dict[str, Any]:
    return [j for j in jobs(vault) if j["fr_id"] == fr_id][-1]


def run_once(vault: Vault) -> None:
    code, out = opus(vault, "run", "--once")
    assert code == 0, out


# -- recovery: a crash between a stage's checkpoint and the job's final status -----------------

#: ``opus run --once`` through the library, killed hard (os._exit) right after the registry
#: save and note write of the checkpoint named on the command line: a crash at that point.
CRASH = """
import os, sys, anyio
from opus.orchestrator import Orchestrator, load_config
config, stage, outcome = sys.argv[1:4]
def hook(job):
    last = job.last
    if last and last.stage == stage and last.outcome == outcome and job.status == "in-progress":
        os._exit(17)
async def main():
    async with Orchestrator(load_config(config), on_change=hook) as orch:
        await orch.run_once()
anyio.run(main)
"""


def crash_after_checkpoint(vault: Vault, stage: str, outcome: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CRASH, str(vault.config), stage, outcome],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 17, done.stderr


async def restart_once(vault: Vault) -> bool:
    """A fresh ``run_once``; False if it had not returned within a few seconds."""
    async with Orchestrator(load_config(vault.config)) as orch:
        with anyio.move_on_after(4):
            await orch.run_once()
            return True
    return False


@pytest.mark.anyio
async def test_crash_after_the_delivery_checkpoint_is_recovered_to_review(vault: Vault) -> None:
    note = fr(vault, "FR-1")
    crash_after_checkpoint(vault, "delivery", "ok")
    assert await restart_once(vault), "run_once never returned"
    assert meta(note)["status"] == "review"
    assert job_of(vault, "FR-1")["status"] == "review"


@pytest.mark.anyio
async def test_crash_after_a_failed_stage_is_recovered_to_failed(vault: Vault) -> None:
    vault.write_config(pipeline="stage_timeout = 60\nstall_timeout = 30\nretries = 0")
    vault.script({"FR-1": {"planner": [{"exit": 1}]}})
    note = fr(vault, "FR-1")
    crash_after_checkpoint(vault, "planner", "error")
    assert await restart_once(vault), "run_once never returned"
    assert meta(note)["status"] == "failed"
    assert len(vault.runs("planner")) == 1  # the failed stage is not run again


def test_crash_between_registry_and_note_after_a_merge_is_repaired(vault: Vault) -> None:
    note = fr(vault, "FR-1")
    run_once(vault)
    opus(vault, "approve", "FR-1")
    before = note.read_bytes()
    run_once(vault)
    assert job_of(vault, "FR-1")["status"] == "done"
    # what a crash after Registry.save and before the note's write leaves on disk
    note.write_bytes(before)
    run_once(vault)
    assert meta(note)["status"] == "done"


# -- a person's controls --------------------------------------------------------------------


@pytest.mark.anyio
async def test_resume_before_the_boundary_cancels_a_requested_pause(vault: Vault) -> None:
    started, gate = anyio.Event(), anyio.Event()

    async def coder(ctx: StageContext) -> StageResult:
        started.set()
        await gate.wait()
        (ctx.worktree / "x.txt").write_text("x\n")
        return StageResult(output="wrote x.txt")

    config = load_config(vault.config)
    note = fr(vault, "FR-1")
    agents: dict[str, Any] = {"coder": ScriptedAgent(coder)}
    for stage in ("planner", "tester", "reviewer"):
        agents[stage] = ScriptedAgent()
    async with Orchestrator(config, agents=agents) as orch, anyio.create_task_group() as tg:
        with anyio.fail_after(20):
            await orch.tick(tg)
            await started.wait()
            set_status(config, "FR-1", Status.PAUSED, None)
            await orch.tick(tg)  # the pause is requested for the next boundary
            set_status(config, "FR-1", Status.PLANNED, None)
            await orch.tick(tg)  # … and taken back before it was reached
            gate.set()
            while orch.scheduler.running:
                await orch.scheduler.finished.wait()
            await orch.tick(tg)
            while orch.scheduler.running:
                await orch.scheduler.finished.wait()
    assert meta(note)["status"] == "review"


# -- the "note left the planned folder" inference --------------------------------------------


def queued_behind_fr0(vault: Vault) -> Path:
    """FR-0 in review, FR-1 queued behind it (depends_on)."""
    fr(vault, "FR-0")
    note = fr(vault, "FR-1", extra="depends_on: [FR-0]\n")
    run_once(vault)
    assert meta(note)["status"] == "queued"
    return note


def test_a_paused_job_survives_a_momentarily_broken_note(vault: Vault) -> None:
    note = queued_behind_fr0(vault)
    opus(vault, "pause", "FR-1")
    run_once(vault)
    assert job_of(vault, "FR-1")["status"] == "paused"
    good = note.read_text()
    note.write_text(good.replace("---\n# Thing", "oops: [unclosed\n---\n# Thing"))
    run_once(vault)  # the note is reported as a problem …
    note.write_text(good)  # … and fixed
    assert job_of(vault, "FR-1")["status"] == "paused"


def test_queued_jobs_survive_a_planned_folder_that_is_briefly_missing(vault: Vault) -> None:
    note = queued_behind_fr0(vault)
    away = vault.planned.with_name("03_planned.syncing")
    os.replace(vault.planned, away)
    run_once(vault)
    os.replace(away, vault.planned)
    assert job_of(vault, "FR-1")["status"] == "queued"
    assert meta(note)["status"] == "queued"


def test_a_note_renamed_inside_the_planned_folder_keeps_being_updated(vault: Vault) -> None:
    note = queued_behind_fr0(vault)
    renamed = note.with_name("FR-1 a better name.md")
    os.replace(note, renamed)
    opus(vault, "approve", "FR-0")
    run_once(vault)
    assert job_of(vault, "FR-1")["status"] == "review"
    assert meta(renamed)["status"] == "review"


# -- budget -----------------------------------------------------------------------------------

EXPENSIVE = {"input_tokens": 1000, "output_tokens": 100, "cost_usd": 5.0}


def test_the_cost_of_a_failed_attempt_counts_against_the_budget(vault: Vault) -> None:
    vault.write_config(
        pipeline="stage_timeout = 60\nstall_timeout = 30\nretries = 0",
        budget="daily_usd = 1",
    )
    # the reviewer spends $5 and then gives no verdict: a failed attempt
    vault.script({"FR-1": {"reviewer": [{"usage": EXPENSIVE}]}})
    first = fr(vault, "FR-1")
    run_once(vault)
    assert meta(first)["status"] == "failed"
    second = fr(vault, "FR-2")
    run_once(vault)
    assert meta(second)["status"] == "queued"  # $5 of $1 spent today


def test_archiving_does_not_reset_the_monthly_budget(vault: Vault) -> None:
    vault.write_config(state="keep_days = 0", budget="monthly_usd = 1")
    reviewer = {"verdict": {"verdict": "approve", "confidence": 95}, "usage": EXPENSIVE}
    vault.script({"FR-1": {"reviewer": [reviewer]}})
    first = fr(vault, "FR-1", extra="approval: auto\n")
    run_once(vault)
    assert meta(first)["status"] == "done"
    second = fr(vault, "FR-2")
    run_once(vault)
    assert meta(second)["status"] == "queued"  # $5 of $1 spent this month


def test_opus_show_finds_an_archived_job_and_status_keeps_the_notes_iteration(
    vault: Vault,
) -> None:
    from click.testing import CliRunner

    from opus.cli import main

    vault.write_config(state="keep_days = 0")
    note = fr(vault, "FR-1", extra="approval: auto\n")
    run_once(vault)
    assert meta(note)["status"] == "done"
    run_once(vault)  # archives the finished job (older than keep_days = 0)
    assert json.loads((vault.state / "registry.json").read_text())["jobs"] == []
    config = ["--config", str(vault.config)]
    shown = CliRunner().invoke(main, ["show", "FR-1", "--json", *config])
    assert shown.exit_code == 0, shown.output
    job = json.loads(shown.stdout)["job"]
    assert job["status"] == "done" and job["history"][-1]["stage"] == "delivery"
    status = CliRunner().invoke(main, ["status", "--json", *config])
    (row,) = json.loads(status.stdout)
    assert (row["status"], row["iteration"], row["job_id"]) == ("done", 1, job["id"])


# -- dependencies -----------------------------------------------------------------------------


def test_a_dependency_that_is_done_and_archived_still_counts(vault: Vault) -> None:
    vault.write_config(state="keep_days = 0")
    first = fr(vault, "FR-1", extra="approval: auto\n")
    run_once(vault)
    assert meta(first)["status"] == "done"
    done_dir = vault.root / "10_features" / "04_done"
    done_dir.mkdir()
    os.replace(first, done_dir / first.name)  # the person files the finished note away
    second = fr(vault, "FR-2", extra="depends_on: [FR-1]\n")
    run_once(vault)
    assert meta(second)["status"] == "review"
    assert "FR-2.txt" in git(vault.repo, "ls-tree", "--name-only", "opus/fr-2")


# -- preemption -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_no_preemption_while_a_slot_holds_a_job_that_outranks_the_waiting_one(
    vault: Vault,
) -> None:
    vault.write_config(pipeline="concurrency = 2\nstage_timeout = 60\nretries = 0")
    started = {"FR-A": anyio.Event(), "FR-B": anyio.Event()}
    gates = {"FR-A": anyio.Event(), "FR-B": anyio.Event()}

    async def coder(ctx: StageContext) -> StageResult:
        if ctx.fr.id in gates:
            started[ctx.fr.id].set()
            await gates[ctx.fr.id].wait()
        (ctx.worktree / f"{ctx.fr.id}.txt").write_text("x\n")
        return StageResult(output="wrote it")

    agents: dict[str, Any] = {"coder": ScriptedAgent(coder)}
    for stage in ("planner", "tester", "reviewer"):
        agents[stage] = ScriptedAgent()
    fr(vault, "FR-A", "critical")
    fr(vault, "FR-B", "low")
    config = load_config(vault.config)
    async with Orchestrator(config, agents=agents) as orch, anyio.create_task_group() as tg:
        with anyio.fail_after(20):
            await orch.tick(tg)
            await started["FR-A"].wait()
            await started["FR-B"].wait()
            fr(vault, "FR-C", "high")  # waits: one slot holds a critical job
            await orch.tick(tg)
            gates["FR-B"].set()
            low = orch.rt.registry.latest_for("FR-B")
            assert low is not None
            while low.id in orch.scheduler.running:
                await orch.scheduler.finished.wait()
            low_status = low.status
            gates["FR-A"].set()
            while orch.scheduler.running:
                await orch.scheduler.finished.wait()
    assert low_status is Status.REVIEW  # it was not made to yield its slot


N_BATCH = 80
"""Enough FRs that, without care, all three running pipelines end inside one tick."""


@pytest.mark.anyio
async def test_a_batch_longer_than_the_slots_runs_to_the_end(vault: Vault) -> None:
    """Instant pipelines may finish while a tick still writes the waiting FRs' notes: the
    batch goes on until every FR rests (80 FRs, 3 slots, in-process agents)."""
    vault.write_config(pipeline="concurrency = 3\nstage_timeout = 60\nretries = 0")

    def coder(ctx: StageContext) -> StageResult:
        (ctx.worktree / f"{ctx.fr.id}.txt").write_text("done\n")
        return StageResult()

    agents: dict[str, Any] = {"coder": ScriptedAgent(coder)}
    for stage in ("planner", "tester", "reviewer"):
        agents[stage] = ScriptedAgent()
    for i in range(N_BATCH):
        fr(vault, f"FR-{i}")
    async with Orchestrator(load_config(vault.config), agents=agents) as orch:
        summary = await orch.run_once()
    assert summary.statuses == {f"FR-{i}": "review" for i in range(N_BATCH)}

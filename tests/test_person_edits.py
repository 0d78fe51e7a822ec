"""A person's status edits (SPEC §2.3, §2.4): an edit made while the job runs is acted on
once the job comes to rest, never overwritten; an edit opus cannot act on is answered (the
note shows the job again, the log says why), never a second job beside the first."""

from __future__ import annotations

from typing import Any

import pytest

from opus.orchestrator import StageContext
from opus.orchestrator.agents.fake import ScriptedAgent, writes
from opus.orchestrator.config import load_config
from opus.orchestrator.lifecycle import Status
from opus.orchestrator.service import Orchestrator

from .conftest import Vault, git
from .test_cli_basics import meta, opus
from .test_pipeline_flow import fr, registry
from .test_rework import set_keys


def approving(edit: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """A reviewer that approves; while it runs, a person edits the note (``edit``)."""

    async def review(ctx: StageContext) -> dict[str, Any]:
        if edit is not None:
            set_keys(ctx.fr.path, **edit)
        return {"verdict": "approve", "confidence": 90, "summary": "ok", "issues": []}

    return review


def agents(**over: Any) -> dict[str, Any]:
    found = {s: ScriptedAgent() for s in ("planner", "tester")}
    return {
        "coder": ScriptedAgent(writes({"x.txt": "x\n"})),
        "reviewer": approving(),
        **found,
        **over,
    }


@pytest.mark.anyio
async def test_an_approval_written_while_the_job_runs_merges_nothing_and_is_answered(
    vault: Vault, caplog: pytest.LogCaptureFixture
) -> None:
    """A manual approval must never merge work no person could see (SPEC §7): `approved`
    written while the job runs stays in the note while it runs, then the job's `review`
    replaces it and the log says to approve again (it merged, unreviewed, before)."""
    note = fr(vault, "FR-1")
    config = load_config(vault.config)
    async with Orchestrator(config, agents=agents(reviewer=approving({"status": "approved"}))) as o:
        job = await o.process("FR-1")
    assert job.status is Status.REVIEW and meta(note)["status"] == "review"
    assert "`approved`, written before there was a result to judge, is not acted on" in (
        caplog.text
    )
    assert git(vault.repo, "branch", "--list", "main", "--contains", "opus/fr-1") == ""
    set_keys(note, status="approved")  # now there is a branch to see
    async with Orchestrator(config, agents=agents()) as o:
        await o.run_once()
    assert meta(note)["status"] == "done" and git(vault.repo, "show", "main:x.txt") == "x"


@pytest.mark.anyio
async def test_changes_requested_while_the_job_runs_starts_a_round_when_it_rests(
    vault: Vault,
) -> None:
    note = fr(vault, "FR-1")
    edit = {"status": "changes-requested", "feedback": "Name it y.txt."}

    feedback: list[str | None] = []

    async def coder(ctx: StageContext) -> None:
        if ctx.round == 1:
            set_keys(ctx.fr.path, **edit)  # asked while round 1's coder runs
        feedback.append(ctx.feedback.message if ctx.feedback else None)
        (ctx.worktree / "x.txt").write_text(f"round {ctx.round}\n")

    config = load_config(vault.config)
    async with Orchestrator(config, agents=agents(coder=coder)) as o:
        job = await o.process("FR-1")
    # the tester's and reviewer's progress and the delivery kept the person's request:
    # once round 1 rested in review, round 2 ran with the feedback
    assert (job.status, job.round) == (Status.REVIEW, 2)
    assert feedback == [None, "Name it y.txt."]
    m = meta(note)
    assert (m["status"], m["round"], m["feedback"]) == ("review", 2, "Name it y.txt.")
    (only,) = registry(vault)
    assert only["round"] == 2
    assert git(vault.repo, "show", "opus/fr-1:x.txt") == "round 2"


def test_planned_on_an_fr_in_review_starts_no_second_job(
    vault: Vault, caplog: pytest.LogCaptureFixture
) -> None:
    note = fr(vault, "FR-1")
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(note)["status"] == "review"
    for value in ("planned", "approve"):  # `approve`: a typo, read as planned
        set_keys(note, status=value)
        code, out = opus(vault, "run", "--once")
        assert code == 0, out
        assert meta(note)["status"] == "review"
        assert "changes-requested with feedback" in out
    assert len(registry(vault)) == 1
    assert len(vault.runs("planner")) == 1


def test_a_hand_written_done_does_not_release_a_dependant(vault: Vault) -> None:
    x = fr(vault, "FR-X")
    assert opus(vault, "run", "--once")[0] == 0
    y = fr(vault, "FR-Y", extra="depends_on: [FR-X]\n")
    set_keys(x, status="done")  # not merged: main holds none of FR-X's work
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(y)["status"] == "queued"
    assert meta(x)["status"] == "review"  # the job says review: the note shows it again
    assert [c["fr"] for c in vault.runs("planner")] == ["FR-X"]


def test_approved_on_a_failed_fr_is_answered_with_its_status(vault: Vault) -> None:
    vault.script({"FR-1": {"planner": [{"exit": 127}]}})
    note = fr(vault, "FR-1")
    assert opus(vault, "run", "--once")[0] == 0
    before = meta(note)
    assert before["status"] == "failed"
    set_keys(note, status="approved")
    _, out = opus(vault, "run", "--once")
    assert meta(note)["status"] == "failed" and meta(note)["error"] == before["error"]
    assert "approved: the FR is failed; set planned to retry it" in out


@pytest.mark.anyio
async def test_the_coder_of_an_approved_plan_runs_with_the_note_saying_in_progress(
    vault: Vault,
) -> None:
    vault.write_config(approval="plan = true")
    note = fr(vault, "FR-1")
    shown: list[dict[str, Any]] = []

    async def coder(ctx: StageContext) -> None:
        shown.append(meta(note))
        (ctx.worktree / "x.txt").write_text("x\n")

    async with Orchestrator(load_config(vault.config), agents=agents(coder=coder)) as o:
        await o.process("FR-1")
        assert meta(note)["status"] == "plan-review"
        set_keys(note, status="approved")
        await o.run_once()
    assert [(m["status"], m["stage"]) for m in shown] == [("in-progress", "coder")]
    assert meta(note)["status"] == "review"


def test_a_branch_merged_by_hand_then_deleted_is_done_and_one_deleted_unmerged_cancelled(
    vault: Vault,
) -> None:
    """Local delivery (SPEC §7): the merge is seen by the work being in the base, not by
    the branch's name (an FR whose branch was merged and deleted stayed in review, and
    `approved` then blocked on "branch not found")."""
    notes = {fr_id: fr(vault, fr_id) for fr_id in ("FR-1", "FR-2", "FR-3")}
    assert opus(vault, "run", "--once")[0] == 0
    jobs = {j["fr_id"]: j for j in registry(vault)}

    def drop(fr_id: str, *, merge: bool) -> None:
        branch = f"opus/{fr_id.lower()}"
        if merge:
            git(vault.repo, "merge", "-q", "--no-ff", "-m", f"merge {fr_id}", branch)
        git(
            vault.repo,
            "worktree",
            "remove",
            "--force",
            str(vault.state / "worktrees" / jobs[fr_id]["id"]),
        )
        git(vault.repo, "branch", "-D", branch)

    drop("FR-1", merge=True)
    drop("FR-2", merge=False)
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(notes["FR-1"])["status"] == "done"
    assert meta(notes["FR-2"])["status"] == "cancelled"
    assert meta(notes["FR-3"])["status"] == "review"
    drop("FR-3", merge=True)
    set_keys(notes["FR-3"], status="approved")  # approved before opus looked again
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(notes["FR-3"])["status"] == "done", meta(notes["FR-3"])


def test_opus_approve_refuses_an_fr_blocked_by_its_pipeline(vault: Vault) -> None:
    """`opus approve` retries a refused merge; on an FR the loop blocked it printed
    "blocked → approved", and the next run quietly put it back."""
    verdict = {"verdict": "request_changes", "confidence": 40, "summary": "Not yet."}
    vault.script({"FR-1": {"reviewer": [{"verdict": verdict}]}})
    note = fr(vault, "FR-1")
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(note)["status"] == "blocked"
    code, out = opus(vault, "approve", "FR-1")
    assert code == 1, out
    assert "FR-1 is blocked by its pipeline, not by a refused merge" in out
    assert "`opus retry FR-1` runs it again" in out
    assert meta(note)["status"] == "blocked"


@pytest.mark.anyio
async def test_an_approval_given_before_the_plan_exists_does_not_pass_the_plan_gate(
    vault: Vault,
) -> None:
    """SPEC §16: the job stops at plan-review; a person *then* approves the plan."""
    vault.write_config(approval="plan = true")
    note = fr(vault, "FR-1")
    coders: list[int] = []

    async def planner(ctx: StageContext) -> str:
        set_keys(ctx.fr.path, status="approved")  # before any plan was there to see
        return "# Plan\n\n1. Do x.\n"

    async def coder(ctx: StageContext) -> None:
        coders.append(ctx.iteration)
        (ctx.worktree / "x.txt").write_text("x\n")

    config = load_config(vault.config)
    async with Orchestrator(config, agents=agents(planner=planner, coder=coder)) as o:
        job = await o.process("FR-1")
        await o.run_once()
    assert (job.status, meta(note)["status"], coders) == (Status.PLAN_REVIEW, "plan-review", [])


@pytest.mark.anyio
async def test_a_conflict_round_keeps_the_persons_request_made_while_the_job_ran(
    vault: Vault,
) -> None:
    """The base moved under round 1, so delivery started a conflict round; the person's
    changes-requested written meanwhile is acted on after it, not overwritten by it."""
    fr(vault, "FR-1")
    seen: list[tuple[int, str | None]] = []

    async def coder(ctx: StageContext) -> None:
        seen.append((ctx.round, ctx.feedback.reason if ctx.feedback else None))
        if ctx.round == 1:
            set_keys(ctx.fr.path, status="changes-requested", feedback="Name it y.txt.")
            (vault.repo / "x.txt").write_text("main's\n")  # meanwhile, main changes x.txt
            git(vault.repo, "add", "x.txt")
            git(vault.repo, "commit", "-qm", "main moves")
        (ctx.worktree / "x.txt").write_text(f"round {ctx.round}\n")

    async with Orchestrator(load_config(vault.config), agents=agents(coder=coder)) as o:
        job = await o.process("FR-1")
    assert [r.source for r in job.rounds] == ["conflict", "person"], seen
    assert seen[-1] == (3, "rework") and job.status is Status.REVIEW


@pytest.mark.anyio
async def test_changes_requested_or_approved_on_a_paused_fr_is_answered(
    vault: Vault, caplog: pytest.LogCaptureFixture
) -> None:
    note = fr(vault, "FR-1")

    async def coder(ctx: StageContext) -> None:
        set_keys(ctx.fr.path, status="paused")  # it pauses at the next stage boundary
        (ctx.worktree / "x.txt").write_text("x\n")

    async with Orchestrator(load_config(vault.config), agents=agents(coder=coder)) as o:
        job = await o.process("FR-1")
        assert job.status is Status.PAUSED and meta(note)["status"] == "paused"
        for value in ("changes-requested", "approved"):
            set_keys(note, status=value, feedback="More.")
            await o.run_once()
            assert meta(note)["status"] == "paused", value  # answered, not kept for ever
            assert f"{value}: the FR is paused" in caplog.text


@pytest.mark.anyio
async def test_approving_a_merge_that_is_refused_again_shows_blocked_again(vault: Vault) -> None:
    """In a service (one process, polling), the second `approved` of a merge-blocked FR was
    retried at every poll, each time a `blocked` notification, while the note went on
    saying `approved`."""
    note = fr(vault, "FR-1")
    async with Orchestrator(load_config(vault.config), agents=agents()) as o:
        await o.run_once()
        (vault.repo / "README.md").write_text("# a person's unsaved work\n")
        for attempt in (1, 2):
            set_keys(note, status="approved")
            await o.run_once()
            m = meta(note)
            assert (m["status"], attempt) == ("blocked", attempt)
            assert "uncommitted changes" in str(m["error"])


def test_planned_or_a_typo_on_a_done_fr_starts_no_second_pipeline(vault: Vault) -> None:
    note = fr(vault, "FR-1", extra="approval: auto\n")
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(note)["status"] == "done"
    for value in ("planned", "aproved"):
        set_keys(note, status=value)
        _, out = opus(vault, "run", "--once")
        assert meta(note)["status"] == "done" and "it is merged" in out, out
    assert len(vault.runs("planner")) == 1 and len(registry(vault)) == 1

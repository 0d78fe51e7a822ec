"""Rework rounds (SPEC §15): a person's feedback, the round cap, and the Trigger seam."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anyio
import pytest

from opus.orchestrator.config import load_config
from opus.orchestrator.lifecycle import Status
from opus.orchestrator.reactions import Trigger
from opus.orchestrator.service import Orchestrator

from .conftest import Vault, git
from .test_cli_basics import meta, opus
from .test_pipeline_flow import fr, registry


def set_keys(note: Path, **keys: str) -> None:
    """A person's edit: set top-level frontmatter keys (as an editor would)."""
    head, _, body = note.read_text().partition("\n---\n")
    lines = [ln for ln in head.splitlines() if ln.split(":")[0] not in keys]
    lines += [f"{k}: {json.dumps(v)}" for k, v in keys.items()]
    note.write_text("\n".join(lines) + "\n---\n" + body)


def job_dir(vault: Vault) -> Path:
    (job,) = registry(vault)
    return vault.state / "jobs" / str(job["id"])


def test_a_persons_feedback_runs_a_round_on_the_same_branch(vault: Vault) -> None:
    note = fr(vault, "FR-1")
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    assert meta(note)["status"] == "review" and "round" not in meta(note)
    set_keys(note, status="changes-requested", feedback="Rename the file's greeting to `hi`.")
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    m = meta(note)
    assert m["status"] == "review" and m["round"] == 2, m
    assert m["feedback"] == "Rename the file's greeting to `hi`."  # a person's key stays
    assert "stage" not in m and m["iteration"] == 1  # (the pass the round ended in)
    coders = vault.runs("coder")
    assert [(c["round"], c["iteration"]) for c in coders] == [(1, 1), (2, 1)]
    assert len(vault.runs("planner")) == 1  # a round never re-plans
    feedback = json.loads(Path(coders[1]["feedback"]).read_text())
    assert feedback["reason"] == "rework" and feedback["source"] == "person"
    assert feedback["message"] == "Rename the file's greeting to `hi`."
    folder = job_dir(vault)
    prompt = (folder / "prompt-coder-r2-1.md").read_text()
    assert "## Rework round 2: what to change (person)" in prompt
    assert "Rename the file's greeting to `hi`." in prompt
    # every round's artifacts side by side, none overwritten
    for name in ("coder-1.log", "coder-r2-1.log", "tester-r2-1.log", "review-1.json"):
        assert (folder / name).exists(), name
    assert (folder / "review-r2-1.json").exists()
    assert "round 2 · iteration 1 · reviewer: ok" in (folder / "pr.md").read_text()
    # the same branch, one commit per round, each saying which
    assert git(vault.repo, "log", "--format=%s", "main..opus/fr-1").splitlines() == [
        "opus(FR-1): coder, round 2, iteration 1",
        "opus(FR-1): coder, iteration 1",
    ]
    assert git(vault.repo, "show", "opus/fr-1:FR-1.txt") == "change of round 2, iteration 1"
    (job,) = registry(vault)
    assert job["round"] == 2 and job["status"] == "review"
    assert [(c["round"], c["stage"]) for c in job["history"]][-4:] == [
        (2, "coder"),
        (2, "tester"),
        (2, "reviewer"),
        (2, "delivery"),
    ]
    assert [r["source"] for r in job["rounds"]] == ["person"]
    # and a person approves the reworked branch
    code, out = opus(vault, "approve", "FR-1")
    assert code == 0, out
    code, out = opus(vault, "run", "--once")
    assert meta(note)["status"] == "done"
    assert git(vault.repo, "show", "main:FR-1.txt") == "change of round 2, iteration 1"


def test_changes_requested_without_feedback_says_what_is_missing(vault: Vault) -> None:
    note = fr(vault, "FR-1")
    assert opus(vault, "run", "--once")[0] == 0
    set_keys(note, status="changes-requested")
    assert opus(vault, "run", "--once")[0] == 0
    m = meta(note)
    assert m["status"] == "review"
    assert "feedback" in str(m["error"])
    assert len(vault.runs("coder")) == 1


def test_the_round_after_max_rounds_blocks_with_the_trigger(vault: Vault) -> None:
    vault.write_config(reactions="max_rounds = 2")
    note = fr(vault, "FR-1")
    assert opus(vault, "run", "--once")[0] == 0
    set_keys(note, status="changes-requested", feedback="First request.")
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(note)["round"] == 2 and meta(note)["status"] == "review"
    set_keys(note, status="changes-requested", feedback="Second request: more.")
    code, out = opus(vault, "run", "--once", "--log-format", "journal")
    assert code == 0
    assert "<4>warning: FR-1: blocked: max_rounds (2) used up" in out  # SPEC §20: not info
    m = meta(note)
    assert m["status"] == "blocked", m
    assert m["error"] == "max_rounds (2) used up; person: Second request: more."
    assert len(vault.runs("coder")) == 2  # no third round ran
    events = [
        json.loads(line)["event"]
        for line in (job_dir(vault) / "events.jsonl").read_text().splitlines()
    ]
    assert events.count("round") == 1 and events[-1] == "blocked"


@pytest.mark.anyio
async def test_the_trigger_seam_dedupes_by_keys_also_after_a_restart(vault: Vault) -> None:
    note = fr(vault, "FR-1")
    config = load_config(vault.config)
    review = Trigger(source="github-review", feedback="## Review\n\nUse a constant.", keys=("r:1",))
    async with Orchestrator(config) as orch:
        await orch.run_once()
        (job,) = orch.rt.registry.jobs()
        assert job.status is Status.REVIEW
        assert await orch.scheduler.rounds.start(job, review) is Status.QUEUED
        await orch.run_once()
        assert job.status is Status.REVIEW and job.round == 2
    async with Orchestrator(config) as orch:
        (job,) = orch.rt.registry.jobs()
        assert job.reacted == ["r:1"]
        assert await orch.scheduler.rounds.start(job, review) is None  # acted on already
        assert job.status is Status.REVIEW and job.round == 2
        again = Trigger(source="github-comment", feedback="x", keys=("r:1", "c:7"))
        assert await orch.scheduler.rounds.start(job, again) is Status.QUEUED
        assert job.round == 3 and job.reacted == ["r:1", "c:7"]
    assert meta(note)["round"] == 3
    artifact = (job_dir(vault) / "trigger-r2.md").read_text()
    assert re.search(r"Use a constant\.", artifact)
    await anyio.lowlevel.checkpoint()


SHARED = {"write": {"shared.txt": "{fr} was here\n"}}


def two_in_review(vault: Vault, resolve: list[dict[str, object]]) -> tuple[Path, Path]:
    """FR-1 and FR-2 both change shared.txt; both end in review; FR-1 is then merged, and
    FR-2, still in review, no longer merges cleanly: the poll that sees it (SPEC §7), with
    no approval, starts its conflict round."""
    vault.script({"*": {"coder": [SHARED], "coder@2": resolve}})
    one, two = fr(vault, "FR-1"), fr(vault, "FR-2")
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(one)["status"] == meta(two)["status"] == "review"
    assert opus(vault, "approve", "FR-1")[0] == 0
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(one)["status"] == "done"
    assert opus(vault, "run", "--once")[0] == 0  # (a poll after the merge, if it took one)
    return one, two


def test_a_base_that_moved_under_an_fr_in_review_gets_a_conflict_round(vault: Vault) -> None:
    resolved = {"write": {"shared.txt": "FR-1 was here\nFR-2 was here\n"}}
    _, two = two_in_review(vault, [resolved])
    m = meta(two)
    assert m["status"] == "review" and m["round"] == 2, m
    (coder,) = vault.runs("coder", "FR-2")[1:]
    feedback = json.loads(Path(coder["feedback"]).read_text())
    assert feedback["source"] == "conflict"
    assert "conflicts in shared.txt" in feedback["message"]
    jobs = [j for j in registry(vault) if j["fr_id"] == "FR-2"]
    folder = vault.state / "jobs" / str(jobs[0]["id"])
    assert "- `shared.txt`" in (folder / "prompt-coder-r2-1.md").read_text()
    # the coder's commit concludes the merge of the base into the branch
    parents = git(vault.repo, "log", "-1", "--format=%P", "opus/fr-2").split()
    assert len(parents) == 2 and git(vault.repo, "rev-parse", "main") in parents
    assert opus(vault, "approve", "FR-2")[0] == 0
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(two)["status"] == "done"
    assert git(vault.repo, "show", "main:shared.txt") == "FR-1 was here\nFR-2 was here"


def test_conflict_markers_are_never_committed(vault: Vault) -> None:
    leave_markers: dict[str, object] = {"stdout": "done (not really)"}
    resolved = {"write": {"shared.txt": "both\n"}}
    _, two = two_in_review(vault, [leave_markers, resolved])
    assert meta(two)["status"] == "review"
    _, second = vault.runs("coder", "FR-2")[1:]
    feedback = json.loads(Path(second["feedback"]).read_text())
    assert feedback["reason"] == "conflict_markers"
    assert "conflict markers left in: shared.txt" in feedback["message"]
    log = git(vault.repo, "log", "--format=%s", "main..opus/fr-2").splitlines()
    assert log[0] == "opus(FR-2): coder, round 2, iteration 2"  # iteration 1 committed nothing
    for rev in git(vault.repo, "rev-list", "main..opus/fr-2").split():
        assert "<<<<<<<" not in git(vault.repo, "show", f"{rev}:shared.txt")
    assert git(vault.repo, "show", "opus/fr-2:shared.txt") == "both"


def test_the_conflict_cap_blocks_with_the_conflicting_paths(vault: Vault) -> None:
    vault.write_config(reactions="max_rounds = 1")
    _, two = two_in_review(vault, [SHARED])
    m = meta(two)
    assert m["status"] == "blocked"
    assert "max_rounds (1) used up; conflict:" in str(m["error"])
    assert "shared.txt" in str(m["error"])


def test_a_dirty_base_checkout_blocks_and_approved_retries_the_merge_alone(vault: Vault) -> None:
    note = fr(vault, "FR-1")
    assert opus(vault, "run", "--once")[0] == 0
    (vault.repo / "README.md").write_text("# a person's unsaved work\n")
    assert opus(vault, "approve", "FR-1")[0] == 0
    assert opus(vault, "run", "--once")[0] == 0
    m = meta(note)
    assert m["status"] == "blocked"
    assert "uncommitted changes" in str(m["error"]), m
    calls = len(vault.calls())
    git(vault.repo, "checkout", "--", "README.md")
    code, out = opus(vault, "approve", "FR-1")
    assert code == 0, out
    assert opus(vault, "run", "--once")[0] == 0
    m = meta(note)
    assert m["status"] == "done" and "error" not in m, m
    assert len(vault.calls()) == calls  # no agent ran: the merge alone
    assert git(vault.repo, "show", "main:FR-1.txt") == "change of iteration 1"
    (job,) = registry(vault)
    assert [c["stage"] for c in job["history"]][-1] == "delivery"


def test_update_rebase_replays_the_branch_onto_the_base(vault: Vault) -> None:
    vault.write_config(reactions='update = "rebase"')
    resolved = {"write": {"shared.txt": "FR-1 was here\nFR-2 was here\n"}}
    _, two = two_in_review(vault, [resolved])
    assert meta(two)["status"] == "review" and meta(two)["round"] == 2
    (coder,) = vault.runs("coder", "FR-2")[1:]
    assert "rebased onto `main`" in json.loads(Path(coder["feedback"]).read_text())["message"]
    # one commit on top of the base: no merge commit
    assert git(vault.repo, "rev-list", "--count", "main..opus/fr-2") == "1"
    assert len(git(vault.repo, "log", "-1", "--format=%P", "opus/fr-2").split()) == 1
    assert git(vault.repo, "merge-base", "main", "opus/fr-2") == git(
        vault.repo, "rev-parse", "main"
    )
    assert opus(vault, "approve", "FR-2")[0] == 0
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(two)["status"] == "done"


def test_opus_rework_sets_feedback_and_changes_requested(vault: Vault) -> None:
    note = fr(vault, "FR-1")
    code, out = opus(vault, "rework", "FR-1", "-m", "too early")
    assert code == 1 and "rework needs review or plan-review" in out
    assert opus(vault, "run", "--once")[0] == 0
    code, out = opus(vault, "rework", "FR-1", "-m", "Use **bold** here.")
    assert code == 0, out
    assert "FR-1: review → changes-requested" in out
    m = meta(note)
    assert (m["status"], m["feedback"]) == ("changes-requested", "Use **bold** here.")
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(note)["round"] == 2
    code, out = opus(vault, "show", "FR-1")
    assert "2: person — Use **bold** here." in out
    code, out = opus(vault, "status", "--json")
    (row,) = json.loads(out)
    assert row["round"] == 2


def test_a_round_recreates_a_removed_worktree_on_the_same_branch(vault: Vault) -> None:
    note = fr(vault, "FR-1")
    assert opus(vault, "run", "--once")[0] == 0
    (job,) = registry(vault)
    git(vault.repo, "worktree", "remove", "--force", str(vault.state / "worktrees" / job["id"]))
    set_keys(note, status="changes-requested", feedback="again")
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(note)["status"] == "review" and meta(note)["branch"] == "opus/fr-1"
    assert git(vault.repo, "rev-list", "--count", "main..opus/fr-1") == "2"


def test_opus_logs_shows_the_latest_rounds_log(vault: Vault) -> None:
    vault.script({"FR-1": {"coder": [{"stdout": "first round", **SHARED}]}})
    note = fr(vault, "FR-1")
    assert opus(vault, "run", "--once")[0] == 0
    set_keys(note, status="changes-requested", feedback="again")
    vault.script({"FR-1": {"coder@2": [{"stdout": "second round", "write": {"x": "y"}}]}})
    assert opus(vault, "run", "--once")[0] == 0
    code, out = opus(vault, "logs", "FR-1", "--stage", "coder")
    assert code == 0, out
    assert "second round" in out and "first round" not in out

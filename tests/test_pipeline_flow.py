"""The full pipeline through the real CLI: feedback loop, blocking, approval, merges,
dependencies, retry and a person's controls (SPEC §3, §7, §2.3)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .conftest import Vault, git
from .test_cli_basics import meta, opus

FR = "---\nid: {id}\ntitle: Thing {id}\npriority: {priority}\n{extra}---\n# Thing\n\nDo {id}.\n"


def fr(vault: Vault, fr_id: str, priority: str = "medium", extra: str = "") -> Path:
    return vault.note(f"{fr_id}.md", FR.format(id=fr_id, priority=priority, extra=extra))


def registry(vault: Vault) -> list[dict[str, object]]:
    return json.loads((vault.state / "registry.json").read_text())["jobs"]  # type: ignore[no-any-return]


def test_failing_tests_feed_back_to_the_coder(vault: Vault) -> None:
    vault.script(
        {"FR-1": {"tester": [{"exit": 1, "stdout": "FAILED test_x - assert 1 == 2"}, {"exit": 0}]}}
    )
    note = fr(vault, "FR-1")
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    assert meta(note)["status"] == "review"
    coders = vault.runs("coder")
    assert [c["iteration"] for c in coders] == [1, 2]
    assert coders[0]["feedback"] is None
    feedback = json.loads(Path(coders[1]["feedback"]).read_text())
    assert feedback["reason"] == "tests_failed"
    assert "assert 1 == 2" in feedback["test_output"]
    assert [c["iteration"] for c in vault.runs("reviewer")] == [2]  # skipped in iteration 1
    (job,) = registry(vault)
    prompt = (vault.state / "jobs" / str(job["id"]) / "prompt-coder-2.md").read_text()
    assert "assert 1 == 2" in prompt
    assert git(vault.repo, "log", "--format=%s", "main..opus/fr-1").splitlines() == [
        "opus(FR-1): coder, iteration 2",
        "opus(FR-1): coder, iteration 1",
    ]


def test_review_rejection_then_approval(vault: Vault) -> None:
    reject = {
        "verdict": "request_changes",
        "confidence": 70,
        "summary": "Needs a test.",
        "issues": [{"severity": "major", "message": "add a test", "file": "x.py"}],
    }
    approve = {"verdict": "approve", "confidence": 93, "summary": "Good now."}
    vault.script({"FR-1": {"reviewer": [{"verdict": reject}, {"verdict": approve}]}})
    note = fr(vault, "FR-1")
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    assert meta(note)["status"] == "review"
    feedback = json.loads(Path(vault.runs("coder")[1]["feedback"]).read_text())
    assert feedback["reason"] == "changes_requested"
    assert feedback["issues"][0]["message"] == "add a test"
    (job,) = registry(vault)
    folder = vault.state / "jobs" / str(job["id"])
    assert json.loads((folder / "review-1.json").read_text())["verdict"] == "request_changes"
    assert json.loads((folder / "review-2.json").read_text())["verdict"] == "approve"
    assert [(c["stage"], c["iteration"], c["outcome"]) for c in job["history"]][-3:] == [
        ("tester", 2, "ok"),
        ("reviewer", 2, "ok"),
        ("delivery", 2, "ok"),
    ]


def test_blocked_after_exactly_max_iterations(vault: Vault) -> None:
    reject = {
        "verdict": "request_changes",
        "confidence": 50,
        "summary": "Still wrong.",
        "issues": [{"severity": "blocker", "message": "wrong answer"}],
    }
    vault.script({"FR-1": {"reviewer": [{"verdict": reject}],
                           "tester": [{"exit": 0, "stdout": "3 passed in 0.1s"}]}})  # fmt: skip
    told = vault.root.parent / "told.jsonl"
    notifier = f"import sys; open({str(told)!r}, 'a').write(sys.stdin.read() + '\\n')"
    command = json.dumps([sys.executable, "-c", notifier])
    vault.write_config(**{"[[notify]]": f'kind = "command"\ncommand = {command}'})
    note = fr(vault, "FR-1")
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    data = meta(note)
    assert data["status"] == "blocked"
    assert "reviewer still requests changes after 3 iterations" in str(data["error"])
    assert len(vault.runs("coder")) == 3
    assert "stage" not in data and data["iteration"] == 3  # SPEC §2.2: only stage goes at rest
    # SPEC §3: the person is told both sides, the last test output and the review issues
    (blocked,) = [e for e in map(json.loads, told.read_text().split("\n")[:-1])
                  if e["event"] == "blocked"]  # fmt: skip
    assert "3 passed in 0.1s" in blocked["details"]["test_output"]
    assert "wrong answer" in blocked["details"]["review_issues"]


def test_coder_that_changes_nothing_fails_the_iteration(vault: Vault) -> None:
    vault.script({"FR-1": {"coder": [{"stdout": "did nothing"}, {"write": {"a.txt": "now"}}]}})
    note = fr(vault, "FR-1")
    opus(vault, "run", "--once")
    assert meta(note)["status"] == "review"
    feedback = json.loads(Path(vault.runs("coder")[1]["feedback"]).read_text())
    assert feedback["reason"] == "no_changes"
    assert len(vault.runs("tester")) == 1
    (job,) = registry(vault)
    coder = [c for c in job["history"] if c["stage"] == "coder"]  # type: ignore[union-attr]
    assert [(c["outcome"], c["artifact"]) for c in coder] == [
        ("rejected", "coder-1.log"),  # SPEC §8: the stage's artifact, a rejected one's too
        ("ok", "coder-2.log"),
    ]


def test_a_failed_stage_checkpoint_names_its_log(vault: Vault) -> None:
    vault.script({"FR-1": {"coder": [{"exit": 3, "stdout": "segfault-ish"}]}})
    note = fr(vault, "FR-1")
    opus(vault, "run", "--once")
    assert meta(note)["status"] == "failed"
    (job,) = registry(vault)
    last = job["history"][-1]  # type: ignore[index]
    assert (last["stage"], last["outcome"], last["artifact"]) == ("coder", "error", "coder-1.log")
    log = vault.state / "jobs" / str(job["id"]) / "coder-1.log"
    assert "segfault-ish" in log.read_text()


def test_auto_approval_by_priority_and_confidence(vault: Vault) -> None:
    vault.write_config(approval='auto_priorities = ["low"]\nmin_confidence = 90')
    vault.script({"FR-2": {"reviewer": [{"verdict": {"verdict": "approve", "confidence": 80}}]}})
    low_sure = fr(vault, "FR-1", "low")
    low_unsure = fr(vault, "FR-2", "low")
    high = fr(vault, "FR-3", "high")
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    history = json.dumps(registry(vault), indent=1)
    assert meta(low_sure)["status"] == "done", history
    assert meta(low_unsure)["status"] == "review", history
    assert meta(high)["status"] == "review", history
    assert git(vault.repo, "show", "main:FR-1.txt") == "change of iteration 1", history
    assert not (vault.state / "worktrees" / str(meta(low_sure)["job_id"])).exists()
    assert "opus/fr-1" in git(vault.repo, "branch", "--list", "opus/fr-1")


def test_note_approval_auto_overrides_config(vault: Vault) -> None:
    note = fr(vault, "FR-1", extra="approval: auto\n")
    opus(vault, "run", "--once")
    assert meta(note)["status"] == "done"


def test_a_persons_merge_is_detected(vault: Vault) -> None:
    note = fr(vault, "FR-1")
    opus(vault, "run", "--once")
    assert meta(note)["status"] == "review"
    git(vault.repo, "merge", "-q", "--no-ff", "-m", "merge by a person", "opus/fr-1")
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    assert meta(note)["status"] == "done"


def test_approved_is_merged_into_base(vault: Vault) -> None:
    note = fr(vault, "FR-1")
    opus(vault, "run", "--once")
    code, out = opus(vault, "approve", "FR-1")
    assert code == 0, out
    assert meta(note)["status"] == "approved"
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    assert meta(note)["status"] == "done"
    assert git(vault.repo, "show", "main:FR-1.txt") == "change of iteration 1"


def test_approved_with_a_conflict_and_no_round_left_is_blocked_naming_the_paths(
    vault: Vault,
) -> None:
    vault.write_config(reactions="max_rounds = 1")  # else a round resolves it (test_rework)
    note = fr(vault, "FR-1")
    opus(vault, "run", "--once")
    (vault.repo / "FR-1.txt").write_text("a person's version\n")
    git(vault.repo, "add", "-A")
    git(vault.repo, "commit", "-q", "-m", "conflicting")
    opus(vault, "approve", "FR-1")
    opus(vault, "run", "--once")
    data = meta(note)
    assert data["status"] == "blocked"
    assert "FR-1.txt" in str(data["error"])
    assert git(vault.repo, "show", "main:FR-1.txt") == "a person's version"


def test_dependencies_wait_until_done(vault: Vault) -> None:
    first = fr(vault, "FR-1")
    second = fr(vault, "FR-2", extra="depends_on: [FR-1]\n")
    opus(vault, "run", "--once")
    assert meta(first)["status"] == "review"
    assert meta(second)["status"] == "queued"
    assert vault.runs("planner", "FR-2") == []
    opus(vault, "approve", "FR-1")
    opus(vault, "run", "--once")
    assert meta(first)["status"] == "done"
    assert meta(second)["status"] == "review"


def test_retry_starts_a_fresh_job(vault: Vault) -> None:
    vault.script({"FR-1": {"planner": [{"exit": 1}]}})
    note = fr(vault, "FR-1")
    opus(vault, "run", "--once")
    assert meta(note)["status"] == "failed"
    first_job = meta(note)["job_id"]
    vault.script({})
    code, out = opus(vault, "retry", "FR-1")
    assert code == 0, out
    opus(vault, "run", "--once")
    data = meta(note)
    assert data["status"] == "review" and data["job_id"] != first_job
    assert "error" not in data
    code, out = opus(vault, "retry", "FR-1")
    assert code == 1 and "review" in out


def test_metrics_and_show(vault: Vault) -> None:
    vault.script(
        {
            "*": {
                "reviewer": [
                    {
                        "verdict": {"verdict": "approve", "confidence": 91},
                        "usage": {"input_tokens": 1000, "output_tokens": 50, "cost_usd": 0.25},
                    }
                ]
            }
        }
    )
    fr(vault, "FR-1")
    opus(vault, "run", "--once")
    code, out = opus(vault, "show", "FR-1", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert [c["stage"] for c in data["job"]["history"]] == [
        "planner",
        "coder",
        "tester",
        "reviewer",
        "delivery",
    ]
    assert data["review"]["confidence"] == 91
    assert data["job"]["usage"]["cost_usd"] == 0.25
    code, out = opus(vault, "metrics", "--json")
    assert code == 0, out
    m = json.loads(out)
    assert m["jobs"] == 1 and m["success_rate"] == 1.0
    assert m["tokens"] == {"input": 1000, "output": 50} and m["cost_usd"] == 0.25
    assert m["iterations_per_job"]["mean"] == 1.0


def test_a_note_in_progress_that_no_job_claims_is_requeued(vault: Vault) -> None:
    note = fr(vault, "FR-1", extra="status: in-progress\nstage: coder\njob_id: lost-job\n")
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    data = meta(note)
    assert data["status"] == "review" and data["job_id"] != "lost-job"
    assert len(vault.runs("planner")) == 1


def test_a_stage_that_keeps_stalling_blocks_the_fr_and_says_stuck(
    vault: Vault, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    notifier = (
        "import json, os, sys; open(sys.argv[1], 'a').write(json.dumps("
        "{'event': os.environ['OPUS_EVENT'], 'message': os.environ['OPUS_MESSAGE']}) + '\\n')"
    )
    command = [sys.executable, "-c", notifier, str(events)]
    vault.write_config(
        pipeline="stage_timeout = 20\nstall_timeout = 0.5\nretries = 1",
        **{"[[notify]]": f'kind = "command"\ncommand = {json.dumps(command)}'},
    )
    vault.script({"FR-1": {"coder": [{"hang": True}]}})
    note = fr(vault, "FR-1")
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    data = meta(note)
    assert data["status"] == "blocked"
    assert "coder stalled repeatedly" in str(data["error"])
    starts = [c for c in vault.calls() if c["event"] == "start" and c["stage"] == "coder"]
    assert len(starts) == 2  # one retry
    sent = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["event"] for e in sent] == ["stuck", "stuck", "blocked"]


def test_a_dependency_that_cannot_come_is_named_in_the_note(vault: Vault) -> None:
    vault.script({"FR-1": {"planner": [{"exit": 1}]}})
    first = fr(vault, "FR-1")
    unknown = fr(vault, "FR-2", extra="depends_on: [FR-404]\n")
    after_failed = fr(vault, "FR-3", extra="depends_on: [FR-1]\n")
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    assert meta(first)["status"] == "failed"
    assert meta(unknown)["status"] == "queued"
    assert meta(unknown)["error"] == "depends_on: no FR FR-404 in the vault"
    assert meta(after_failed)["status"] == "queued"
    assert meta(after_failed)["error"] == "waits for FR-1, which is failed"
    # retrying the dependency clears the reason and lets the dependent run once it is done
    vault.script({})
    opus(vault, "retry", "FR-1")
    opus(vault, "run", "--once")
    assert meta(first)["status"] == "review"
    assert "error" not in meta(after_failed)


def test_the_dashboard_says_what_a_queued_fr_waits_for(vault: Vault) -> None:
    one = fr(vault, "FR-1")
    two = fr(vault, "FR-2", extra="depends_on: [FR-1]\n")
    assert opus(vault, "run", "--once")[0] == 0
    assert (meta(one)["status"], meta(two)["status"]) == ("review", "queued")
    board = (vault.root / "00_system" / "opus-dashboard.md").read_text()
    (row,) = [line for line in board.splitlines() if "|FR-2]]" in line and "queued" in line]
    assert row.rstrip(" |").endswith("FR-1 (review)"), row


def test_a_dependency_cycle_is_named_in_the_notes_and_by_validate(vault: Vault) -> None:
    a = fr(vault, "FR-A", extra="depends_on: [FR-B]\n")
    b = fr(vault, "FR-B", extra="depends_on: [FR-C]\n")
    c = fr(vault, "FR-C", extra="depends_on: [FR-A]\n")
    after = fr(vault, "FR-D", extra="depends_on: [FR-A]\n")  # waits on the cycle, not in it
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    assert meta(a)["error"] == (
        "depends_on: a cycle, each waits for the next: FR-A → FR-B → FR-C → FR-A"
    )
    assert meta(b)["error"].endswith("FR-B → FR-C → FR-A → FR-B")
    assert meta(c)["status"] == "queued" and "cycle" in meta(c)["error"]
    assert meta(after)["status"] == "queued" and "error" not in meta(after)
    assert vault.runs("planner") == []
    code, out = opus(vault, "validate")
    assert code == 1, out
    assert "FR-A.md: depends_on: a cycle: FR-A → FR-B → FR-C → FR-A" in out


def test_a_queued_fr_follows_a_new_priority(vault: Vault) -> None:
    vault.write_config(pipeline="concurrency = 1\nstage_timeout = 60\nretries = 0")
    vault.script({"FR-1": {"planner": [{"exit": 1}]}})
    first = fr(vault, "FR-1")
    second = fr(vault, "FR-2", extra="depends_on: [FR-1]\n")
    opus(vault, "run", "--once")
    assert meta(second)["status"] == "queued"
    second.write_text(second.read_text().replace("priority: medium", "priority: critical"))
    opus(vault, "run", "--once")
    (job,) = [j for j in registry(vault) if j["fr_id"] == "FR-2"]
    assert job["priority"] == "critical"
    assert meta(first)["status"] == "failed"


def test_every_state_file_is_0600_and_every_state_folder_0700(vault: Vault) -> None:
    """SPEC §8, the agents' own output files and the worktree's folder included."""
    note = fr(vault, "FR-1")
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(note)["status"] == "review"
    (job,) = registry(vault)
    jobs, worktrees = vault.state / "jobs", vault.state / "worktrees"
    files = [p for p in (jobs / str(job["id"])).rglob("*") if p.is_file()]
    assert any(p.name.startswith("output-") for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o077} == {}
    for folder in (jobs, jobs / str(job["id"]), worktrees, worktrees / str(job["id"])):
        assert folder.stat().st_mode & 0o777 == 0o700, folder


def test_a_retried_fr_keeps_its_place_in_the_queue(vault: Vault) -> None:
    """SPEC §4: priority, then the time opus first saw the FR — a retry is not new work to
    put behind everything that came since."""
    vault.write_config(pipeline="concurrency = 1\nstage_timeout = 60\nretries = 0")
    vault.script({"FR-1": {"planner": [{"exit": 1}]}})
    zero, one = fr(vault, "FR-0"), fr(vault, "FR-1")
    assert opus(vault, "run", "--once")[0] == 0
    assert (meta(zero)["status"], meta(one)["status"]) == ("review", "failed")
    # seen later, and queued (waiting for FR-0) before FR-1 is retried
    later = [fr(vault, f"FR-{n}", extra="depends_on: [FR-0]\n") for n in (2, 3)]
    assert opus(vault, "run", "--once")[0] == 0
    assert [meta(n)["status"] for n in later] == ["queued", "queued"]
    vault.script({})
    opus(vault, "retry", "FR-1")
    opus(vault, "approve", "FR-0")
    assert opus(vault, "run", "--once")[0] == 0
    order = [c["fr"] for c in vault.runs("planner")][2:]
    assert order == ["FR-1", "FR-2", "FR-3"], order

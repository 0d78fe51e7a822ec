"""Plan notes and the plan gate (SPEC §16): the plan as a note, plan-review, a person's
edited plan handed to the coder, and a re-plan from feedback."""

from __future__ import annotations

from pathlib import Path

from .conftest import Vault
from .test_cli_basics import meta, opus
from .test_pipeline_flow import fr, registry


def plan_note(vault: Vault, fr_id: str) -> Path:
    return vault.root / "10_features" / "05_plans" / f"{fr_id} plan.md"


def job_dir(vault: Vault) -> Path:
    (job,) = registry(vault)
    return vault.state / "jobs" / str(job["id"])


def test_without_a_gate_the_plan_note_is_written_and_linked(vault: Vault) -> None:
    note = fr(vault, "FR-1")
    assert opus(vault, "run", "--once")[0] == 0
    m = meta(note)
    assert m["status"] == "review" and m["plan"] == "[[FR-1 plan]]"
    assert '\nplan: "[[FR-1 plan]]"\n' in note.read_text()  # as SPEC §2.2 and Obsidian write it
    text = plan_note(vault, "FR-1").read_text()
    assert text.startswith('---\nfr: "[[FR-1]]"\n---\n') and "1. Do it." in text


def test_the_plan_gate_hands_the_persons_edited_plan_to_the_coder(vault: Vault) -> None:
    vault.write_config(approval="plan = true")
    note = fr(vault, "FR-1")
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    m = meta(note)
    assert m["status"] == "plan-review" and m["plan"] == "[[FR-1 plan]]", m
    assert "stage" not in m
    assert vault.runs("coder") == [] and len(vault.runs("planner")) == 1
    assert "plan-review: FR-1" in out or "plan ready for review" in out
    # the person edits the plan, then approves it
    path = plan_note(vault, "FR-1")
    path.write_text(path.read_text() + "2. EDITED BY A PERSON: keep it small.\n")
    code, out = opus(vault, "approve", "FR-1")
    assert code == 0, out
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(note)["status"] == "review"
    assert len(vault.runs("planner")) == 1  # not re-planned
    prompt = (job_dir(vault) / "prompt-coder-1.md").read_text()
    assert "2. EDITED BY A PERSON: keep it small." in prompt
    assert "EDITED BY A PERSON" in (job_dir(vault) / "plan.md").read_text()


def test_changes_requested_at_plan_review_re_plans_with_the_feedback(vault: Vault) -> None:
    plans = [{"output": "# Plan v1\n"}, {"output": "# Plan v2\n"}]
    vault.script({"FR-1": {"planner": [*plans, *plans]}})
    note = fr(vault, "FR-1", extra="plan_approval: true\n")
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(note)["status"] == "plan-review"
    assert "# Plan v1" in plan_note(vault, "FR-1").read_text()
    code, out = opus(vault, "rework", "FR-1", "-m", "Split it into two steps.")
    assert code == 0, out
    for text in ("Split it into two steps.", "Smaller steps.", "Smaller still."):
        if text != "Split it into two steps.":
            assert opus(vault, "rework", "FR-1", "-m", text)[0] == 0
        assert opus(vault, "run", "--once")[0] == 0
        assert meta(note)["status"] == "plan-review"
        assert meta(note)["iteration"] == 1  # SPEC §2.2: a loop pass, and none has run yet
    assert [c["iteration"] for c in vault.runs("planner")] == [1, 2, 3, 4]
    prompt = (job_dir(vault) / "prompt-planner-2.md").read_text()
    assert "Split it into two steps." in prompt and "# Plan v1" in prompt
    assert "# Plan v2" in plan_note(vault, "FR-1").read_text()  # rewritten: its planner ran
    assert vault.runs("coder") == []
    assert opus(vault, "approve", "FR-1")[0] == 0
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(note)["status"] == "review"
    assert "# Plan v2" in (job_dir(vault) / "prompt-coder-1.md").read_text()


def test_plan_approval_false_on_the_note_skips_the_configured_gate(vault: Vault) -> None:
    vault.write_config(approval="plan = true")
    note = fr(vault, "FR-1", extra="plan_approval: false\n")
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(note)["status"] == "review"


def test_plans_off_writes_no_plan_note(vault: Vault) -> None:
    vault.write_config(vault='planned = "10_features/03_planned"\nplans = ""')
    note = fr(vault, "FR-1")
    assert opus(vault, "run", "--once")[0] == 0
    assert "plan" not in meta(note)
    assert not (vault.root / "10_features" / "05_plans").exists()
    # at the gate, the person is told where the plan is: its artifact's full path
    gated = fr(vault, "FR-2", extra="plan_approval: true\n")
    code, out = opus(vault, "run", "--once")
    assert code == 0 and meta(gated)["status"] == "plan-review", out
    job = next(j for j in registry(vault) if j["fr_id"] == "FR-2")
    assert f"plan ready for review: {vault.state / 'jobs' / job['id'] / 'plan.md'}" in out


def test_opus_cancel_stops_an_fr_in_plan_review_as_a_persons_edit_does(vault: Vault) -> None:
    note = fr(vault, "FR-1", extra="plan_approval: true\n")
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(note)["status"] == "plan-review"
    code, out = opus(vault, "cancel", "FR-1")
    assert code == 0, out
    assert opus(vault, "run", "--once")[0] == 0
    assert meta(note)["status"] == "cancelled"
    (job,) = registry(vault)
    assert job["status"] == "cancelled" and vault.runs("coder") == []

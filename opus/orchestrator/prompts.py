"""The markdown prompt each stage's agent receives (SPEC §5.1)."""

from __future__ import annotations

from .lifecycle import Stage
from .models import FeatureRequest, Feedback

VERDICT_SCHEMA = """\
{"verdict": "approve" | "request_changes",
 "confidence": 0-100,
 "summary": "one paragraph",
 "issues": [{"severity": "blocker|major|minor|nit", "message": "…",
             "file": "path (optional)", "line": 12}]}"""

_INSTRUCTIONS = {
    Stage.PLANNER: (
        "You are the **planner**. Read the feature request and the repository, then write an "
        "implementation plan in markdown: the files to change, the steps, the tests to add, "
        "and the risks. Do not change any file. Write the plan to the file named by "
        "`OPUS_OUTPUT_FILE` or print it on standard output."
    ),
    Stage.CODER: (
        "You are the **coder**. Implement the feature request in this working tree, following "
        "the plan. Add or update tests. Keep the change focused. You may commit; never push, "
        "never change branches. When feedback from the previous iteration is given, address "
        "every point of it."
    ),
    Stage.TESTER: (
        "You are the **tester**. Run the project's test suite in this working tree. Exit 0 when "
        "the tests pass and non-zero when they fail."
    ),
    Stage.REVIEWER: (
        "You are the **reviewer**. Review the change on this branch against the base commit "
        "and the feature request. Answer with one JSON object and nothing else, written to the "
        "file named by `OPUS_OUTPUT_FILE` or printed as the last thing on standard output:\n\n"
        f"```json\n{VERDICT_SCHEMA}\n```\n\n"
        "Approve only when the change does what the request asks, is tested, and has no "
        "blocker or major issue."
    ),
}


def feedback_markdown(feedback: Feedback) -> str:
    if feedback.reason == "rework":
        head = f"## Rework round {feedback.round}: what to change ({feedback.source})"
        return "\n".join([head, "", feedback.message.strip(), ""])
    lines = [f"## Feedback from iteration {feedback.iteration}", "", feedback.message, ""]
    if feedback.test_output:
        lines += ["Test output (tail):", "", "```text", feedback.test_output.rstrip(), "```", ""]
    for issue in feedback.issues:
        where = f" ({issue.file}{f':{issue.line}' if issue.line else ''})" if issue.file else ""
        lines.append(f"- **{issue.severity}**{where}: {issue.message}")
    return "\n".join(lines).rstrip() + "\n"


def render(
    stage: Stage,
    fr: FeatureRequest,
    *,
    iteration: int,
    plan: str | None = None,
    feedback: Feedback | None = None,
    base_commit: str = "",
    diff: str = "",
    rework: Feedback | None = None,
    plan_feedback: str | None = None,
) -> str:
    """The prompt for one stage: instructions, the FR, the plan, a rework round's request,
    feedback, the diff."""
    in_round = f" · round {rework.round}" if rework is not None else ""
    parts = [
        f"# {fr.id}: {fr.title}",
        "",
        f"Stage: {stage} · iteration {iteration}{in_round}",
        "",
        _INSTRUCTIONS[stage],
        "",
        "## Feature request",
        "",
        fr.body.strip(),
        "",
    ]
    if plan and stage is not Stage.PLANNER:
        parts += ["## Plan", "", plan.strip(), ""]
    if plan_feedback and stage is Stage.PLANNER:  # a new plan (SPEC §16)
        if plan:
            parts += ["## The plan so far", "", plan.strip(), ""]
        parts += ["## A person's feedback on the plan: revise it", "", plan_feedback.strip(), ""]
    if rework is not None and stage in (Stage.CODER, Stage.REVIEWER):
        parts += [feedback_markdown(rework)]
    if feedback and stage is Stage.CODER and feedback.reason != "rework":
        parts += [feedback_markdown(feedback)]
    if stage is Stage.REVIEWER:
        parts += [f"## The change (against base commit {base_commit[:12]})", ""]
        parts += ["```diff", diff.rstrip() or "(empty diff)", "```", ""]
    return "\n".join(parts).rstrip() + "\n"

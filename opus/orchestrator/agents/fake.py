"""The scripted fake agent, shipped with the library for tests and demos.

    agent = ScriptedAgent([writes({"app.py": "x = 1\\n"}), writes({"app.py": "x = 2\\n"})])
    reviewer = ScriptedAgent([request_changes("name it better"), approve()])

Each call plays the next step; the last one repeats. A step is a StageResult (returned),
an AgentError instance (raised), or a callable ``(StageContext) -> StageResult`` that may
be async (e.g. it writes files into ``ctx.worktree``). ``calls`` records every context.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeAlias

from ..errors import AgentError
from ..lifecycle import Stage
from ..models import Issue, Verdict
from .base import StageContext, StageResult

__all__ = (
    "ScriptedAgent",
    "Step",
    "approve",
    "request_changes",
    "tests_fail",
    "tests_pass",
    "writes",
)

Step: TypeAlias = (
    StageResult | AgentError | Callable[[StageContext], StageResult | Awaitable[StageResult]]
)


class ScriptedAgent:
    """An Agent that plays ``steps``, one per call, the last repeating.

    Without steps it answers what each stage needs to pass: a plan, a coder result, passing
    tests, an approval.
    """

    def __init__(self, steps: Sequence[Step] | Step = (), *more: Step) -> None:
        if isinstance(steps, list | tuple):
            self.steps: list[Step] = [*steps, *more]
        else:
            self.steps = [steps, *more]  # type: ignore[list-item]
        self.calls: list[StageContext] = []

    async def run(self, ctx: StageContext) -> StageResult:
        self.calls.append(ctx)
        if not self.steps:
            return _default(ctx.stage)
        step = self.steps[min(len(self.calls), len(self.steps)) - 1]
        if isinstance(step, AgentError):
            raise _fresh(step)
        if isinstance(step, StageResult):
            return dataclasses.replace(step)
        result = step(ctx)
        if inspect.isawaitable(result):
            result = await result
        return result


def _fresh(error: AgentError) -> AgentError:
    """A copy, so a repeated step does not pile tracebacks onto one exception object."""
    try:
        return copy.copy(error)
    except Exception:
        return error


def _default(stage: Stage) -> StageResult:
    if stage is Stage.PLANNER:
        return StageResult(output="# Plan\n\n1. Make the change.\n")
    if stage is Stage.REVIEWER:
        return approve()
    if stage is Stage.TESTER:
        return tests_pass()
    return StageResult(output="done")


def writes(files: Mapping[str, str]) -> Callable[[StageContext], StageResult]:
    """A step that writes ``files`` (paths relative to the worktree) and succeeds."""
    snapshot = dict(files)

    def step(ctx: StageContext) -> StageResult:
        for name, text in snapshot.items():
            path = ctx.worktree / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        return StageResult(output="wrote " + ", ".join(snapshot))

    return step


def approve(confidence: int = 95, summary: str = "Looks good.") -> StageResult:
    """A reviewer step that approves."""
    verdict = Verdict(verdict="approve", confidence=confidence, summary=summary)
    return StageResult(output=summary, verdict=verdict)


def request_changes(*messages: str, confidence: int = 80) -> StageResult:
    """A reviewer step that requests changes, one issue per message."""
    issues = [Issue(message=m) for m in messages] or [Issue(message="Changes needed.")]
    summary = "; ".join(i.message for i in issues)
    verdict = Verdict(
        verdict="request_changes", confidence=confidence, summary=summary, issues=issues
    )
    return StageResult(output=summary, verdict=verdict)


def tests_pass(output: str = "all tests passed") -> StageResult:
    """A tester step whose tests pass."""
    return StageResult(output=output, passed=True)


def tests_fail(output: str = "1 failed") -> StageResult:
    """A tester step whose tests fail with ``output``."""
    return StageResult(output=output, passed=False)


# Their names start with "test": keep pytest from collecting them where they are imported.
tests_pass.__test__ = False  # type: ignore[attr-defined]
tests_fail.__test__ = False  # type: ignore[attr-defined]

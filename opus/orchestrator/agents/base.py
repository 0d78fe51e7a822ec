"""The agent protocol: what a stage hands an agent and what it gets back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..lifecycle import Stage
from ..models import FeatureRequest, Feedback, Usage, Verdict
from ..redact import Redactor
from ..sandbox import Sandbox


@dataclass(frozen=True)
class StageContext:
    """Everything one run of one stage knows. Paths are absolute."""

    stage: Stage
    iteration: int
    job_id: str
    fr: FeatureRequest
    worktree: Path
    artifacts: Path
    """The job's artifact folder (``OPUS_ARTIFACTS``)."""
    prompt: str
    """The rendered markdown prompt; also in ``prompt_file``."""
    prompt_file: Path
    output_file: Path
    """Where the agent may write its answer (``OPUS_OUTPUT_FILE``); empty before the run."""
    log_file: Path
    """Where the agent's output is logged (``<stage>-<iter>.log``)."""
    base_commit: str
    """The base branch's commit the job started from (for diffs)."""
    timeout: float
    stall_timeout: float
    plan: str | None = None
    round: int = 1
    """The rework round (SPEC §15; ``OPUS_ROUND``): 1 up to the first delivery."""
    feedback: Feedback | None = None
    feedback_file: Path | None = None
    """The previous iteration's feedback as JSON, from iteration 2 on."""
    redactor: Redactor = field(default_factory=Redactor)
    on_spawn: Callable[[int], None] | None = None
    """Called with the process-group id of every child process an agent starts."""
    on_exit: Callable[[int], None] | None = None
    """Called with that id once the group is gone."""
    sandbox: Sandbox | None = None
    """Where agent processes run (SPEC §17); None: unsandboxed."""


@dataclass
class StageResult:
    """What an agent returns.

    - planner: ``output`` is the plan.
    - coder: the worktree holds the changes; ``output`` is the agent's last message.
    - tester: ``passed`` says whether the tests passed; ``output`` is the output tail.
    - reviewer: ``verdict``.
    """

    output: str = ""
    passed: bool = True
    verdict: Verdict | None = None
    usage: Usage | None = None
    meta: Mapping[str, str] = field(default_factory=dict)
    """Anything worth keeping with the job (e.g. ``version`` of the CLI)."""


@runtime_checkable
class Agent(Protocol):
    """One stage's worker. Raise an ``AgentError`` to fail the attempt."""

    async def run(self, ctx: StageContext) -> StageResult: ...


@runtime_checkable
class StageExecutor(Protocol):
    """Where stages run (SPEC §18): locally, or some of them on a cluster."""

    problem: str | None
    """Why remote stages cannot start now (the cluster is unreachable, …); None when they can."""

    def remote(self, stage: Stage) -> bool:
        """Whether ``stage`` runs on the cluster."""
        ...

    def ready(self) -> str | None:
        """``problem``, after asking for another attempt to connect when one is due."""
        ...

    def close(self) -> None:
        """Leave the cluster (blocking)."""
        ...

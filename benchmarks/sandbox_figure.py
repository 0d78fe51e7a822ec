"""Figure 12: what the sandbox adds to one instant stage (SPEC §17).

One coder stage whose agent is ``true``, run through ``CommandAgent.run`` (supervision,
logging, output parsing) in a real git worktree: unsandboxed, and inside bubblewrap with the
full policy (hidden vault and HOME, git folders, private HOME and TMPDIR, PID namespace).
Runs alternate, so noise hits both alike; the figure is the ratio of the medians.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

from report import Figure, median, ms, ratio
from world import git, make_repo

from opus.orchestrator.agents.base import StageContext
from opus.orchestrator.agents.command import CommandAgent
from opus.orchestrator.config import AgentSection
from opus.orchestrator.lifecycle import Stage
from opus.orchestrator.models import FeatureRequest
from opus.orchestrator.sandbox import Sandbox

ADDED_TARGET = 0.025
"""Seconds the sandbox may add to a stage ("a few ms"; bubblewrap's own start is ~5 ms)."""


def _context(base: Path) -> StageContext:
    repo = make_repo(base / "app", files=5)
    vault, home = base / "vault", base / "home"
    state = vault / ".opus"
    worktree = state / "worktrees" / "job-1"
    git(repo, "worktree", "add", "-q", "-b", "opus/fr-1", str(worktree))
    artifacts = state / "jobs" / "job-1"
    note = vault / "10_features" / "03_planned" / "FR-1.md"
    for folder in (artifacts, note.parent, home):
        folder.mkdir(parents=True, exist_ok=True)
    note.write_text("---\nid: FR-1\ntitle: Thing\n---\nDo it.\n")
    prompt = artifacts / "prompt-coder-1.md"
    prompt.write_text("# FR-1\n")
    return StageContext(
        stage=Stage.CODER,
        iteration=1,
        job_id="job-1",
        fr=FeatureRequest(id="FR-1", title="Thing", path=note, body="Do it.\n"),
        worktree=worktree,
        artifacts=artifacts,
        prompt="# FR-1\n",
        prompt_file=prompt,
        output_file=artifacts / "output-coder-1",
        log_file=artifacts / "coder-1.log",
        base_commit=git(repo, "rev-parse", "HEAD"),
        timeout=60,
        stall_timeout=60,
    )


async def sandbox_overhead(base: Path, runs: int) -> Figure:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise RuntimeError("bubblewrap (bwrap) is not installed: apt install bubblewrap")
    plain = _context(base)
    sandbox = Sandbox(
        bwrap=bwrap,
        vault=base / "vault",
        state=base / "vault" / ".opus",
        home=base / "home",
    )
    boxed = replace(plain, sandbox=sandbox)
    agent = CommandAgent(AgentSection(kind="command", command=["true"]), Stage.CODER)
    times: dict[bool, list[float]] = {False: [], True: []}
    for n in range(runs * 2 + 2):
        inside = n % 2 == 1
        start = time.perf_counter()
        await agent.run(boxed if inside else plain)
        if n >= 2:  # the first pair warms caches
            times[inside].append(time.perf_counter() - start)
    bare, boxed_time = median(times[False]), median(times[True])
    added = boxed_time - bare
    return Figure(
        12,
        measured=f"median stage {ms(boxed_time)} sandboxed ({ms(added)} added)",
        target=f"a few ms added (≤ {ms(ADDED_TARGET)})",
        ok=added <= ADDED_TARGET,
        baseline=f"unsandboxed: {ms(bare)}",
        ratio=ratio(boxed_time, bare),
        details=[
            f"{runs} runs each of a coder stage whose agent is `true`, alternating; "
            "sandboxed = bubblewrap with opus's full policy"
        ],
    )

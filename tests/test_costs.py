"""What one FR costs opus, counted on a real run (issue 13; SPEC §12): hand-offs to worker
threads, fsyncs, rewrites of the person's note and git processes — each held at or under
what was measured, so a change that adds one per write shows here — and what a stage's
end, one hand-off, keeps: the files a checkpoint names are on disk before it is recorded,
and a checkpoint whose files could not be written is not recorded at all."""

from __future__ import annotations

import os
import shutil
import stat
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from opus.orchestrator import Orchestrator, ScriptedAgent, Status, load_config
from opus.orchestrator.agents.base import StageContext, StageResult
from opus.orchestrator.agents.fake import tests_pass, writes
from opus.orchestrator.registry import Registry

from .conftest import Vault, git

NOTE = "---\nid: {id}\ntitle: Thing {id}\npriority: medium\n---\n# Thing\n\nDo {id}.\n"

#: Per FR, as counted when this test was written (instant agents, one repository).
BUDGET = {"hand-offs": 22, "fsyncs": 22, "note rewrites": 6, "git processes": 7}


def instant_agents() -> dict[str, Any]:
    return {
        "planner": ScriptedAgent(),
        "coder": ScriptedAgent(writes({"change.txt": "one line\n"})),
        "tester": ScriptedAgent(),
        "reviewer": ScriptedAgent(),
    }


def counting_git(tmp_path: Path, log: Path) -> Path:
    """A ``git`` first on PATH that notes each run in ``log``, then is the real git."""
    real = shutil.which("git")
    assert real is not None
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "git"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{real}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.mark.anyio
async def test_one_fr_costs_no_more_than_measured(
    vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for fr_id in ("FR-0", "FR-1"):
        vault.note(f"{fr_id}.md", NOTE.format(id=fr_id))
    counts: Counter[str] = Counter()
    log = tmp_path / "git.log"
    monkeypatch.setenv("PATH", f"{counting_git(tmp_path, log)}{os.pathsep}{os.environ['PATH']}")
    note = str(vault.planned / "FR-1.md")

    real_run_sync, real_fsync, real_replace = anyio.to_thread.run_sync, os.fsync, os.replace

    async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        counts["hand-offs"] += 1
        return await real_run_sync(func, *args, **kwargs)

    def fsync(fd: int) -> None:
        counts["fsyncs"] += 1
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        counts["note rewrites"] += os.fspath(dst) == note
        real_replace(src, dst, **kwargs)

    async with Orchestrator(load_config(vault.config), agents=instant_agents()) as orch:
        first = await orch.process("FR-0")  # the first FR also makes folders: not counted
        log.unlink()
        with monkeypatch.context() as m:
            m.setattr(anyio.to_thread, "run_sync", run_sync)
            m.setattr(os, "fsync", fsync)
            m.setattr(os, "replace", replace)
            job = await orch.process("FR-1")
    assert (first.status, job.status) == (Status.REVIEW, Status.REVIEW)
    counts["git processes"] = len(log.read_text().splitlines())
    assert {k: counts[k] for k in BUDGET} == {k: min(counts[k], BUDGET[k]) for k in BUDGET}
    assert counts["note rewrites"] >= 3  # claimed, in progress, review: each one shown


@pytest.mark.anyio
async def test_a_checkpoint_is_recorded_after_the_files_it_names(
    vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault.note("FR-1.md", NOTE.format(id="FR-1"))
    seen: list[tuple[str, str, bool]] = []
    real_save = Registry.save

    def save(self: Registry, job: Any, event: str, **kwargs: Any) -> None:
        if event == "checkpoint" and job.history[-1].artifact:
            artifact = self.job_dir(job.id) / job.history[-1].artifact
            seen.append((str(job.history[-1].stage), artifact.name, artifact.exists()))
        real_save(self, job, event, **kwargs)

    monkeypatch.setattr(Registry, "save", save)
    async with Orchestrator(load_config(vault.config), agents=instant_agents()) as orch:
        job = await orch.process("FR-1")
    assert job.status is Status.REVIEW
    plan_note = vault.root / "10_features" / "05_plans" / str(job.plan_note)
    assert plan_note.is_file()  # the planner's checkpoint wrote it too
    assert [stage for stage, _, _ in seen] == ["planner", "coder", "tester", "reviewer", "delivery"]
    # what opus writes for a checkpoint is there before it (an in-process agent logs nothing)
    written = {name: exists for _, name, exists in seen if not name.endswith(".log")}
    assert written == {"plan.md": True, "review-1.json": True, "pr.md": True}


def locks_the_index(ctx: StageContext) -> StageResult:
    """A tester that leaves a file behind and git's index lock: the reset that drops what it
    left cannot run."""
    (ctx.worktree / "left-behind.txt").write_text("a tester's mess\n")
    gitdir = Path((ctx.worktree / ".git").read_text().removeprefix("gitdir:").strip())
    (gitdir / "index.lock").write_text("")
    return tests_pass()


@pytest.mark.anyio
async def test_a_stage_whose_end_cannot_be_written_records_no_checkpoint(vault: Vault) -> None:
    vault.note("FR-1.md", NOTE.format(id="FR-1"))
    agents = instant_agents() | {"tester": ScriptedAgent(locks_the_index)}
    async with Orchestrator(load_config(vault.config), agents=agents) as orch:
        job = await orch.process("FR-1")
    assert job.status is Status.FAILED
    assert "index.lock" in str(job.error)
    assert [c.stage.value for c in job.history] == ["planner", "coder"]  # no tester
    saved = Registry(vault.state)
    saved.open()
    reread = saved.get(job.id)
    assert reread is not None and [c.stage.value for c in reread.history] == ["planner", "coder"]


@pytest.mark.anyio
async def test_a_poll_finds_merges_with_one_git_process_however_many_frs_are_in_review(
    vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each FR's own merge check cost a git process per poll, and held up the tick (a note
    moved in meanwhile waited: figure 1's p99)."""
    ids = [f"FR-{i}" for i in range(6)]
    for fr_id in ids:
        vault.note(f"{fr_id}.md", NOTE.format(id=fr_id))
    async with Orchestrator(load_config(vault.config), agents=instant_agents()) as orch:
        summary = await orch.run_once()
    assert set(summary.statuses.values()) == {"review"}
    for fr_id in ("FR-1", "FR-4"):  # a person merges two of them by hand
        git(vault.repo, "merge", "-q", "--no-ff", "-m", f"merge {fr_id}", f"opus/{fr_id.lower()}")
    log = tmp_path / "git.log"
    monkeypatch.setenv("PATH", f"{counting_git(tmp_path, log)}{os.pathsep}{os.environ['PATH']}")
    async with Orchestrator(load_config(vault.config), agents=instant_agents()) as orch:
        summary = await orch.run_once()  # its first tick settles what waits on a person
        first = log.read_text()
        log.write_text("")
        await orch.run_once()  # the next poll: neither the base nor a branch moved
        second = log.read_text()
    log.write_text(first)
    done = sorted(fr for fr, status in summary.statuses.items() if status == "done")
    assert done == ["FR-1", "FR-4"]
    asked = [
        line for line in log.read_text().splitlines() if "merged" in line or "ancestor" in line
    ]
    assert len(asked) == 1 and "for-each-ref --merged=refs/heads/main" in asked[0], asked
    # the base moved under the four still in review: one merge check each (SPEC §7) ...
    merges = [line for line in log.read_text().splitlines() if "merge-tree" in line]
    assert len(merges) == 4, merges
    # ... and none at the next poll, while neither the base nor a branch moves
    assert [line for line in second.splitlines() if "merge-tree" in line] == []

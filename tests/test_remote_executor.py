"""The executor's parts that need no cluster: git bundles there and back, the node cache,
and jobs that wait ``queued`` (failing nothing) while the cluster cannot be reached."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import anyio
import pytest

from opus.orchestrator import Orchestrator, load_config
from opus.orchestrator.agents.bundles import NodeCache, apply_bundle, bundle_changes, bundle_commit
from opus.orchestrator.agents.bundles import git as run_git
from opus.orchestrator.errors import WorkspaceError
from opus.orchestrator.health import check_health

from .conftest import Vault, git, make_repo
from .test_pipeline_flow import fr


def commit(repo: Path, name: str, text: str) -> str:
    (repo / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"add {name}")
    return git(repo, "rev-parse", "HEAD")


def test_bundles_out_and_back_keep_commits_and_uncommitted_work(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "head")
    start = commit(repo, "big.bin", os.urandom(50_000).hex())
    cache = NodeCache(tmp_path / "node", "key")
    first = bundle_commit(repo, start, cache.have())
    assert first is not None and len(first) > 50_000
    cache.receive(first, start)
    assert cache.have() == [start] and cache.holds(start) and cache.count() == 1
    assert bundle_commit(repo, start, cache.have()) is None  # the node has it: nothing to send

    tree = tmp_path / "remote-wt"
    cache.checkout(start, tree)
    commit(tree, "own.txt", "the agent's own commit\n")
    (tree / "loose.txt").write_text("left uncommitted\n")
    (tree / "README.md").unlink()
    changes = bundle_changes(tree, start)
    assert changes is not None
    data, tip, wip = changes
    assert wip and len(data) < 5_000
    cache.keep(tip)
    cache.drop(tree)
    assert not tree.exists()

    apply_bundle(repo, data, tip, wip=wip)
    assert git(repo, "log", "-1", "--format=%s") == "add own.txt"  # the agent's commit, kept
    status = git(repo, "status", "--porcelain")
    assert "?? loose.txt" in status and "D README.md" in status  # the rest: uncommitted
    # the next stage starts from opus's commit of that: only the new commit travels
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "opus commit")
    later = git(repo, "rev-parse", "HEAD")
    small = bundle_commit(repo, later, cache.have())
    assert small is not None and len(small) < 2_000


def test_an_unchanged_worktree_brings_nothing_back(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "head")
    start = git(repo, "rev-parse", "HEAD")
    assert bundle_changes(repo, start) is None


def test_a_bundle_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "head")
    other = make_repo(tmp_path / "other")
    tip = commit(other, "x.txt", "x\n")
    data = bundle_commit(other, tip, [])
    assert data is not None
    with pytest.raises(WorkspaceError, match="bundle"):
        apply_bundle(repo, b"not a bundle", tip, wip=False)
    before = run_git(repo, "rev-parse", "HEAD")
    with pytest.raises(WorkspaceError):
        apply_bundle(repo, data, "0" * 40, wip=False)
    assert run_git(repo, "rev-parse", "HEAD") == before


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


def test_unreachable_cluster_jobs_wait_queued_and_say_why(vault: Vault) -> None:
    port = closed_port()
    vault.write_config(
        executor=f'kind = "ray"\naddress = "127.0.0.1:{port}"\ntoken_env = "TOK"\n'
        'stages = ["coder", "tester"]'
    )
    fr(vault, "FR-1")
    env = {**os.environ, "TOK": "secret-token-value"}

    async def main() -> None:
        async with Orchestrator(load_config(vault.config), environ=env) as orch:
            summary = await orch.run_once()
            assert summary.statuses == {"FR-1": "queued"}
            orch._heartbeat()

    anyio.run(main)
    job = json.loads((vault.state / "registry.json").read_text())["jobs"][0]
    assert job["status"] == "queued"
    assert job["error"].startswith("waiting: Ray cluster unreachable at 127.0.0.1:")
    assert [c["stage"] for c in vault.runs("planner")] == ["planner"]  # local stages ran
    assert vault.runs("coder") == []
    assert job["history"][-1]["stage"] == "planner"  # nothing failed, nothing lost
    health = json.loads((vault.state / "health.json").read_text())
    assert health["executor"].startswith("Ray cluster unreachable")
    assert "secret-token-value" not in (vault.state / "registry.json").read_text()


def test_health_line_says_why_remote_stages_wait(tmp_path: Path) -> None:
    from datetime import datetime

    from opus.orchestrator.health import write_health

    now = datetime.now()
    path = tmp_path / "health.json"
    write_health(path, pid=os.getpid(), started_at=now, last_tick=now, running=[], queued=1,
                 executor="Ray cluster unreachable at h:1")  # fmt: skip
    ok, line = check_health(path, now=now, max_age=60)
    assert ok and line.endswith("remote stages wait: Ray cluster unreachable at h:1")


def test_landed_artifacts_are_private_and_never_overwrite_the_jobs_files(tmp_path: Path) -> None:
    """A remote agent's ``$OPUS_ARTIFACTS`` comes home beside the job's files: the job's own
    (its events, plan, prompts) are never replaced, and names that are not plain file
    names are dropped (SPEC §8, §17)."""
    from opus.orchestrator.agents.remote import land_artifacts
    from opus.orchestrator.lifecycle import Stage

    from .test_agent_edge_cases import make_ctx

    ctx = make_ctx(tmp_path, Stage.CODER)
    (ctx.artifacts / "events.jsonl").write_text('{"event": "claimed"}\n')
    (ctx.artifacts / "plan.md").write_text("# Plan\n")
    landed = land_artifacts(
        ctx,
        {
            "events.jsonl": b"HIJACKED",
            "plan.md": b"HIJACKED",
            "../../escape.txt": b"x",
            "..": b"x",
            "coder-notes.txt": b"notes",
        },
    )
    assert landed == ["coder-notes.txt"]
    assert (ctx.artifacts / "events.jsonl").read_text() == '{"event": "claimed"}\n'
    assert (ctx.artifacts / "plan.md").read_text() == "# Plan\n"
    assert (
        not (tmp_path / "escape.txt").exists() and not (tmp_path / "state" / "escape.txt").exists()
    )
    notes = ctx.artifacts / "coder-notes.txt"
    assert notes.read_bytes() == b"notes" and notes.stat().st_mode & 0o777 == 0o600

"""Losing parts of the cluster mid-stage: a worker node, and opus itself (SPEC §18)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import anyio
import pytest

from opus.orchestrator import Orchestrator, load_config

from ..conftest import Vault, git
from .conftest import Cluster, remote_config
from .test_remote_stages import FR, environ

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]  # nodes start slowly on 2 cores


async def until(predicate: Callable[[], object], what: str, limit: float = 90) -> None:
    """Poll a real effect, bounded."""
    with anyio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 (another process's effect on disk)
            await anyio.sleep(0.1)


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_worker_lost_mid_stage_is_a_retried_attempt_on_a_new_node(
    cluster: Cluster, vault: Vault, tmp_path: Path
) -> None:
    first = cluster.add_worker("worker-b", agent=1)
    cluster.wait_for_agents(1)
    go = tmp_path / "go"
    remote_config(vault, cluster, stages='["coder"]')
    vault.script({"*": {"coder": [{"wait_for": str(go), "write": {"{fr}.txt": "done\n"}}]}})
    vault.note("FR-1.md", FR.format(id="FR-1"))
    strays: list[int] = []

    async def main() -> str:
        async with Orchestrator(load_config(vault.config), environ=environ(cluster)) as orch:
            async with anyio.create_task_group() as tg:
                result: list[str] = []

                async def run() -> None:
                    result.append((await orch.process("FR-1")).status.value)

                tg.start_soon(run)
                await until(lambda: any(c["stage"] == "coder" for c in vault.calls()), "coder")
                strays.extend(c["pid"] for c in vault.calls() if c["stage"] == "coder")
                first.kill()  # the machine is lost mid-stage
                # the retry finds no agent node and waits; only then does a new one join
                await until(lambda: '"event":"waiting"' in _log_text(vault), "waiting")
                await anyio.to_thread.run_sync(cluster.add_worker, "worker-c", 1)
                go.touch()
            return result[0]

    try:
        status = anyio.run(main)
    finally:
        kill_pids(strays)  # the lost node's agent (its raylet is gone with the "machine")
    assert status == "review"
    coder = [c for c in vault.calls() if c["stage"] == "coder"]
    assert [c["node"] for c in coder if c["event"] == "start"] == ["worker-b", "worker-c"]
    assert [c["node"] for c in coder if c["event"] == "end"] == ["worker-c"]
    rows = _events(vault)
    checkpoint = [r for r in rows if r["event"] == "checkpoint"][-1]["job"]["history"]
    assert [(h["stage"], h["attempts"]) for h in checkpoint][:2] == [("planner", 1), ("coder", 2)]
    assert any(r["event"] == "waiting" for r in rows)  # the retry waited for the new node


def test_opus_killed_mid_remote_stage_restarts_and_resumes(
    cluster: Cluster, vault: Vault, tmp_path: Path
) -> None:
    if not any(w.alive() for w in cluster.workers):
        cluster.add_worker("worker-d", agent=1)
    cluster.wait_for_agents(1)
    pids = tmp_path / "pids"
    daemon = (
        "import os, subprocess, sys, time\n"
        # a daemonized grandchild: a session of its own, reparented away from the agent
        "d = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{d.pid}}')\n"
        "time.sleep(300)\n"
    )
    remote_config(vault, cluster, stages='["coder"]', coder=[sys.executable, "-c", daemon])
    vault.note("FR-2.md", FR.format(id="FR-2"))
    env = {**environ(cluster), "PYTHONPATH": str(Path(__file__).parents[2])}
    with (tmp_path / "opus.log").open("wb") as log:
        _kill_opus_mid_stage(vault, env, log, pids)
    remote_config(vault, cluster, stages='["coder"]')  # the coder works now; opus resumes
    job = anyio.run(_process, vault, environ(cluster), "FR-2")
    assert job.status.value == "review", job.error
    assert [c["stage"] for c in vault.calls() if c["event"] == "end"] == [
        "planner", "coder", "tester", "reviewer",
    ]  # fmt: skip
    assert git(vault.repo, "show", f"{job.branch}:FR-2.txt") == "change of iteration 1"
    assert any(r["event"] == "recovered" for r in _events(vault))


async def _process(vault: Vault, env: dict[str, str], fr: str):  # type: ignore[no-untyped-def]
    async with Orchestrator(load_config(vault.config), environ=env) as orch:
        return await orch.process(fr)


def _log_text(vault: Vault) -> str:
    return "".join(p.read_text() for p in (vault.state / "jobs").glob("*/events.jsonl"))


def _events(vault: Vault) -> list[dict]:  # type: ignore[type-arg]
    [path] = list((vault.state / "jobs").glob("*/events.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def _who(*pids: int) -> str:
    lines = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            parent = Path(f"/proc/{stat[1]}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
            lines.append(f"{pid} alive, state {stat[0]}, parent {stat[1]} {parent!r}")
        except OSError:
            lines.append(f"{pid} gone")
    return "; ".join(lines)


def _kill_opus_mid_stage(vault: Vault, env: dict[str, str], log: IO[bytes], pids: Path) -> None:
    """``opus run`` until its remote coder runs; SIGKILL it; its agents must die too."""
    opus = subprocess.Popen(
        [sys.executable, "-m", "opus", "run", "--config", str(vault.config)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (pids.exists() and pids.read_text().count(" ") == 1):
            assert time.monotonic() < deadline and opus.poll() is None, "no remote coder"
            time.sleep(0.1)
        agent, grandchild = map(int, pids.read_text().split())
        os.killpg(opus.pid, signal.SIGKILL)  # opus dies mid remote stage
        opus.wait()
        deadline = time.monotonic() + 60
        while not (gone(agent) and gone(grandchild)):
            assert time.monotonic() < deadline, _who(agent, grandchild)
            time.sleep(0.1)
    finally:
        if opus.poll() is None:
            os.killpg(opus.pid, signal.SIGKILL)
        if pids.exists():
            kill_pids([int(p) for p in pids.read_text().split()])

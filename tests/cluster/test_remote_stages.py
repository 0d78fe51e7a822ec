"""FRs whose coder and tester run on a real local Ray cluster (SPEC §18)."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from opus.orchestrator import Orchestrator, load_config
from opus.orchestrator.models import Job
from opus.orchestrator.supervisor import REAP_TIMEOUT

from ..conftest import Vault, git
from .conftest import SECRET, Cluster, remote_config

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]  # nodes start slowly on 2 cores

FR = """\
---
id: {id}
title: Remote {id}
priority: medium
---
Do {id} on the cluster.
"""


def environ(cluster: Cluster, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "OPUS_"))}
    return {**env, "OPUS_RAY_TOKEN": cluster.token if token is None else token}


async def process(vault: Vault, env: dict[str, str], fr: str) -> Job:
    async with Orchestrator(load_config(vault.config), environ=env) as orch:
        return await orch.process(fr)


@pytest.fixture(scope="module")
def worker(cluster: Cluster) -> Cluster:
    cluster.add_worker("worker-a", agent=2)
    cluster.wait_for_agents(2)
    return cluster


def test_coder_and_tester_run_on_the_worker_node(worker: Cluster, vault: Vault) -> None:
    remote_config(vault, worker)
    vault.note("FR-1.md", FR.format(id="FR-1"))
    job = anyio.run(process, vault, environ(worker), "FR-1")

    assert job.status.value == "review", job.error
    where = {c["stage"]: c["node"] for c in vault.calls() if c["event"] == "end"}
    assert where == {"planner": None, "coder": "worker-a", "tester": "worker-a", "reviewer": None}
    assert job.agent_versions["coder.node"] and job.agent_versions["coder.host"]
    remote_trees = {c["worktree"] for c in vault.calls() if c["node"]}
    assert all(not t.startswith(str(vault.state)) for t in remote_trees)
    # the coder's change came back as a bundle and opus committed it on the head
    assert git(vault.repo, "show", f"{job.branch}:FR-1.txt") == "change of iteration 1"
    subject = git(vault.repo, "log", "-1", "--format=%s", job.branch)
    assert subject == "opus(FR-1): coder, iteration 1"
    # the stage logs came back to the head
    logs = vault.state / "jobs" / job.id
    assert "1 passed" in (logs / "tester-1.log").read_text()
    # secrets travel in memory only: never in a file of Ray's on any node
    for path in worker.root.rglob("*"):
        if path.is_file() and not path.name.endswith((".sock", ".bundle")):
            data = path.read_bytes()
            assert SECRET.encode() not in data, path
            assert worker.token.encode() not in data, path


def test_later_stages_send_only_what_the_node_lacks(worker: Cluster, vault: Vault) -> None:
    (vault.repo / "data.bin").write_bytes(os.urandom(100_000))  # incompressible history
    git(vault.repo, "add", "-A")
    git(vault.repo, "commit", "-q", "-m", "data")
    remote_config(vault, worker)
    vault.note("FR-2.md", FR.format(id="FR-2"))
    job = anyio.run(process, vault, environ(worker), "FR-2")
    assert job.status.value == "review", job.error
    events = [e for e in _events(vault, job) if e.get("event") == "remote"]
    sizes = {e["stage"]: int(e["bundle_bytes"]) for e in events}
    # the coder's start commit travels whole; the tester's is opus's commit of the coder's
    # result, and the node's cache holds everything else
    assert sizes["coder"] > 100_000
    assert sizes["tester"] < 2_000


def _events(vault: Vault, job: Job) -> list[dict[str, str]]:
    import json

    path: Path = vault.state / "jobs" / job.id / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_agent_slots_run_four_coders_in_two_waves(worker: Cluster, vault: Vault) -> None:
    remote_config(vault, worker, stages='["coder"]')
    vault.script({"*": {"coder": [{"write": {"{fr}.txt": "x\n"}, "sleep": 3}]}})
    for n in range(1, 5):
        vault.note(f"FR-{n}.md", FR.format(id=f"FR-{n}"))

    async def main() -> dict[str, str]:
        async with Orchestrator(load_config(vault.config), environ=environ(worker)) as orch:
            return (await orch.run_once()).statuses

    statuses = anyio.run(main)
    assert statuses == {f"FR-{n}": "review" for n in range(1, 5)}
    coders = [c for c in vault.calls() if c["stage"] == "coder"]
    starts = sorted(c["time"] for c in coders if c["event"] == "start")
    ends = sorted(c["time"] for c in coders if c["event"] == "end")
    assert {c["node"] for c in coders} == {"worker-a"}
    # never more than two at once: the third starts only after one of the first two ended
    for t in starts:
        running = sum(1 for s, e in zip(starts, ends, strict=True) if s <= t < e)
        assert running <= 2
    assert starts[2] >= ends[0] and starts[3] >= ends[1]
    waited = [
        e
        for job in {c["fr"] for c in coders}
        for e in _fr_events(vault, job)
        if e.get("event") == "waiting" and e.get("reason") == "waiting for an agent node"
    ]
    assert len(waited) >= 2  # the second wave waited for a slot, and said so


def test_an_agents_own_error_keeps_its_type(worker: Cluster, vault: Vault) -> None:
    remote_config(vault, worker, stages='["tester"]')
    vault.script({"*": {"tester": [{"exit": 127, "stdout": "sh: pytest: not found"}]}})
    vault.note("FR-5.md", FR.format(id="FR-5"))
    job = anyio.run(process, vault, environ(worker), "FR-5")
    assert job.status.value == "failed"
    assert "tester command cannot run (exit status 127)" in (job.error or "")
    assert job.history[-1].attempts == 1  # AgentNotFound is permanent: not retried
    assert [c["node"] for c in vault.runs("tester")] == ["worker-a"]


def test_a_rejected_token_leaves_jobs_queued_and_says_why(worker: Cluster, vault: Vault) -> None:
    import json
    import subprocess
    import sys

    remote_config(vault, worker)
    vault.note("FR-6.md", FR.format(id="FR-6"))
    # a child process: a Ray driver whose join failed is unusable for the rest of its life
    env = {**environ(worker, token="not-the-token"), "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-m", "opus", "run", "--config", str(vault.config), "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    job = json.loads((vault.state / "registry.json").read_text())["jobs"][0]
    assert job["status"] == "queued"
    assert job["error"].startswith("waiting: cannot join the Ray cluster")
    assert "token rejected" in job["error"]
    assert vault.runs("coder") == []
    assert "not-the-token" not in done.stderr


def _fr_events(vault: Vault, fr_id: str) -> list[dict[str, str]]:
    import json

    found = []
    for path in (vault.state / "jobs").glob("*/events.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        if rows and rows[0]["job"]["fr_id"] == fr_id:
            found += rows
    return found


def test_doctor_checks_the_cluster(worker: Cluster, vault: Vault) -> None:
    from opus.orchestrator.agents.remote import check_cluster

    remote_config(vault, worker)
    config = load_config(vault.config)
    checks = check_cluster(config, environ(worker))
    assert all(ok for ok, _ in checks), checks
    lines = [line for _, line in checks]
    assert lines[0] == f"joined the Ray cluster at {worker.address} (token accepted)"
    assert lines[1] == "1 of 2 node(s) offer an `agent` resource"
    assert lines[2].startswith("a worker node runs Python 3.")
    from opus.orchestrator.doctor import check_executor

    doctor = list(check_executor(config, environ(worker)))
    assert [(c.what, c.ok) for c in doctor] == [("executor (ray)", True)] * 3


def test_what_a_remote_agent_daemonized_dies_with_its_stage(
    worker: Cluster, vault: Vault, tmp_path: Path
) -> None:
    import sys

    pid_file = tmp_path / "daemon.pid"
    coder = (
        "import subprocess\n"
        "d = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(d.pid))\n"
        "open('daemon-left.txt', 'w').write('x')\n"
    )
    remote_config(vault, worker, stages='["coder"]', coder=[sys.executable, "-c", coder])
    vault.note("FR-7.md", FR.format(id="FR-7"))
    job = anyio.run(process, vault, environ(worker), "FR-7")
    assert job.status.value == "review", job.error
    daemon = int(pid_file.read_text())
    stat = Path(f"/proc/{daemon}/stat")
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0] if stat.exists() else "gone"
    except OSError:
        state = "gone"
    if state not in ("gone", "Z"):
        os.kill(daemon, 9)
    assert state in ("gone", "Z"), f"the daemon {daemon} outlived its stage ({state})"


def test_exit_codes_read_true_under_the_subreaper(worker: Cluster, vault: Vault) -> None:
    remote_config(vault, worker, stages='["tester"]')
    vault.script({"*": {"tester": [{"exit": 1, "stdout": "1 failed"}, {"exit": 0}]}})
    vault.note("FR-8.md", FR.format(id="FR-8"))
    job = anyio.run(process, vault, environ(worker), "FR-8")
    assert job.status.value == "review", job.error
    # iteration 1's tests failed (exit 1 seen as 1, not 0): the coder ran twice
    assert [c["iteration"] for c in vault.runs("coder")] == [1, 2]
    assert [c["node"] for c in vault.runs("tester")] == ["worker-a", "worker-a"]


def test_the_stage_log_streams_to_the_head_while_it_runs(
    worker: Cluster, vault: Vault, tmp_path: Path
) -> None:
    import sys

    go = tmp_path / "go"
    coder = (
        "import os, pathlib, time\n"
        "print('halfway there', flush=True)\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.02)\n"
        "pathlib.Path('streamed.txt').write_text('done')\n"
    )
    remote_config(vault, worker, stages='["coder"]', coder=[sys.executable, "-c", coder])
    vault.note("FR-9.md", FR.format(id="FR-9"))
    seen: list[str] = []

    async def main() -> Job:
        async with Orchestrator(load_config(vault.config), environ=environ(worker)) as orch:
            async with anyio.create_task_group() as tg:
                done: list[Job] = []

                async def run() -> None:
                    done.append(await orch.process("FR-9"))

                tg.start_soon(run)
                with anyio.fail_after(120):
                    while not seen:
                        for log in (vault.state / "jobs").glob("*/coder-1.log"):
                            if "halfway there" in log.read_text():
                                seen.append(log.read_text())
                        await anyio.sleep(0.05)
                go.touch()  # the stage is still running: it waits for this
            return done[0]

    job = anyio.run(main)
    assert job.status.value == "review", job.error
    assert "halfway there" in seen[0]
    assert git(vault.repo, "show", f"{job.branch}:streamed.txt") == "done"


def test_a_remote_agent_runs_in_the_same_sandbox(worker: Cluster, vault: Vault) -> None:
    import fcntl
    import json
    import shutil
    import sys

    from opus.orchestrator.agents.worker import stage_root

    secret_note = vault.root / "opus.toml"
    # another job's stage folder on the node, live (its lock held), and one a killed worker
    # left behind (no lock): the first is hidden from the agent, the second swept away
    live, left = stage_root() / "opus-other-job-live", stage_root() / "opus-old-job-left"
    for folder in (live, left):
        (folder / "worktree").mkdir(parents=True, exist_ok=True)
        (folder / "worktree" / "wip.txt").write_text("another job's work in progress")
    held = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)
    coder = (
        "import os, pathlib\n"
        f"try:\n    pathlib.Path({str(secret_note)!r}).read_text(); seen = 'visible'\n"
        "except OSError:\n    seen = 'hidden'\n"
        "pathlib.Path('vault-was.txt').write_text(seen)\n"
        f"other = pathlib.Path({str(live / 'worktree' / 'wip.txt')!r})\n"
        "pathlib.Path('other-was.txt').write_text('visible' if other.exists() else 'hidden')\n"
        "pathlib.Path('pid-ns.txt').write_text(str(os.getpid()))\n"
        # the job's own files, by name: on the node there is nothing there to protect
        "arts = pathlib.Path(os.environ['OPUS_ARTIFACTS'])\n"
        "for name in ('events.jsonl', 'plan.md', 'prompt-planner-1.md'):\n"
        "    (arts / name).write_text('HIJACKED')\n"
        "(arts / 'coder-notes.txt').write_text('my notes')\n"
    )
    paths = json.dumps([str(vault.calls_file.parent / "calls")])
    (vault.calls_file.parent / "calls").mkdir()
    remote_config(vault, worker, stages='["coder"]', coder=[sys.executable, "-c", coder],
                  sandbox=f'kind = "bwrap"\npaths = {paths}')  # fmt: skip
    text = vault.config.read_text().replace(
        json.dumps(str(vault.calls_file)), json.dumps(str(vault.calls_file.parent / "calls" / "c"))
    )
    vault.config.write_text(text)
    vault.note("FR-10.md", FR.format(id="FR-10"))
    try:
        job = anyio.run(process, vault, environ(worker), "FR-10")
    finally:
        os.close(held)
    assert job.status.value == "review", job.error
    assert job.agent_versions["coder.node"]
    assert git(vault.repo, "show", f"{job.branch}:other-was.txt") == "hidden"
    assert not left.exists() and (live / "worktree" / "wip.txt").exists()
    shutil.rmtree(live)
    # on the node, bubblewrap hid the head's vault (this machine is both) and gave a PID ns
    assert git(vault.repo, "show", f"{job.branch}:vault-was.txt") == "hidden"
    assert int(git(vault.repo, "show", f"{job.branch}:pid-ns.txt")) < 10
    # what the agent left in $OPUS_ARTIFACTS came home, private, overwriting none of the
    # job's own files (SPEC §8, §17)
    folder = vault.state / "jobs" / job.id
    for name in ("events.jsonl", "plan.md", "prompt-planner-1.md"):
        assert "HIJACKED" not in (folder / name).read_text(), name
    assert (folder / "coder-notes.txt").read_text() == "my notes"
    for name in ("coder-notes.txt", "coder-1.log", "output-coder-1"):
        if (folder / name).exists():
            assert (folder / name).stat().st_mode & 0o777 == 0o600, name
    # the worker (a subreaper) reaped the sandbox's exited init itself: no REAP_TIMEOUT wait
    coder = next(cp for cp in job.history if cp.stage.value == "coder")
    assert (coder.finished_at - coder.started_at).total_seconds() < REAP_TIMEOUT

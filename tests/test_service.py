"""``opus run`` as a real process: pickup through the watcher, the lock, health, a person's
controls while a stage runs, SIGTERM, and SIGKILL at every stage followed by a restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import Vault, git
from .test_cli_basics import meta, opus
from .test_pipeline_flow import fr

DEFAULT = {
    "planner": {"output": "# Plan\n"},
    "coder": {"write": {"{fr}.txt": "change of iteration {iteration}\n"}},
    "tester": {"exit": 0},
    "reviewer": {"verdict": {"verdict": "approve", "confidence": 95, "summary": "ok"}},
}


def wait(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll a real process's effect on disk, bounded (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def status_of(note: Path) -> object:
    try:
        return meta(note).get("status")
    except Exception:  # a half-written file is never seen, but be safe while polling
        return None


def alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies of reaped-late orphans count as gone
    try:
        stat = Path(f"/proc/{pgid}/stat").read_text()
        return stat.split(")")[1].split()[0] != "Z"
    except OSError:
        return False


class Service:
    """``opus run`` in a child process; its log goes to a file (a pipe could fill up)."""

    def __init__(self, vault: Vault, *args: str, env: dict[str, str] | None = None) -> None:
        self.vault = vault
        self.log = vault.root.parent / f"opus-{time.monotonic_ns()}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "opus", "run", "--config", str(vault.config), *args],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, **(env or {})},
            )

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        return code, self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)


@pytest.fixture
def service(vault: Vault) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Service:
        s = Service(vault, *args, env=env)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
    for call in vault.calls():
        if alive(call["pgid"]):
            os.killpg(call["pgid"], signal.SIGKILL)


def started(vault: Vault, stage: str, count: int = 1) -> Callable[[], bool]:
    return lambda: (
        sum(1 for c in vault.calls() if c["event"] == "start" and c["stage"] == stage) >= count
    )


def test_service_picks_up_a_moved_note_and_reports_health(vault: Vault, service) -> None:
    vault.write_config(polling="active = 30\nidle_max = 300\ndebounce_ms = 50")
    s = service()
    wait(lambda: (vault.state / "health.json").exists(), "health.json")
    code, out = opus(vault, "health")
    assert code == 0, out
    note = fr(vault, "FR-1")
    # the adaptive poll is 30 s: only the watcher can make this fast
    wait(lambda: status_of(note) == "review", "FR-1 in review", timeout=20)
    second = subprocess.run(
        [sys.executable, "-m", "opus", "run", "--config", str(vault.config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert f"pid {s.proc.pid}" in second.stderr
    code, err = s.stop()
    assert code == 0, err
    code, out = opus(vault, "health")
    assert code == 1 and "not running" in out


def test_registry_json_and_the_dashboard_follow_a_running_service_within_a_second_or_so(
    vault: Vault, service
) -> None:
    """A state write a tick skipped (one was under a second ago) comes once the second is
    up, not at the next 30 s beat (SPEC §3.1, §10)."""
    vault.write_config(polling="active = 30\nidle_max = 300\ndebounce_ms = 50")
    s = service()
    wait(lambda: (vault.state / "health.json").exists(), "health.json")
    note = fr(vault, "FR-1")
    wait(lambda: status_of(note) == "review", "FR-1 in review", timeout=20)
    seen = time.monotonic()

    def registry_says_review() -> bool:
        try:
            jobs = json.loads((vault.state / "registry.json").read_text())["jobs"]
        except (OSError, ValueError):
            return False
        return [j["status"] for j in jobs if j["fr_id"] == "FR-1"] == ["review"]

    wait(registry_says_review, "registry.json to show FR-1 in review", timeout=10)
    dashboard = vault.root / "00_system" / "opus-dashboard.md"

    def dashboard_awaits_review() -> bool:
        section = dashboard.read_text().partition("## Awaiting review")[2].split("\n## ")[0]
        return "[[" in section and "FR-1" in section

    wait(dashboard_awaits_review, "the dashboard to list FR-1 as awaiting review", timeout=10)
    assert time.monotonic() - seen < 10  # the beat is 30 s away
    assert s.stop()[0] == 0


def test_pause_at_the_next_boundary_then_resume_from_the_checkpoint(
    vault: Vault, service, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    vault.script({"FR-1": {"coder": [{**DEFAULT["coder"], "wait_for": str(gate)}]}})
    s = service()
    note = fr(vault, "FR-1")
    wait(started(vault, "coder"), "the coder to start")
    code, out = opus(vault, "pause", "FR-1")
    assert code == 0, out
    gate.touch()
    wait(
        lambda: meta(note).get("stage") == "tester" and status_of(note) == "paused",
        "paused before the tester",
    )
    assert vault.runs("tester") == []
    code, out = opus(vault, "resume", "FR-1")
    assert code == 0, out
    wait(lambda: status_of(note) == "review", "review after resume")
    assert len(vault.runs("coder")) == 1 and len(vault.runs("planner")) == 1
    assert s.stop()[0] == 0


def test_cancel_kills_the_agent_keeps_the_branch_and_frees_the_slot(vault: Vault, service) -> None:
    vault.write_config(pipeline="concurrency = 1\nstage_timeout = 60\nretries = 0")
    vault.script({"FR-1": {"coder": [{"write_before": {"half.txt": "x"}, "hang": True}]}})
    s = service()
    first = fr(vault, "FR-1", "high")
    second = fr(vault, "FR-2", "low")
    wait(started(vault, "coder"), "the coder to start")
    (coder,) = [c for c in vault.calls() if c["stage"] == "coder"]
    assert alive(coder["pgid"])
    code, out = opus(vault, "cancel", "FR-1")
    assert code == 0, out
    wait(lambda: not alive(coder["pgid"]), "the agent's group to die", timeout=15)
    wait(lambda: status_of(second) == "review", "FR-2 to use the freed slot")
    data = meta(first)
    assert data["status"] == "cancelled" and "stage" not in data
    assert git(vault.repo, "branch", "--list", "opus/fr-1").strip() == "opus/fr-1"
    assert s.stop()[0] == 0


def test_a_persons_edit_during_a_run_is_kept(vault: Vault, service, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    vault.script({"FR-1": {"coder": [{**DEFAULT["coder"], "wait_for": str(gate)}]}})
    s = service()
    note = fr(vault, "FR-1")
    wait(started(vault, "coder"), "the coder to start")
    text = note.read_text()
    edited = (
        text.replace("priority: medium\n", "priority: medium\nowner: ada  # me\n")
        + "\nA line the person added while the job ran.\n"
    )
    note.write_text(edited)
    gate.touch()
    wait(lambda: status_of(note) == "review", "review")
    final = note.read_text()
    assert "owner: ada  # me\n" in final
    assert final.endswith("\nA line the person added while the job ran.\n")
    assert s.stop()[0] == 0


@pytest.mark.parametrize("args", [(), ("--once",)], ids=["service", "once"])
def test_sigterm_lets_the_running_stage_finish_and_a_restart_carries_on(
    vault: Vault, service, tmp_path: Path, args: tuple[str, ...]
) -> None:
    gate = tmp_path / "gate"
    vault.script({"FR-1": {"coder": [{**DEFAULT["coder"], "wait_for": str(gate)}]}})
    s = service(*args)
    note = fr(vault, "FR-1")
    wait(started(vault, "coder"), "the coder to start")
    s.proc.send_signal(signal.SIGTERM)
    wait(lambda: "SIGTERM: finishing running stages" in s.log.read_text(), "SIGTERM handled")
    assert s.proc.poll() is None  # the signal is in; the stage is still running
    gate.touch()
    code, err = s.stop()
    assert code == 0, err
    assert len(vault.runs("coder")) == 1
    jobs = json.loads((vault.state / "registry.json").read_text())["jobs"]
    assert [c["stage"] for c in jobs[0]["history"]] == ["planner", "coder"]
    assert vault.runs("tester") == []
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    assert status_of(note) == "review"
    assert len(vault.runs("coder")) == 1 and len(vault.runs("planner")) == 1


def test_a_stage_failing_after_sigterm_is_not_retried_and_resumes_on_restart(
    vault: Vault, service, tmp_path: Path
) -> None:
    """SPEC §10: SIGTERM stops taking new work — a new attempt of a failed stage is new work.
    The stage runs again on the next start instead (the FR does not end failed)."""
    gate = tmp_path / "gate"
    vault.script({"FR-1": {"coder": [{"wait_for": str(gate), "exit": 1}]}})
    s = service()
    note = fr(vault, "FR-1")
    wait(started(vault, "coder"), "the coder to start")
    s.proc.send_signal(signal.SIGTERM)
    wait(lambda: "SIGTERM: finishing running stages" in s.log.read_text(), "SIGTERM handled")
    gate.touch()
    code, err = s.stop()
    assert code == 0, err
    assert "coder not retried: opus is stopping" in err
    assert len([c for c in vault.calls() if c["event"] == "start" and c["stage"] == "coder"]) == 1
    jobs = json.loads((vault.state / "registry.json").read_text())["jobs"]
    assert jobs[0]["status"] == "in-progress" and jobs[0]["stage"] == "coder"
    assert status_of(note) == "in-progress"
    vault.script({})
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    assert status_of(note) == "review"
    assert len(vault.runs("planner")) == 1


@pytest.mark.parametrize("stage", ["planner", "coder", "tester", "reviewer"])
def test_sigkill_mid_stage_then_restart_runs_every_stage_exactly_once(
    vault: Vault, service, tmp_path: Path, stage: str
) -> None:
    gate = tmp_path / "gate"
    step = {**DEFAULT[stage], "wait_for": str(gate), "write_before": {"half-{pid}.tmp": "x"}}
    vault.script({"FR-1": {stage: [step]}})
    note = fr(vault, "FR-1")
    first = service("--once")
    wait(started(vault, stage), f"the {stage} to start")
    first.proc.kill()
    first.proc.wait()
    (stale,) = [c for c in vault.calls() if c["event"] == "start" and c["stage"] == stage]
    assert alive(stale["pgid"])  # the orphaned agent is still running
    second = service("--once")
    wait(started(vault, stage, 2), f"the {stage} to run again")
    wait(lambda: not alive(stale["pgid"]), "the stale agent to be killed", timeout=15)
    gate.touch()
    code, err = second.wait()
    assert code == 0, err
    assert status_of(note) == "review"
    for each in ("planner", "coder", "tester", "reviewer"):
        assert len(vault.runs(each)) == 1, each
    assert all(c["pid"] != stale["pid"] for c in vault.runs(stage))
    jobs = json.loads((vault.state / "registry.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["review"]
    assert [c["stage"] for c in jobs[0]["history"]] == [
        "planner",
        "coder",
        "tester",
        "reviewer",
        "delivery",
    ]
    assert meta(note)["job_id"] == jobs[0]["id"]
    branch_files = git(vault.repo, "ls-tree", "-r", "--name-only", "opus/fr-1").split()
    halves = [f for f in branch_files if f.startswith("half-")]
    assert halves == [] or halves == [f"half-{vault.runs(stage)[0]['pid']}.tmp"]
    assert not any(alive(c["pgid"]) for c in vault.calls())
    events = [
        json.loads(x)["event"]
        for x in (vault.state / "jobs" / jobs[0]["id"] / "events.jsonl").read_text().splitlines()
    ]
    assert "recovered" in events


def test_a_higher_priority_fr_preempts_at_the_next_stage_boundary(
    vault: Vault, service, tmp_path: Path
) -> None:
    vault.write_config(pipeline="concurrency = 1\nstage_timeout = 60\nretries = 0")
    gate = tmp_path / "gate"
    vault.script({"FR-LOW": {"coder": [{**DEFAULT["coder"], "wait_for": str(gate)}]}})
    s = service()
    low = fr(vault, "FR-LOW", "low")
    wait(started(vault, "coder"), "the low-priority coder to start")
    high = fr(vault, "FR-HIGH", "critical")
    wait(lambda: status_of(high) == "queued", "FR-HIGH to wait for the slot")
    gate.touch()
    wait(lambda: status_of(low) == "queued" or status_of(high) != "queued", "FR-LOW to yield")
    assert meta(low).get("stage") == "tester"  # it resumes where it stopped
    wait(lambda: status_of(high) == "review" and status_of(low) == "review", "both in review")
    order = [(c["fr"], c["stage"]) for c in vault.calls() if c["event"] == "end"]
    low_coder = order.index(("FR-LOW", "coder"))
    # the low job yielded after its coder; the critical one ran; then the low one resumed
    assert order[low_coder + 1] == ("FR-HIGH", "planner")
    assert order[-1] == ("FR-LOW", "reviewer")
    assert len(vault.runs("coder", "FR-LOW")) == 1
    assert s.stop()[0] == 0


def test_sighup_reloads_the_config_and_rejects_a_bad_one(vault: Vault, service) -> None:
    s = service()
    wait(lambda: (vault.state / "health.json").exists(), "the service to start")
    good = vault.config.read_text()
    vault.config.write_text(good.replace("retries = 1", "retries = 2"))
    s.proc.send_signal(signal.SIGHUP)
    wait(lambda: "configuration reloaded" in s.log.read_text(), "the reload")
    vault.config.write_text(good + "\n[pipeline2]\nx = 1\n")
    s.proc.send_signal(signal.SIGHUP)
    wait(lambda: "reload rejected" in s.log.read_text(), "the rejection")
    assert "pipeline2" in s.log.read_text()
    note = fr(vault, "FR-1")
    wait(lambda: status_of(note) == "review", "the service to keep serving")
    assert s.stop()[0] == 0


def test_sighup_moves_the_watch_to_a_new_planned_folder_and_turns_the_sandbox_on(
    vault: Vault, service
) -> None:
    """SPEC §20: SIGHUP re-reads everything — the planned folder (watched at once: the
    poll is 30 s away) and ``[sandbox]`` (the next agent runs in bwrap's PID namespace)."""
    import shutil

    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap")
    vault.write_config(polling="active = 30\nidle_max = 300\ndebounce_ms = 50")
    s = service()
    wait(lambda: (vault.state / "health.json").exists(), "the service to start")
    new = vault.root / "10_features" / "06_next"
    new.mkdir(parents=True)
    calls = str(vault.calls_file.parent)
    vault.write_config(
        vault='planned = "10_features/06_next"\ndashboard = "00_system/opus-dashboard.md"',
        polling="active = 30\nidle_max = 300\ndebounce_ms = 50",
        sandbox=f'kind = "bwrap"\npaths = [{json.dumps(calls)}]',
    )
    s.proc.send_signal(signal.SIGHUP)
    wait(lambda: "configuration reloaded" in s.log.read_text(), "the reload")
    text = s.log.read_text()
    assert "sandbox: bubblewrap" in text
    # reloaded means watched: a note moved in from now on is seen at once (CI once moved
    # one in while the new watcher was still starting, and it waited for the 30 s poll)
    watching = text.find(f"watcher: watching {new}")
    assert -1 < watching < text.index("configuration reloaded")
    old = fr(vault, "FR-OLD")  # the old planned folder: no longer served
    before = old.read_text()
    src = vault.root / "10_features" / "01_inbox" / "FR-NEW.md"
    src.write_text(old.read_text().replace("FR-OLD", "FR-NEW"))
    note = new / "FR-NEW.md"
    os.replace(src, note)
    wait(lambda: status_of(note) == "review", "FR-NEW in review", timeout=25)
    assert old.read_text() == before
    planners = [c for c in vault.calls() if c["stage"] == "planner" and c["event"] == "start"]
    assert [c["fr"] for c in planners] == ["FR-NEW"]
    assert planners[0]["pid"] < 10  # in bwrap's own PID namespace
    assert s.stop()[0] == 0


def test_the_service_speaks_the_systemd_notify_protocol(
    vault: Vault, service, tmp_path: Path
) -> None:
    import socket

    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(20)
    try:
        s = service(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
        messages: list[str] = []

        def until(prefix: str) -> None:
            while not any(m.startswith(prefix) for m in messages):
                messages.append(sock.recv(4096).decode())

        until("READY=1")
        assert any(m.startswith("STATUS=") for m in messages)  # running/queued counts
        until("WATCHDOG=1")  # every WATCHDOG_USEC / 2
        s.proc.send_signal(signal.SIGHUP)
        until("RELOADING=1")
        assert "MONOTONIC_USEC=" in next(m for m in messages if m.startswith("RELOADING=1"))
        s.proc.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        assert s.wait()[0] == 0
    finally:
        sock.close()


@pytest.mark.parametrize("stage", ["coder", "tester"])
def test_sigkill_in_round_2_resumes_in_round_2_and_runs_nothing_twice(
    vault: Vault, service, tmp_path: Path, stage: str
) -> None:
    from .test_rework import set_keys

    gate = tmp_path / "gate"
    step = {**DEFAULT[stage], "wait_for": str(gate)}
    if stage == "coder":
        step["write"] = {"{fr}.txt": "round {round}\n"}
    vault.script({"FR-1": {f"{stage}@2": [step]}})
    note = fr(vault, "FR-1")
    code, out = opus(vault, "run", "--once")
    assert code == 0 and status_of(note) == "review", out
    set_keys(note, status="changes-requested", feedback="Once more, with feeling.")
    first = service("--once")
    wait(lambda: any(c["round"] == 2 and c["stage"] == stage for c in vault.calls()), "round 2")
    first.proc.kill()
    first.proc.wait()
    second = service("--once")
    wait(lambda: sum(1 for c in vault.calls() if c["round"] == 2 and c["stage"] == stage) >= 2,
         f"the {stage} of round 2 to run again")  # fmt: skip
    gate.touch()
    code, err = second.wait()
    assert code == 0, err
    m = meta(note)
    assert (m["status"], m["round"]) == ("review", 2), m
    ends = [(c["round"], c["stage"]) for c in vault.calls() if c["event"] == "end"]
    assert ends.count((1, "planner")) == 1 and ends.count((2, "planner")) == 0
    for each in ("coder", "tester", "reviewer"):
        assert ends.count((2, each)) == 1, (each, ends)
    (job,) = json.loads((vault.state / "registry.json").read_text())["jobs"]
    assert [(c["round"], c["stage"]) for c in job["history"]] == [
        (1, "planner"), (1, "coder"), (1, "tester"), (1, "reviewer"), (1, "delivery"),
        (2, "coder"), (2, "tester"), (2, "reviewer"), (2, "delivery"),
    ]  # fmt: skip
    assert git(vault.repo, "rev-list", "--count", "main..opus/fr-1") == "2"


@pytest.mark.anyio
async def test_a_reload_applies_the_file_but_says_executor_waits_for_a_restart(
    vault: Vault, caplog: pytest.LogCaptureFixture
) -> None:
    from opus.orchestrator.config import load_config
    from opus.orchestrator.service import Orchestrator

    async with Orchestrator(load_config(vault.config)) as orch:
        vault.write_config(
            pipeline="stage_timeout = 60\nstall_timeout = 30\nretries = 1\nconcurrency = 7",
            executor='kind = "ray"\naddress = "127.0.0.1:1"\ntoken_env = "NO_SUCH_TOKEN"',
        )
        with caplog.at_level("WARNING", logger="opus"):
            await orch.reload(load_config(vault.config))
        assert orch.rt.config.pipeline.concurrency == 7  # the rest of the file applies
        assert orch.rt.executor is None  # no cluster was connected to in the middle of a run
    assert "[executor] changed: it takes effect when opus restarts" in caplog.text

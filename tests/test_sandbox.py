"""The sandbox with real bubblewrap (SPEC §17): what an agent tries and cannot do, what each
stage may write, daemons, the network, and start-up without bwrap."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner

from opus.cli import main
from opus.orchestrator import Orchestrator
from opus.orchestrator.config import load_config
from opus.orchestrator.errors import ConfigError
from opus.orchestrator.sandbox import open_sandbox, sandbox_problems

from .conftest import GIT_ENV, Vault, git
from .test_cli_basics import meta, opus
from .test_pipeline_flow import fr, registry
from .test_service import wait

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")

FORBIDDEN = Path(__file__).parent / "agent_scripts" / "forbidden.py"
MARKER = "SANDBOX-ESCAPE-MARKER"
STAGES = ("planner", "coder", "tester", "reviewer")


def agents(env: dict[str, str], **extra: str) -> dict[str, str]:
    """Every stage runs forbidden.py; ``extra`` adds lines to a stage's table."""
    table = "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in env.items()) + " }"
    return {
        f"agents.{stage}": f'kind = "command"\n'
        f"command = {json.dumps([sys.executable, str(FORBIDDEN), stage])}\n"
        f"env = {table}\n" + extra.get(stage, "")
        for stage in STAGES
    }


@pytest.fixture
def server() -> Iterator[int]:
    """A loopback TCP server (connect succeeds from its backlog; nothing to accept)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        yield srv.getsockname()[1]


def only_git(tmp_path: Path) -> str:
    """A PATH with git (opus needs it) but no bwrap."""
    folder = tmp_path / "only-git"
    if not folder.exists():
        folder.mkdir()
        (folder / "git").symlink_to(shutil.which("git") or "/usr/bin/git")
    return str(folder)


def body(note: Path) -> str:
    return note.read_text().split("---\n", 2)[2]


def daemons(token: str) -> list[int]:
    """Processes whose command line names ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and token.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def setup_world(
    vault: Vault, tmp_path: Path, port: int, *, network: bool, **more: str
) -> dict[str, object]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.txt").write_text("the person's secret\n")
    other = vault.state / "worktrees" / "20260101-000000-other"
    other.mkdir(parents=True)
    (other / "work.txt").write_text("another job's work\n")
    token = f"opus-daemon-{os.getpid()}-{tmp_path.name}"
    env = {
        "MARKER": MARKER,
        "VAULT": str(vault.root),
        "REPO": str(vault.repo),
        "OTHER": str(other / "work.txt"),
        "HOME_MARKER": "secret.txt",
        "PORT": str(port),
        "TOKEN": token,
        **{k: v for k, v in GIT_ENV.items() if k.startswith("GIT_AUTHOR") or "COMMITTER" in k},
    }
    vault.write_config(
        sandbox='kind = "bwrap"',
        **{**agents(env, coder=f"network = {str(network).lower()}\n"), **more},
    )
    return {"home": home, "other": other / "work.txt", "token": token}


def started(vault: Vault) -> bool:
    return any(p.read_text() == "started" for p in vault.state.glob("jobs/*/output-planner-1"))


def run_once(vault: Vault, home: Path) -> dict[str, str]:
    """One steppable pass of the orchestrator, in this process, with ``home`` as HOME."""
    environ = {**os.environ, "HOME": str(home)}

    async def once() -> dict[str, str]:
        async with Orchestrator(load_config(vault.config), environ=environ) as orch:
            return (await orch.run_once()).statuses

    return anyio.run(once)


def attempts(vault: Vault, stage: str) -> dict[str, str]:
    (job,) = registry(vault)
    out = vault.state / "jobs" / str(job["id"]) / f"output-{stage}-1"
    return json.loads(out.read_text())["attempts"]  # type: ignore[no-any-return]


def test_every_forbidden_attempt_fails_and_the_fr_reaches_review(
    vault: Vault, tmp_path: Path, server: int
) -> None:
    world = setup_world(vault, tmp_path, server, network=False)
    note = fr(vault, "FR-1")
    body_before = body(note)
    guarded = [vault.config, vault.repo / "README.md", vault.repo / ".git" / "HEAD", world["other"]]
    before = {p: Path(str(p)).read_bytes() for p in guarded}

    statuses = run_once(vault, Path(str(world["home"])))

    assert statuses == {"FR-1": "review"}  # the FR's outcome is the agent's own work
    tried = attempts(vault, "coder")
    print("\n" + "\n".join(f"| {name} | {result} |" for name, result in tried.items()))
    allowed = ("leave a setsid daemon", "leave a file in the artifacts")
    refused = {k: v for k, v in tried.items() if k not in allowed}
    assert len(refused) == 11 and all(v.startswith("refused") for v in refused.values()), tried
    assert tried["leave a file in the artifacts"] == "done"
    (job,) = registry(vault)
    left = vault.state / "jobs" / str(job["id"]) / "coder-notes.txt"
    assert left.read_text() == "what the coder saw\n"
    assert daemons(str(world["token"])) == []  # the daemon went with the stage
    assert {p: Path(str(p)).read_bytes() for p in guarded} == before
    assert body(note) == body_before
    for path in [*vault.state.rglob("*"), *vault.root.glob("*")]:
        if path.is_file() and path != vault.config and not path.name.startswith("output-"):
            assert MARKER.encode() not in path.read_bytes(), path
    assert not (vault.root / "new.md").exists()
    assert (vault.state / "sandbox").stat().st_mode & 0o777 == 0o700  # SPEC §8
    # the coder committed inside the sandbox; opus's checkout of main is untouched
    log = git(vault.repo, "log", "--format=%s", "main..opus/fr-1").splitlines()
    assert log == ["the coder's own commit"]
    assert git(vault.repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"
    assert git(vault.repo, "status", "--porcelain") == ""


def test_the_same_agent_unsandboxed_does_damage(vault: Vault, tmp_path: Path, server: int) -> None:
    """The control: without the sandbox each attempt above succeeds (so the test could fail)."""
    world = setup_world(vault, tmp_path, server, network=True)
    text = vault.config.read_text().replace('kind = "bwrap"', 'kind = "none"')
    vault.config.write_text(text)
    fr(vault, "FR-1")
    try:
        run_once(vault, Path(str(world["home"])))
        tried = attempts(vault, "coder")
        assert all(v in ("done", "started") for v in tried.values()), tried
        assert MARKER in Path(str(world["other"])).read_text()
        assert daemons(str(world["token"])) != []  # it survived its stage
    finally:
        for pid in daemons(str(world["token"])):
            os.kill(pid, signal.SIGKILL)


def test_network_true_reaches_the_loopback_server(
    vault: Vault, tmp_path: Path, server: int
) -> None:
    world = setup_world(vault, tmp_path, server, network=True)
    fr(vault, "FR-1")
    assert run_once(vault, Path(str(world["home"]))) == {"FR-1": "review"}
    tried = attempts(vault, "coder")
    assert tried["reach a loopback server"] == "done"
    assert tried["write the registry (../../registry.json)"].startswith("refused")


def test_planner_and_reviewer_cannot_write_the_worktree_the_tester_can(
    vault: Vault, tmp_path: Path, server: int
) -> None:
    world = setup_world(vault, tmp_path, server, network=True)
    fr(vault, "FR-1")
    assert run_once(vault, Path(str(world["home"]))) == {"FR-1": "review"}
    assert attempts(vault, "planner")["write the worktree"] == "refused: Read-only file system"


def test_kind_bwrap_without_bwrap_fails_start_up_naming_it(vault: Vault, tmp_path: Path) -> None:
    vault.write_config(sandbox='kind = "bwrap"')
    result = CliRunner().invoke(
        main, ["run", "--once", "--config", str(vault.config)], env={"PATH": only_git(tmp_path)}
    )
    code, out = result.exit_code, result.output
    assert code == 2, out
    assert "bwrap" in out and "apt install bubblewrap" in out


def test_auto_without_bwrap_warns_in_the_log_and_in_validate(
    vault: Vault, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault.write_config(sandbox='kind = "auto"')
    config = load_config(vault.config)
    monkeypatch.setattr(logging.getLogger("opus"), "propagate", True)  # after a CLI run
    monkeypatch.setattr(logging.getLogger("opus"), "level", logging.INFO)
    empty = {"PATH": str(tmp_path)}
    problems = sandbox_problems(config, empty)
    assert len(problems) == 1 and "agents run unsandboxed" in problems[0]
    assert sandbox_problems(config, os.environ) == []  # with bwrap: nothing to say
    with caplog.at_level(logging.WARNING, logger="opus.orchestrator.sandbox"):
        assert open_sandbox(config, empty) is None
    assert "UNSANDBOXED" in caplog.text and "bwrap" in caplog.text
    with pytest.raises(ConfigError, match="bwrap"):
        open_sandbox(load_config(_with(vault, 'kind = "bwrap"')), empty)
    vault.write_config(sandbox='kind = "auto"')
    shown = CliRunner().invoke(
        main, ["validate", "--config", str(vault.config)], env={"PATH": only_git(tmp_path)}
    )
    assert "[sandbox]" in shown.output and "agents run unsandboxed" in shown.output


def test_opus_init_suggests_no_network_for_the_tester(vault: Vault, tmp_path: Path) -> None:
    done = CliRunner().invoke(main, ["init", str(tmp_path / "v"), "--repo", str(vault.repo)])
    assert done.exit_code == 0, done.output
    config = load_config(tmp_path / "v" / "opus.toml")
    assert config.agents.tester.network is False and config.agents.coder.network is True
    assert config.sandbox.kind == "auto"


def _with(vault: Vault, sandbox: str) -> Path:
    vault.write_config(sandbox=sandbox)
    return vault.config


def test_sigkill_of_opus_takes_the_sandboxed_agent_and_its_daemon_along(
    vault: Vault, tmp_path: Path, server: int
) -> None:
    """--die-with-parent: nothing for the restart's recovery to find, and the FR carries on."""
    gate, token = tmp_path / "gate", f"opus-orphan-{os.getpid()}-{tmp_path.name}"
    daemon = ["setsid", "--fork", sys.executable, "-c", "import time; time.sleep(600)", token]
    hang = (
        "import pathlib, subprocess, sys, time\n"
        "import os\n"
        f"subprocess.run({daemon!r}, stdout=subprocess.DEVNULL)\n"
        "pathlib.Path(os.environ['OPUS_OUTPUT_FILE']).write_text('started')\n"
        f"while not pathlib.Path({str(gate)!r}).exists(): time.sleep(0.05)\n"
        "print('# Plan')\n"
    )
    planner = f'kind = "command"\ncommand = {json.dumps([sys.executable, "-c", hang])}'
    world = setup_world(vault, tmp_path, server, network=True, **{"agents.planner": planner})
    note = fr(vault, "FR-1")
    home = {**os.environ, "HOME": str(world["home"])}
    argv = [sys.executable, "-m", "opus", "run", "--once", "--config", str(vault.config)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=home)
    try:
        # (not before: opus killed while bwrap sets up leaves the sandbox to the restart's
        # recovery, which kills the recorded process group)
        wait(lambda: started(vault), "the planner's daemon")
        assert daemons(token)
        proc.kill()
        proc.wait()
        wait(lambda: not daemons(token), "the orphaned sandbox to die", timeout=10)
    finally:
        proc.kill()
        for pid in daemons(token):
            os.kill(pid, signal.SIGKILL)
    gate.touch()
    again = subprocess.run(argv, capture_output=True, text=True, env=home, timeout=120)
    assert again.returncode == 0, again.stderr
    assert meta(note)["status"] == "review"
    assert daemons(token) == []


def test_opus_doctor_says_whether_bwrap_works_and_memory_max_is_enforced(
    vault: Vault, tmp_path: Path
) -> None:
    vault.write_config(sandbox='kind = "auto"\nmemory_max = "4G"')
    done = CliRunner().invoke(main, ["doctor", "--config", str(vault.config)])
    lines = done.output.splitlines()
    assert any(ln.startswith("ok") and "sandbox: bubblewrap" in ln for ln in lines), done.output
    memory = [ln for ln in lines if "sandbox memory_max" in ln]
    assert len(memory) == 1 and ("not enforced" in memory[0] or memory[0].startswith("ok"))
    vault.write_config(sandbox='kind = "auto"')
    bare = CliRunner().invoke(
        main, ["doctor", "--config", str(vault.config)], env={"PATH": only_git(tmp_path)}
    )
    assert "agents run unsandboxed" in bare.output, bare.output


def test_the_private_home_lasts_the_job_and_goes_with_its_worktree(
    vault: Vault, tmp_path: Path, server: int
) -> None:
    world = setup_world(vault, tmp_path, server, network=True)
    fr(vault, "FR-1")
    assert run_once(vault, Path(str(world["home"]))) == {"FR-1": "review"}
    (job,) = registry(vault)
    folder = vault.state / "sandbox" / str(job["id"])
    assert (folder / "home").is_dir()
    assert [p.name for p in folder.iterdir()] == ["home"]  # the temp folders went per stage
    fr(vault, "FR-2", extra="approval: auto\n")
    assert run_once(vault, Path(str(world["home"])))["FR-2"] == "done"
    done = next(j for j in registry(vault) if j["fr_id"] == "FR-2")
    assert not (vault.state / "sandbox" / str(done["id"])).exists()


@pytest.mark.anyio
async def test_the_ideator_runs_sandboxed_like_a_planner(vault: Vault, tmp_path: Path) -> None:
    """Its worktree is read-only: the scripted ideator's scribble there is refused."""
    from .test_ideation import IDEA, configure, idea_notes, orchestrator

    calls = configure(vault, [IDEA], sandbox='kind = "bwrap"')
    async with orchestrator(vault) as orch:
        await orch.run_once()
        (run,) = orch.ideation.ledger.runs
    assert run.outcome == "failed" and "Read-only file system" in (run.detail or ""), run
    assert idea_notes(vault) == [] and not calls.exists()
    assert git(vault.repo, "status", "--porcelain") == ""


def test_a_sandboxed_tester_exiting_130_is_failed_tests_not_a_signal(vault: Vault) -> None:
    """SPEC §5.1: the tester's non-zero exit is test feedback. bubblewrap reports a signal as
    128 + N — so does a shell whose test run was killed: the tester's 130 is tests failed,
    as unsandboxed (it was read as a signal: retried, then the FR failed)."""
    import json

    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap")
    calls = str(vault.calls_file.parent)
    vault.write_config(sandbox=f'kind = "bwrap"\npaths = [{json.dumps(calls)}]')
    vault.script({"FR-1": {"tester": [{"exit": 130, "stdout": "3 failed"}, {"exit": 0}]}})
    note = fr(vault, "FR-1")
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    assert meta(note)["status"] == "review", meta(note)
    testers = [c for c in vault.calls() if c["stage"] == "tester" and c["event"] == "start"]
    assert [c["iteration"] for c in testers] == [1, 2]  # no retry of iteration 1
    assert [c["iteration"] for c in vault.runs("coder")] == [1, 2]

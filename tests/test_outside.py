"""The service seen from outside (SPEC §9, §20): CLI habits, config problems, doctor, FR
names, ``opus logs``, ``pause --all``, the emergency stop, SIGHUP with new repositories,
journald priorities."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from opus.cli import main
from opus.log_format import setup_logging

from .conftest import Vault, git, make_repo
from .test_cli_basics import meta
from .test_service import Service, alive, started, status_of, wait

FR = """\
---
id: FR-7
title: Add a thing
aliases: [thing-adder]
---
# Add a thing
"""


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_config_goes_before_the_subcommand_and_json_is_machine_values(vault: Vault) -> None:
    vault.note("FR-7.md", FR)
    code, out, _ = cli("--config", str(vault.config), "run", "--once")
    assert code == 0, out
    code, out, _ = cli("--config", str(vault.config), "status", "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert isinstance(row["age"], float | int) and row["age"] >= 0  # seconds, not "4m"
    code, out, _ = cli("--config", str(vault.config), "show", "FR-7", "--json")
    data = json.loads(out)
    assert data["job"]["created_at"][:4].isdigit() and "T" in data["job"]["created_at"]
    # health --json: data, and the exit status of the check
    code, out, _ = cli("--config", str(vault.config), "health", "--json")
    health = json.loads(out)
    assert code == (0 if health["ok"] else 1) and health["pid"] == os.getpid()  # run --once: us
    assert isinstance(health["age"], float | int) and "T" in health["last_tick"]


def test_json_errors_are_json_on_stdout_with_the_same_exit_status(vault: Vault) -> None:
    code, out, _ = cli("--config", str(vault.config), "show", "FR-404", "--json")
    assert code == 1 and "FR-404" in json.loads(out)["error"]
    code, out, _ = cli("--config", str(vault.root / "missing.toml"), "status", "--json")
    assert code == 2 and "config file not found" in json.loads(out)["error"]
    code, out, _ = cli("show", "--json", "--config", str(vault.config))  # FR missing: usage
    assert code == 2 and "FR" in json.loads(out)["error"]


def test_run_once_init_and_logs_print_only_json_with_json(vault: Vault, tmp_path: Path) -> None:
    """SPEC §9: every command that prints data takes --json."""
    vault.script({"*": {"tester": [{"exit": 0, "stdout": "42 passed, all green"}]}})
    vault.note("FR-7.md", FR)
    vault.note("FR-8.md", "---\nid: [\n---\nbroken\n")
    code, out, _ = cli("run", "--once", "--json", "--config", str(vault.config))
    data = json.loads(out)
    assert code == 0 and data["statuses"] == {"FR-7": "review"}
    assert len(data["problems"]) == 1 and "FR-8.md" in data["problems"][0]
    code, out, _ = cli("logs", "FR-7", "--stage", "tester", "--json", "--config", str(vault.config))
    data = json.loads(out)
    assert code == 0 and data["fr_id"] == "FR-7" and data["running"] is False
    assert data["log"].endswith("tester-1.log") and "out| 42 passed, all green" in data["lines"]
    code, out, _ = cli("logs", "FR-7", "-f", "--json", "--config", str(vault.config))
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and lines and {line["log"] for line in lines} == {"reviewer-1.log"}
    code, out, _ = cli("init", str(tmp_path / "v2"), "--repo", str(vault.repo), "--json")
    data = json.loads(out)
    assert code == 0 and data["base"] == "main" and data["base_detected"] is True
    assert data["config"] == str(tmp_path / "v2" / "opus.toml") and data["repo_problem"] is None
    assert data["config"] in data["created"]
    code, out, _ = cli("init", str(tmp_path / "v2"), "--json")  # exists: the error as JSON
    assert code == 1 and "already exists" in json.loads(out)["error"]


def test_validate_lists_every_config_problem_once(tmp_path: Path) -> None:
    bad = tmp_path / "opus.toml"
    bad.write_text(
        '[vault]\nplaned = "x"\n[repos.a]\npath = "."\nbase = 3\n[pipeline]\nretries = -1\n'
    )
    code, out, err = cli("validate", "--config", str(bad))
    assert code == 2 and "3 problems" in err
    for key in ("[vault.planed] unknown key", "[repos.a.base]", "[pipeline.retries]"):
        assert err.count(key) == 1, err
    code, out, _ = cli("validate", "--json", "--config", str(bad))
    data = json.loads(out)  # JSON only, even for a configuration error
    assert code == 2 and data["ok"] is False and len(data["problems"]) == 3


def test_validate_lists_every_bad_value_of_a_note_once(vault: Vault) -> None:
    vault.note(
        "FR-8.md", "---\nid: FR-8\npriority: urgent-ish\napproval: maybe\nrepo: nope\n---\nx\n"
    )
    vault.note("FR-9.md", "---\nid: [\n---\nbroken\n")
    code, out, err = cli("validate", "--config", str(vault.config))
    assert code == 1
    for key in ("`priority`", "`approval`", "`repo`"):
        assert out.count(key) == 1, out
    assert out.count("FR-9.md") == 1 and err == ""  # an unreadable note once, not logged too


def test_run_refuses_a_repository_that_validate_rejects(vault: Vault, tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    vault.write_config(
        **{
            "repos.app": f'path = "{vault.repo}"\nbase = "trunk"',
            "repos.other": f'path = "{tmp_path / "plain"}"',
        }
    )
    note = vault.note("FR-7.md", FR)
    code, out, err = cli("run", "--once", "--config", str(vault.config))
    assert code == 2, out + err
    assert "[repos.app.base] base branch 'trunk' not found" in err
    assert "[repos.other.path]" in err and "not a git repository" in err
    assert "status" not in meta(note)  # nothing was touched
    assert not (vault.state / "registry.json").exists()


def test_an_fr_is_named_by_id_path_stem_title_or_alias(vault: Vault) -> None:
    note = vault.note("add-a-thing.md", FR)
    for ref in ("FR-7", "fr-7", str(note), "add-a-thing", "Add a thing", "thing-adder"):
        code, out, _ = cli("pause", ref, "--config", str(vault.config))
        assert code == 0, (ref, out)
        assert meta(note)["status"] == "paused"
        code, out, _ = cli("resume", ref, "--config", str(vault.config), "--json")
        assert code == 0 and json.loads(out) == {"fr_id": "FR-7", "from": "paused", "to": "planned"}
    code, _, err = cli("pause", "no such thing", "--config", str(vault.config))
    assert code == 1 and "title or alias" in err


def test_pause_all_and_resume_all(vault: Vault) -> None:
    notes = [
        vault.note(f"FR-{i}.md", f"---\nid: FR-{i}\nstatus: {s}\n---\nx\n")
        for i, s in ((1, "queued"), (2, "in-progress"), (3, "review"), (4, "paused"))
    ]
    code, out, _ = cli("pause", "--all", "--config", str(vault.config))
    assert code == 0 and "FR-1: queued → paused" in out and "FR-2: in-progress → paused" in out
    assert [meta(n)["status"] for n in notes] == ["paused", "paused", "review", "paused"]
    code, out, _ = cli("resume", "--all", "--json", "--config", str(vault.config))
    assert [r["fr_id"] for r in json.loads(out)] == ["FR-1", "FR-2", "FR-4"]
    assert [meta(n)["status"] for n in notes] == ["planned", "planned", "review", "planned"]


def test_logs_prints_the_stage_output(vault: Vault) -> None:
    vault.script({"*": {"tester": [{"exit": 0, "stdout": "42 passed, all green"}]}})
    vault.note("FR-7.md", FR)
    assert cli("run", "--once", "--config", str(vault.config))[0] == 0
    code, out, _ = cli("logs", "thing-adder", "--stage", "tester", "--config", str(vault.config))
    assert code == 0 and "out| 42 passed, all green" in out
    code, out, _ = cli("logs", "FR-7", "-f", "--config", str(vault.config))  # rests: ends
    assert code == 0 and "==> reviewer-1.log <==" in out


def test_journald_gets_priorities_and_a_terminal_gets_times() -> None:
    stream = io.StringIO()
    chosen = setup_logging(stream=stream, environ={"JOURNAL_STREAM": "1:2"})
    assert chosen == "journal"
    log = logging.getLogger("opus.test")
    log.info("FR-1: review")
    log.warning("FR-2: failed: boom")
    log.error("reload rejected")
    assert stream.getvalue().splitlines() == [
        "<6>info: FR-1: review",
        "<4>warning: FR-2: failed: boom",
        "<3>error: reload rejected",
    ]

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    assert setup_logging(stream=tty, environ={}) == "text"
    log.info("hello")
    assert tty.getvalue()[2] == ":" and tty.getvalue()[8:] == " info: hello\n"


def test_journal_stream_set_means_priorities_even_through_a_pipe(vault: Vault) -> None:
    """SPEC §20: ``$JOURNAL_STREAM`` set is enough (its device:inode need not be stderr's),
    and the start-up error that stops the service is an error line too."""
    vault.note("FR-7.md", FR)
    env = {**os.environ, "JOURNAL_STREAM": "8:1234"}
    command = [sys.executable, "-m", "opus", "run", "--once", "--config", str(vault.config)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "<6>info: FR-7: review (job" in done.stderr
    assert lines and all(re.match(r"<[0-7]>", line) for line in lines), lines
    text = vault.config.read_text()
    vault.config.write_text(text.replace("stage_timeout = 60", "stage_timeout = -1"))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"<3>opus: configuration error: {vault.config}: ")
    assert "stage_timeout" in line


def test_validate_and_doctor_name_a_callable_that_does_not_import_and_a_missing_remote(
    vault: Vault,
) -> None:
    """Both failed an FR only at its stage (the planner; the push after every agent ran)."""
    vault.write_config(
        **{
            "agents.planner": 'kind = "python"\ncallable = "no_such_module_here:plan"',
            "delivery": 'kind = "github"\nrepository = "acme/app"\nremote = "nope"',
        }
    )
    env = {**os.environ, "GITHUB_TOKEN": "ghp_x"}
    result = CliRunner().invoke(main, ["validate", "--config", str(vault.config)], env=env)
    assert result.exit_code != 0, result.output
    assert "[agents.planner.callable] cannot load callable 'no_such_module_here:plan'" in (
        result.output
    )
    assert "ModuleNotFoundError" in result.output
    assert f"[delivery.remote] no remote 'nope' in {vault.repo}" in result.output
    result = CliRunner().invoke(main, ["doctor", "--config", str(vault.config)], env=env)
    lines = result.stdout.splitlines()
    assert any(line.startswith("FAIL  agents.planner (python)") for line in lines), lines
    assert any(line.startswith("FAIL  repos.app remote") and "'nope'" in line for line in lines)


def test_doctor_checks_one_line_each(vault: Vault, tmp_path: Path) -> None:
    vault.write_config(
        **{
            "agents.coder": 'kind = "claude"\ncommand = "no-such-claude"',
            "agents.reviewer": 'kind = "codex"\nenv_passthrough = ["OPENAI_API_KEY"]',
            "[[notify]]": 'kind = "desktop"',
        }
    )
    bin_dir = tmp_path / "bin"  # git, python and a codex: no claude, no notify-send
    bin_dir.mkdir()
    for name, target in (("git", shutil.which("git")), ("python", sys.executable)):
        assert target is not None
        (bin_dir / name).symlink_to(target)
    codex = bin_dir / "codex"
    codex.write_text(f"#!{sys.executable}\nprint('codex-cli 9.9.9')\n")
    codex.chmod(0o755)
    env = {"PATH": str(bin_dir), "OPENAI_API_KEY": "sk-test-1234", "HOME": str(tmp_path)}
    result = CliRunner().invoke(main, ["doctor", "--config", str(vault.config)], env=env)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith("FAIL  agents.coder") and "no-such-claude" in line for line in lines)
    assert any(
        line.startswith("ok    repos.app") and "base branch 'main'" in line for line in lines
    )
    assert any(
        line.startswith("FAIL  notify.0 (desktop)") and "notify-send" in line for line in lines
    )
    assert f"ok    agents.reviewer (codex): codex-cli 9.9.9 ({codex})" in lines
    assert "ok    agents.reviewer (codex) credentials: $OPENAI_API_KEY handed to the agent" in lines
    assert "sk-test-1234" not in result.stdout
    assert any(line.startswith(("ok    sandbox", "FAIL  sandbox")) for line in lines)
    assert any(line.startswith("ok    executor") for line in lines)
    # validate reports the missing notify-send too (exit 1)
    result = CliRunner().invoke(main, ["validate", "--config", str(vault.config)], env=env)
    assert result.exit_code == 1 and "notify-send" in result.stdout


def test_stop_now_kills_every_agent_and_exits_within_five_seconds(vault: Vault) -> None:
    vault.script({"*": {"coder": [{"hang": True}]}})
    note = vault.note("FR-7.md", FR)
    s = Service(vault)
    try:
        wait(started(vault, "coder"), "the coder to start")
        coder = next(c for c in vault.calls() if c["stage"] == "coder")
        t0 = time.monotonic()
        code, out, err = cli("stop", "--now", "--config", str(vault.config))
        assert code == 0, out + err
        assert s.proc.poll() == 0  # "stopped" means exited, not only the lock let go
        assert s.proc.wait(5) == 0
        assert time.monotonic() - t0 < 5
        assert not alive(coder["pgid"])
        events = (vault.state / "jobs" / meta(note)["job_id"] / "events.jsonl").read_text()
        assert '"event": "interrupted"' in events or '"event":"interrupted"' in events
        assert status_of(note) == "in-progress"  # resumes at its stage on the next start
        assert "emergency stop" in s.log.read_text()
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
    code, _, err = cli("stop", "--config", str(vault.config))
    assert code == 1 and "no opus serves" in err


def test_sighup_reads_new_repositories(vault: Vault, tmp_path: Path) -> None:
    s = Service(vault)
    try:
        wait(lambda: (vault.state / "health.json").exists(), "the service to start")
        billing = make_repo(tmp_path / "billing")
        text = vault.config.read_text()
        vault.config.write_text(
            text.replace("[polling]", f'[repos.billing]\npath = "{billing}"\n\n[polling]', 1)
        )
        s.proc.send_signal(signal.SIGHUP)
        wait(lambda: "repositories: app, billing" in s.log.read_text(), "the reload")
        note = vault.note("FR-7.md", FR.replace("aliases", "repo: billing\naliases"))
        wait(lambda: status_of(note) in ("review", "failed"), "FR-7 to rest")
        assert status_of(note) == "review", meta(note)
        assert git(billing, "branch", "--list", "opus/fr-7").strip()
        assert s.stop()[0] == 0
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def test_a_full_disk_at_start_is_one_line(vault: Vault) -> None:
    """The state folder on a full filesystem (a 256 KiB tmpfs in a private mount namespace,
    filled up): one line, no traceback."""
    import pytest

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a private tmpfs")
    vault.state.mkdir()
    script = (
        f'mount -t tmpfs -o size=256k tmpfs "{vault.state}" || exit 77; '
        f'head -c 1M /dev/zero > "{vault.state}/fill" 2>/dev/null; '
        f'exec "{sys.executable}" -m opus run --once --config "{vault.config}"'
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=60
    )
    if done.returncode == 77:
        pytest.skip("cannot mount a tmpfs here")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("opus: No space left on device")


def test_the_dashboard_shows_each_fr_once_with_links_tables_and_a_gantt(vault: Vault) -> None:
    vault.script({"FR-2": {"coder": [{"exit": 1}]}})
    vault.note("FR-1.md", "---\nid: FR-1\ntitle: First | one\n---\nx\n")
    two = vault.note("FR-2.md", "---\nid: FR-2\ntitle: Second\n---\nx\n")
    cfg = str(vault.config)
    assert cli("run", "--once", "--config", cfg)[0] == 0
    assert meta(two)["status"] == "failed"
    vault.script({})
    assert cli("retry", "FR-2", "--config", cfg)[0] == 0
    assert cli("run", "--once", "--config", cfg)[0] == 0
    text = (vault.root / "00_system" / "opus-dashboard.md").read_text()
    head, body = text.split("\n---\n", 1)
    updated = head.split("updated_at: ")[1]
    assert len(updated) == 19 and "." not in updated  # 2026-12-01T14:52:03
    review = body.split("## Awaiting review")[1].split("##")[0]
    assert "| [[10_features/03_planned/FR-1\\|FR-1]] | First \\| one |" in review
    assert "[[10_features/03_planned/FR-2\\|FR-2]]" in review
    recent = body.split("## Recent outcomes")[1].split("##")[0]
    assert "FR-2" not in recent  # its old failure is not listed while it is in review
    assert "*(none)*" in recent
    gantt = body.split("```mermaid\n")[1].split("```")[0]
    assert gantt.startswith("gantt\n    dateFormat YYYY-MM-DD HH:mm:ss\n")
    assert "    section FR-1 First | one\n" in gantt and gantt.count("    section FR-2 Second") == 2
    assert "    coder 1 :crit, " in gantt and "    reviewer 1 :done, " in gantt


FLOOD = """\
import os, sys, time
line = (b"x" * 1023) + b"\\n"
block = line * 1024  # 1 MiB
for _ in range(200):
    sys.stdout.buffer.write(block)
sys.stdout.flush()
flag = sys.argv[1]
while not os.path.exists(flag):
    time.sleep(0.02)
"""


def _rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_an_agent_printing_200_mb_keeps_opus_rss_bounded(vault: Vault, tmp_path: Path) -> None:
    """SPEC §12: ≤ 150 MB RSS while one agent prints 200 MB (the log file gets it all)."""
    script = tmp_path / "flood.py"
    script.write_text(FLOOD)
    flag = tmp_path / "printed-it-all"
    vault.write_config(
        **{
            "agents.coder": 'kind = "command"\n'
            f"command = {json.dumps([sys.executable, str(script), str(flag)])}",
            "pipeline": "stage_timeout = 300\nstall_timeout = 120\nretries = 0",
        }
    )
    note = vault.note("FR-7.md", FR)
    s = Service(vault)
    try:
        wait(lambda: "job_id" in meta(note), "the job to start")
        log = vault.state / "jobs" / meta(note)["job_id"] / "coder-1.log"
        wait(lambda: log.exists() and log.stat().st_size >= 200 * 2**20, "200 MB logged", 240)
        peak = _rss_peak_mb(s.proc.pid)
        flag.touch()
        wait(lambda: status_of(note) in ("review", "failed", "blocked"), "FR-7 to rest", 120)
        print(f"opus peak RSS while the agent printed 200 MB: {peak:.0f} MB")
        assert peak <= 150, peak
        assert s.stop()[0] == 0
    finally:
        flag.touch()
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def test_a_retry_reuses_the_frs_branch_and_removes_the_failed_worktree(vault: Vault) -> None:
    vault.script({"FR-7": {"tester": [{"exit": 1}]}})
    vault.write_config(
        pipeline="stage_timeout = 60\nstall_timeout = 30\nretries = 0\nmax_iterations = 1"
    )
    note = vault.note("FR-7.md", FR)
    cfg = str(vault.config)
    assert cli("run", "--once", "--config", cfg)[0] == 0
    assert meta(note)["status"] in ("failed", "blocked")
    failed_job = meta(note)["job_id"]
    assert (vault.state / "worktrees" / failed_job).is_dir()
    vault.script({})
    assert cli("retry", "FR-7", "--config", cfg)[0] == 0
    assert cli("run", "--once", "--config", cfg)[0] == 0
    assert meta(note)["status"] == "review"
    assert meta(note)["branch"] == "opus/fr-7"  # not opus/fr-7-2
    assert not (vault.state / "worktrees" / failed_job).exists()
    assert "opus/fr-7-2" not in git(vault.repo, "branch", "--list")


def test_logs_follow_across_stages_until_the_fr_rests(vault: Vault, tmp_path: Path) -> None:
    flag = tmp_path / "go-on"
    vault.script(
        {
            "*": {
                "coder": [
                    {"stdout": "coder says hi", "wait_for": str(flag), "write": {"FR-7.txt": "x\n"}}
                ]
            }
        }
    )
    note = vault.note("FR-7.md", FR)
    s = Service(vault)
    try:
        wait(started(vault, "coder"), "the coder to start")
        follow = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "opus",
                "logs",
                "thing-adder",
                "-f",
                "--config",
                str(vault.config),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert follow.stdout is not None
        first = follow.stdout.readline()  # it is following the running coder's log
        flag.touch()
        rest, _ = follow.communicate(timeout=60)
        out = first + rest
        assert follow.returncode == 0
        assert status_of(note) == "review"
        headers = [line for line in out.splitlines() if line.startswith("==> ")]
        assert headers[0] == "==> coder-1.log <==" and headers[-1] == "==> reviewer-1.log <=="
        assert "==> tester-1.log <==" in headers
        assert "out| coder says hi" in out
        assert s.stop()[0] == 0
    finally:
        flag.touch()
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()

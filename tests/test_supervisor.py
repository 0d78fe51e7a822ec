"""Supervision of real child processes: groups, timeouts, stalls, the kill ladder, retries."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from opus.orchestrator.errors import (
    AgentCrashed,
    AgentError,
    AgentNotFound,
    AgentOutputError,
    AgentStalled,
    AgentTimeout,
    BackendError,
)
from opus.orchestrator.process_output import output_tail
from opus.orchestrator.redact import Redactor
from opus.orchestrator.supervisor import (
    ProcessResult,
    group_alive,
    kill_group,
    run_process,
    with_retries,
)
from opus.orchestrator.workspace import worktree_fingerprint

BEHAVE = Path(__file__).parent / "agent_scripts" / "behave.py"
ENV = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def dead(pid: int) -> bool:
    """``pid`` no longer runs. A killed grandchild is reparented to init and stays a zombie
    until init reaps it (seconds on some machines, never without an init): dead all the same."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    fields = _stat(pid)
    return fields is None or fields[0] == "Z"


def gone(pgid: int) -> bool:
    """No process of group ``pgid`` runs (zombies awaiting init count as gone, as in dead)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    members = [f for f in map(_stat, pids) if f is not None and int(f[2]) == pgid]
    return bool(members) and all(f[0] == "Z" for f in members)  # no /proc: trust the kernel


class Run:
    """Runs behave.py in tmp_path; remembers the group ids reported."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.log = tmp_path / "logs" / "coder-1.log"
        self.spawned: list[int] = []
        self.exited: list[int] = []

    async def __call__(self, *args: str, **kw: Any) -> ProcessResult:
        options: dict[str, Any] = {
            "cwd": self.dir,
            "env": ENV,
            "stdin": None,
            "timeout": 20.0,
            "stall_timeout": 20.0,
            "log_file": self.log,
            "redactor": Redactor(),
            "on_spawn": self.spawned.append,
            "on_exit": self.exited.append,
            "grace": 1.0,
        }
        options.update(kw)
        return await run_process([sys.executable, str(BEHAVE), *args], **options)

    @property
    def pgid(self) -> int:
        assert len(self.spawned) == 1
        return self.spawned[0]


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return Run(tmp_path)


@pytest.mark.anyio
async def test_output_stdin_and_log(run: Run) -> None:
    result = await run("echo", stdin=b"the prompt\nline two\n")
    assert result.returncode == 0 and result.signal is None
    assert result.stdout == "len=20\nthe prompt\nline two\n"
    assert result.stderr == "to stderr\n"
    log = run.log.read_text()
    assert "out| the prompt\n" in log and "err| to stderr\n" in log and "exit status 0" in log
    assert oct(run.log.stat().st_mode & 0o777) == "0o600"
    assert run.exited == run.spawned and gone(run.pgid)


@pytest.mark.anyio
async def test_stdin_none_is_dev_null(run: Run) -> None:
    result = await run("echo")
    assert result.stdout.startswith("len=0\n")


@pytest.mark.anyio
async def test_a_child_that_never_reads_stdin_does_not_block_us(run: Run) -> None:
    result = await run("exit", "0", stdin=b"x" * 2**20)
    assert result.returncode == 0 and result.stdout == "bye\n"


@pytest.mark.anyio
async def test_secrets_are_redacted_in_result_and_log(run: Run) -> None:
    result = await run("secret", "s3cr3t-value", redactor=Redactor(["s3cr3t-value"]))
    assert result.stdout == "token is ***\n" and result.stderr == "err ***\n"
    assert "s3cr3t-value" not in run.log.read_text().split("\n", 1)[1]
    assert "out| token is ***" in run.log.read_text()


@pytest.mark.anyio
async def test_large_output_is_read_while_running(run: Run) -> None:
    result = await run("flood", str(3 * 2**20))
    assert len(result.stdout) == 3 * 2**20


@pytest.mark.anyio
async def test_non_zero_exit_and_signal(run: Run) -> None:
    result = await run("exit", "3")
    assert (result.returncode, result.signal) == (3, None)
    assert result.stdout == "bye\n" and result.stderr == "failing\n"
    other = Run(run.dir)
    killed = await other("suicide")
    assert killed.returncode == -signal.SIGKILL and killed.signal == signal.SIGKILL


@pytest.mark.anyio
async def test_timeout_kills_the_group(run: Run) -> None:
    started = time.monotonic()
    with pytest.raises(AgentTimeout) as info:
        await run("hang", timeout=0.5)
    assert time.monotonic() - started < 5
    assert info.value.retryable and "timeout of 0.5 s" in str(info.value)
    assert "started" in info.value.output
    assert gone(run.pgid) and run.exited == [run.pgid]
    assert "SIGTERM to process group" in run.log.read_text()


@pytest.mark.anyio
async def test_silence_is_a_stall(run: Run) -> None:
    with pytest.raises(AgentStalled) as info:
        await run(
            "silent",
            stall_timeout=0.4,
            activity=functools.partial(worktree_fingerprint, run.dir),
        )
    assert info.value.retryable and "no output and no worktree change" in str(info.value)
    assert gone(run.pgid)


@pytest.mark.anyio
async def test_writing_to_the_worktree_is_not_a_stall(run: Run) -> None:
    # a write every 0.1 s, seen by a probe every stall_timeout / 4: gaps of ~0.35 s at worst,
    # well within 1 s; the child runs 2.5 s, so without the activity probe it would stall
    result = await run(
        "busy", "2.5", stall_timeout=1.0, activity=functools.partial(worktree_fingerprint, run.dir)
    )
    assert result.returncode == 0 and (run.dir / "busy.txt").exists()


@pytest.mark.anyio
async def test_sigterm_ignored_means_sigkill_after_grace(run: Run) -> None:
    ready = run.dir / "ready"
    started = time.monotonic()
    with pytest.raises(AgentTimeout):
        await run("stubborn", str(ready), timeout=0.8, grace=0.3)
    assert ready.exists(), "the child got to ignore SIGTERM before the timeout"
    assert 0.8 + 0.3 <= time.monotonic() - started < 6
    log = run.log.read_text()
    assert log.index("SIGTERM") < log.index("SIGKILL")
    assert gone(run.pgid)


@pytest.mark.anyio
async def test_grandchild_left_behind_is_killed(run: Run) -> None:
    marker = run.dir / "grandchild.pid"
    started = time.monotonic()
    result = await run("grandchild", str(marker))
    assert result.returncode == 0 and result.stdout.startswith("grandchild ")
    assert time.monotonic() - started < 8, "a grandchild holding stdout must not hang us"
    assert gone(run.pgid)
    assert dead(int(marker.read_text()))
    assert run.exited == [run.pgid]
    assert "stopping what is left of its group: SIGTERM" in run.log.read_text()


@pytest.mark.anyio
async def test_cancelling_the_caller_kills_the_group(run: Run) -> None:
    marker = run.dir / "linger.pid"

    async def cancel_when_ready(scope: anyio.CancelScope) -> None:
        with anyio.fail_after(10):
            while not marker.exists():  # noqa: ASYNC110 (a real child's file)
                await anyio.sleep(0.02)
        scope.cancel()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_when_ready, scope)
            await run("linger", str(marker))
    assert scope.cancelled_caught
    grandchild = int(marker.read_text())
    assert gone(run.pgid)
    assert dead(grandchild)
    assert run.exited == [run.pgid]
    assert "interrupted: SIGTERM" in run.log.read_text()


@pytest.mark.anyio
async def test_missing_program_is_agent_not_found(tmp_path: Path) -> None:
    with pytest.raises(AgentNotFound) as info:
        await run_process(
            ["no-such-agent-cli"], cwd=tmp_path, env=ENV, stdin=None, timeout=5,
            stall_timeout=5, log_file=tmp_path / "x.log", redactor=Redactor(), what="coder",
        )  # fmt: skip
    assert str(info.value) == (
        "`no-such-agent-cli` not found on PATH; install it or change [agents.coder] kind/command"
    )
    assert not info.value.retryable


@pytest.mark.anyio
async def test_missing_worktree_is_not_agent_not_found(tmp_path: Path) -> None:
    with pytest.raises(AgentError) as info:
        await run_process(
            [sys.executable, "-c", "pass"], cwd=tmp_path / "gone", env=ENV, stdin=None,
            timeout=5, stall_timeout=5, log_file=tmp_path / "x.log", redactor=Redactor(),
        )  # fmt: skip
    assert not isinstance(info.value, AgentNotFound)
    assert "working directory" in str(info.value)


def test_kill_group_on_a_stray_group() -> None:
    shell = subprocess.Popen(
        ["sh", "-c", "sleep 1000 & sleep 1000 & echo $!"],
        stdout=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    assert shell.stdout is not None
    orphan = int(shell.stdout.readline())
    shell.wait(timeout=10)
    shell.stdout.close()
    pgid = shell.pid
    assert group_alive(pgid)
    assert kill_group(pgid, grace=1.0) is True
    assert not group_alive(pgid)
    assert dead(orphan)
    assert kill_group(pgid, grace=1.0) is False  # safe on a gone group


def test_kill_group_refuses_our_own_group() -> None:
    assert kill_group(os.getpgrp()) is False
    assert kill_group(1) is False
    assert os.getpgrp() > 0  # still here


def test_output_tail_keeps_the_end() -> None:
    text = "".join(f"line {i}\n" for i in range(1000))
    tail = output_tail(text, "an error\n")
    assert tail.splitlines()[-1] == "an error" and tail.splitlines()[0] == "line 801"
    assert len(output_tail("x" * 100_000)) == 16 * 1024


class Flaky:
    """Fails with the given errors, then returns "ok"."""

    def __init__(self, *errors: AgentError) -> None:
        self.errors = list(errors)
        self.calls: list[int] = []

    async def __call__(self, n: int) -> str:
        self.calls.append(n)
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.mark.anyio
async def test_retryable_errors_are_retried_with_backoff_and_jitter() -> None:
    attempt = Flaky(AgentTimeout("slow"), AgentCrashed("died", retryable=True))
    sleep, seen = Sleeps(), []
    result, attempts = await with_retries(
        attempt, retries=2, base_delay=2.0, sleep=sleep, rand=lambda: 0.25,
        on_retry=lambda n, e, d: seen.append((n, type(e).__name__, d)),
    )  # fmt: skip
    assert (result, attempts) == ("ok", 3)
    assert attempt.calls == [1, 2, 3]
    assert sleep.delays == [1.5, 3.0]  # 2·2⁰·0.75, 2·2¹·0.75
    assert seen == [(1, "AgentTimeout", 1.5), (2, "AgentCrashed", 3.0)]


@pytest.mark.anyio
async def test_delay_is_capped_and_retry_after_wins() -> None:
    attempt = Flaky(AgentOutputError("bad"), BackendError("busy", status=429, retry_after=7.0))
    sleep = Sleeps()
    await with_retries(
        attempt, retries=5, base_delay=50.0, max_delay=60.0, sleep=sleep, rand=lambda: 1.0
    )
    assert sleep.delays == [75.0, 7.0]  # min(60, 50)·1.5, then the server's Retry-After


@pytest.mark.anyio
async def test_non_retryable_error_propagates_at_once() -> None:
    attempt = Flaky(AgentNotFound("no claude"))
    sleep = Sleeps()
    with pytest.raises(AgentNotFound) as info:
        await with_retries(attempt, retries=3, sleep=sleep)
    assert info.value.attempts == 1  # type: ignore[attr-defined]
    assert attempt.calls == [1] and sleep.delays == []


@pytest.mark.anyio
async def test_last_retryable_error_propagates_with_attempts() -> None:
    attempt = Flaky(*(AgentStalled(f"stall {i}") for i in range(5)))
    with pytest.raises(AgentStalled) as info:
        await with_retries(attempt, retries=2, sleep=Sleeps())
    assert info.value.attempts == 3  # type: ignore[attr-defined]
    assert str(info.value) == "stall 2" and attempt.calls == [1, 2, 3]


@pytest.mark.anyio
async def test_a_runaway_output_fills_the_log_only_up_to_its_limit(tmp_path: Path) -> None:
    """A stage log takes the output's start up to its limit, then only keeps its end —
    written when the stage ends, with how much was left out (a runaway agent filled the
    state folder at ~20 MB/s, for all of stage_timeout)."""
    from opus.orchestrator.process_output import LogSink

    log = tmp_path / "coder-1.log"
    sink = await LogSink.open(log, Redactor(["s3cr3t"]), limit=2000, tail=500)
    await sink.note("coder agent started")
    for n in range(1000):
        await sink.feed("out", f"line {n:04d} s3cr3t\n".encode())
    await sink.note("exited with status 0")
    await sink.aclose()
    text = log.read_text()
    assert len(text) < 2000 + 500 + 300
    assert text.startswith("# coder agent started\nout| line 0000 ***\n")
    assert "# [the log is full: only the output's end is kept, below]" in text
    assert "# exited with status 0" in text  # opus's own lines are always written
    _, _, tail = text.partition("characters of output not logged; the last ")
    assert tail.endswith("out| line 0999 ***\n") and "line 0500" not in tail
    assert "s3cr3t" not in text
    assert log.stat().st_mode & 0o777 == 0o600


DAEMONS = """\
import os, subprocess, sys
out = sys.argv[1]
setsid = subprocess.Popen(["setsid", "sleep", "777"])  # a session of its own
if os.fork() == 0:  # a classic daemon: fork, setsid, fork again, parent exits
    os.setsid()
    if os.fork() == 0:
        open(out + ".daemon", "w").write(str(os.getpid()))
        os.execvp("sleep", ["sleep", "778"])
    os._exit(0)
open(out, "w").write(str(setsid.pid))
while not os.path.exists(out + ".daemon"):
    pass
"""


def test_what_an_agent_started_outside_its_group_dies_with_its_stage(tmp_path: Path) -> None:
    """An agent's ``setsid`` child and a double-forked daemon leave its process group and
    session; they still carry its stage's environment, and die when the stage ends (they
    lived on, unsandboxed, after the stage and after opus)."""
    script = tmp_path / "daemons.py"
    script.write_text(DAEMONS)
    pids = tmp_path / "pids"
    env = {**ENV, "OPUS_JOB_ID": "job-1", "OPUS_STAGE": "coder", "OPUS_ITERATION": "1"}
    other = subprocess.Popen(  # the same stage of another job: not this stage's
        ["sleep", "779"], env={**env, "OPUS_JOB_ID": "job-2"}, start_new_session=True
    )
    try:
        result = anyio.run(
            functools.partial(
                run_process, [sys.executable, str(script), str(pids)], cwd=tmp_path, env=env,
                stdin=None, timeout=20, stall_timeout=20, log_file=tmp_path / "coder-1.log",
                redactor=Redactor(),
            )
        )  # fmt: skip
        assert result.returncode == 0
        strays = [int(pids.read_text()), int(Path(f"{pids}.daemon").read_text())]
        assert all(dead(pid) for pid in strays), [_stat(p) for p in strays]
        assert "left outside its process group: SIGKILL" in (tmp_path / "coder-1.log").read_text()
        assert other.poll() is None  # another job's process is left alone
    finally:
        other.kill()
        other.wait()


@pytest.mark.anyio
async def test_the_log_limit_counts_what_earlier_attempts_wrote(tmp_path: Path) -> None:
    """Each attempt appends to the stage's log: the limit is the file's, not an attempt's."""
    from opus.orchestrator.process_output import LogSink

    log = tmp_path / "coder-1.log"
    log.write_text("x" * 1500)  # attempt 1
    sink = await LogSink.open(log, Redactor(), limit=2000, tail=100)
    for n in range(100):
        await sink.feed("out", f"line {n:03d}\n".encode())
    await sink.aclose()
    text = log.read_text()
    assert len(text) < 2000 + 100 + 200 and "the log is full" in text
    assert text.endswith("out| line 099\n")

"""Edge cases of the agent layer found by a review (SPEC §3.2, §5, §5.1–5.3; NOTES "Agent
processes", "Agent CLIs, headless", "OpenAI-compatible endpoints"): signals, escaped process
groups, secrets on long lines, feedback for every stage, 126/127, stream-json, bad URLs,
bounded HTTP retries, and the spend of failed attempts. Each test states what is required.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from opus.orchestrator.agents.base import StageContext
from opus.orchestrator.agents.command import CommandAgent
from opus.orchestrator.agents.openai import OpenAIAgent
from opus.orchestrator.agents.presets import ClaudeAgent
from opus.orchestrator.config import AgentSection
from opus.orchestrator.errors import AgentCrashed, AgentError, BackendError
from opus.orchestrator.lifecycle import Stage
from opus.orchestrator.models import FeatureRequest
from opus.orchestrator.redact import Redactor
from opus.orchestrator.supervisor import run_process, with_retries

from .conftest import Vault
from .test_cli_basics import meta, opus

ENV = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_ctx(tmp_path: Path, stage: Stage, *, timeout: float = 20.0) -> StageContext:
    worktree = tmp_path / "worktree"
    artifacts = tmp_path / "state" / "jobs" / "job-1"
    worktree.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    prompt = "# FR-7: Greeting\n\nSay hello.\n"
    prompt_file = artifacts / f"prompt-{stage}-1.md"
    prompt_file.write_text(prompt)
    fr = FeatureRequest(id="FR-7", title="Greeting", path=tmp_path / "FR-7.md", body="Say hello.")
    return StageContext(
        stage=stage, iteration=1, job_id="job-1", fr=fr, worktree=worktree,
        artifacts=artifacts, prompt=prompt, prompt_file=prompt_file,
        output_file=artifacts / f"output-{stage}-1", log_file=artifacts / f"{stage}-1.log",
        base_commit="0" * 40, timeout=timeout, stall_timeout=timeout,
    )  # fmt: skip


def script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# -- supervision (SPEC §3.2) --------------------------------------------------------------


@pytest.mark.anyio
async def test_tester_killed_by_a_signal_is_a_transient_failure(tmp_path: Path) -> None:
    """SPEC §3.2: "agent exit by signal" is transient and retried. The tester's non-zero =
    tests failed rule (§5.1) is about exit statuses; a test run killed by a signal (e.g. the
    OOM killer's SIGKILL) says nothing about the tests."""
    argv = script(tmp_path, "killed.py", """\
        import os, signal, sys
        print("collected 3 items", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)  # fmt: skip
    agent = CommandAgent(AgentSection(kind="command", command=argv), Stage.TESTER, environ=ENV)
    with pytest.raises(AgentCrashed) as info:
        await agent.run(make_ctx(tmp_path, Stage.TESTER))
    assert info.value.retryable


@pytest.mark.anyio
async def test_grandchild_in_its_own_process_group_is_killed(tmp_path: Path) -> None:
    """SPEC §3.2 / NOTES: what an agent leaves running is killed after it exits. A grandchild
    that moved to a process group of its own (``set -m`` shells, ``process_group=0``) is still
    in the agent's session (sid = the agent's pgid) but survives ``killpg``."""
    pid_file = tmp_path / "grandchild.pid"
    argv = script(tmp_path, "spawner.py", f"""\
        import os, subprocess, sys
        p = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], process_group=0,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        own_group_same_session = os.getpgid(p.pid) == p.pid and os.getsid(p.pid) == os.getsid(0)
        open({str(pid_file)!r}, "w").write(f"{{p.pid}} {{own_group_same_session}}")
    """)  # fmt: skip
    grandchild = 0
    try:
        await run_process(
            argv, cwd=tmp_path, env=ENV, stdin=None, timeout=20, stall_timeout=20,
            log_file=tmp_path / "run.log", redactor=Redactor(), grace=0.5,
        )  # fmt: skip
        pid, checked = pid_file.read_text().split()
        grandchild = int(pid)
        assert checked == "True"
        assert not alive(grandchild)
    finally:
        if grandchild and alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


# -- secrets (SPEC §6: no secret value in a log) ---------------------------------------------


@pytest.mark.anyio
async def test_a_secret_on_a_long_line_is_not_split_across_log_lines(tmp_path: Path) -> None:
    """LogSink.feed flushes a line longer than 64 KiB in pieces and redacts each piece alone,
    so a secret straddling a piece boundary lands in the log in two readable halves."""
    secret = "TOPSECRET4242"  # 13 characters: piece boundaries cannot all fall between copies
    argv = script(tmp_path, "long_line.py", f"""\
        import sys
        sys.stdout.write({secret!r} * 40000 + "\\n")
    """)  # fmt: skip
    log = tmp_path / "run.log"
    await run_process(
        argv, cwd=tmp_path, env=ENV, stdin=None, timeout=20, stall_timeout=20,
        log_file=log, redactor=Redactor([secret]), grace=0.5,
    )  # fmt: skip
    lines = log.read_text().splitlines()
    joined = "".join(ln[len("out| ") :] for ln in lines if ln.startswith("out| "))
    assert secret not in joined
    assert joined.count("***") == 40000


# -- the command contract (SPEC §5.1) ------------------------------------------------------


def test_feedback_file_reaches_every_stage_from_iteration_two(vault: Vault) -> None:
    """SPEC §5.1: the environment holds, "from iteration 2 on", OPUS_FEEDBACK_FILE (the
    previous iteration's feedback). The pipeline gives it to the coder only; the tester and
    the reviewer of iteration 2 (which may check the earlier issues were fixed) get none."""
    vault.script({"FR-1": {"tester": [{"exit": 1, "stdout": "FAILED"}, {"exit": 0}]}})
    note = vault.note(
        "FR-1.md", "---\nid: FR-1\ntitle: Thing\npriority: medium\n---\n# Thing\n\nDo it.\n"
    )
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    assert meta(note)["status"] == "review"
    second = [
        (c["stage"], c["feedback"] is not None)
        for c in vault.calls()
        if c["event"] == "end" and c["iteration"] == 2
    ]
    assert second == [("coder", True), ("tester", True), ("reviewer", True)]


@pytest.mark.anyio
async def test_exit_127_of_a_non_tester_agent_is_not_retried(tmp_path: Path) -> None:
    """SPEC §3.2: "command not found" is permanent, never retried; §5.1 names 126/127 "cannot
    run". A coder run through a wrapper (``sh -c 'claud -p'``) exits 127: today it is an
    AgentCrashed with retryable=True, so the pipeline runs it ``retries`` more times."""
    argv = ["sh", "-c", "no-such-agent-cli-xyz --go"]
    agent = CommandAgent(AgentSection(kind="command", command=argv), Stage.CODER, environ=ENV)
    with pytest.raises(AgentError) as info:
        await agent.run(make_ctx(tmp_path, Stage.CODER))
    assert "127" in str(info.value)
    assert not info.value.retryable


# -- presets (NOTES "Agent CLIs, headless") ------------------------------------------------


def test_claude_stream_json_gets_verbose(tmp_path: Path) -> None:
    """NOTES: claude's ``--output-format stream-json`` **requires** ``--verbose``. The preset
    parses stream-json output (``_claude_result``), and ``args`` are appended after its own
    ``--output-format json``, so ``args = ["--output-format", "stream-json"]`` yields an argv
    the CLI rejects."""
    section = AgentSection(kind="claude", args=["--output-format", "stream-json"])
    argv = ClaudeAgent(section, Stage.CODER).build_argv(make_ctx(tmp_path, Stage.CODER))
    assert "stream-json" in argv
    assert "--verbose" in argv


# -- the openai kind (NOTES "OpenAI-compatible endpoints") ---------------------------------


@pytest.mark.anyio
async def test_an_unparseable_base_url_is_a_permanent_agent_error(tmp_path: Path) -> None:
    """SPEC §3.2: invalid config is a permanent failure. A base_url httpx cannot parse must
    be an AgentError (not httpx.InvalidURL escaping the pipeline): opus refuses it when the
    agent is built, i.e. at start-up, naming the section."""
    section = AgentSection(kind="openai", model="m", base_url="http://[::1/v1")
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
    with pytest.raises(AgentError) as info:
        OpenAIAgent(section, Stage.PLANNER, environ={}, transport=transport)
    assert not info.value.retryable
    assert "[agents.planner] base_url" in str(info.value)


@pytest.mark.anyio
async def test_retries_of_an_overloaded_endpoint_are_bounded_by_retries(tmp_path: Path) -> None:
    """SPEC §3.2: transient failures are retried "up to `retries` times". The openai agent
    retries 5xx ``tries`` (3) times inside one attempt and then raises a retryable
    BackendError, which the pipeline's ``with_retries`` retries again: with retries = 1 the
    endpoint gets 6 requests instead of at most 2."""
    requests: list[httpx.Request] = []

    def overloaded(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(503, text="overloaded")

    async def no_sleep(delay: float) -> None:
        return None

    section = AgentSection(kind="openai", model="m", base_url="http://llm.test/v1")
    agent = OpenAIAgent(
        section, Stage.PLANNER, environ={}, transport=httpx.MockTransport(overloaded),
        sleep=no_sleep, tries=1 + 1,  # what build_agent gives it for `retries = 1`
    )  # fmt: skip
    ctx = make_ctx(tmp_path, Stage.PLANNER)

    async def attempt(n: int) -> Any:
        return await agent.run(ctx)

    with pytest.raises(BackendError):
        await with_retries(attempt, retries=1, sleep=no_sleep)
    assert len(requests) <= 2


# -- usage (SPEC §5.2) ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_usage_of_a_crashed_attempt_is_kept(tmp_path: Path) -> None:
    """SPEC §5.2: usage an agent reports in its output file is recorded; the budget is a
    hard cap. ``parse`` calls ``check_exit`` before reading usage, so an attempt that wrote
    its usage and then exited non-zero raises an AgentCrashed with ``usage`` None and the
    pipeline never counts that spend (the reviewer path does attach it: "still paid for")."""
    argv = script(tmp_path, "spent.py", """\
        import json, os, sys
        usage = {"input_tokens": 1000, "output_tokens": 10, "cost_usd": 0.5}
        open(os.environ["OPUS_OUTPUT_FILE"], "w").write(json.dumps({"usage": usage}))
        sys.exit(1)
    """)  # fmt: skip
    agent = CommandAgent(AgentSection(kind="command", command=argv), Stage.CODER, environ=ENV)
    with pytest.raises(AgentCrashed) as info:
        await agent.run(make_ctx(tmp_path, Stage.CODER))
    assert info.value.usage is not None and info.value.usage.cost_usd == 0.5


@pytest.mark.anyio
async def test_usage_of_a_claude_error_result_is_kept(tmp_path: Path) -> None:
    """NOTES: claude's final object carries ``total_cost_usd`` also when ``is_error`` (e.g.
    ``error_max_turns`` after a long, paid run). ``ClaudeAgent.reply`` raises AgentCrashed
    without the usage, so that spend never reaches the job or the budget."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    claude = bin_dir / "claude"
    result = {
        "type": "result",
        "subtype": "error_max_turns",
        "is_error": True,
        "result": "",
        "total_cost_usd": 0.75,
        "usage": {"input_tokens": 900, "output_tokens": 40},
    }
    claude.write_text(
        f"#!{sys.executable}\nimport sys\n"
        "if sys.argv[1:] == ['--version']:\n    print('claude 9.9.9'); sys.exit(0)\n"
        f"sys.stdin.read()\nprint({json.dumps(result)!r})\n"
    )
    claude.chmod(0o755)
    environ = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}"}
    agent = ClaudeAgent(AgentSection(kind="claude"), Stage.CODER, environ=environ)
    with pytest.raises(AgentCrashed) as info:
        await agent.run(make_ctx(tmp_path, Stage.CODER))
    assert "error_max_turns" in str(info.value)
    assert info.value.usage is not None and info.value.usage.cost_usd == 0.75

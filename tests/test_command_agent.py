"""The command contract (SPEC §5.1) against real child processes, and the scripted fake."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from opus.orchestrator.agents.base import Agent, StageContext, StageResult
from opus.orchestrator.agents.command import CommandAgent, parse_verdict, substitute
from opus.orchestrator.agents.fake import (
    ScriptedAgent,
    approve,
    request_changes,
    tests_fail,
    tests_pass,
    writes,
)
from opus.orchestrator.config import AgentSection
from opus.orchestrator.errors import (
    AgentCrashed,
    AgentNotFound,
    AgentOutputError,
    AgentTimeout,
)
from opus.orchestrator.lifecycle import Stage
from opus.orchestrator.models import FeatureRequest, Feedback
from opus.orchestrator.workspace import worktree_fingerprint

SCRIPTS = Path(__file__).parent / "agent_scripts"
CONTRACT = SCRIPTS / "contract.py"
PARENT_ENV = {
    "PATH": os.environ["PATH"],
    "HOME": "/home/person",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TERM": "xterm",
    "USER": "person",
    "GITHUB_TOKEN": "ghp_parent_token",
    "GH_TOKEN": "gh_parent_token",
    "NOTIFY_SOCKET": "/run/systemd/notify",
    "WATCHDOG_USEC": "30000000",
    "LISTEN_FDS": "3",
    "PYTHONPATH": "/somewhere/else",
    "PYTHONHOME": "/nowhere",
    "VIRTUAL_ENV": "/opt/venv",
    "UNRELATED": "not for agents",
    "MY_API_KEY": "key-passed-through",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_ctx(
    tmp_path: Path,
    stage: Stage,
    *,
    iteration: int = 1,
    prompt: str = "# FR-7: Greeting\n\nSay hello.\n",
    timeout: float = 20.0,
    feedback: bool = False,
) -> StageContext:
    worktree = tmp_path / "worktree"
    artifacts = tmp_path / "state" / "jobs" / "job-1"
    note = tmp_path / "vault" / "FR-7.md"
    for folder in (worktree, artifacts, note.parent):
        folder.mkdir(parents=True, exist_ok=True)
    note.write_text("---\nid: FR-7\n---\nSay hello.\n")
    prompt_file = artifacts / f"prompt-{stage}-{iteration}.md"
    prompt_file.write_text(prompt)
    feedback_file = None
    if feedback:
        feedback_file = artifacts / f"feedback-{iteration}.json"
        fb = Feedback(iteration=iteration - 1, reason="tests_failed", message="tests failed")
        feedback_file.write_text(fb.model_dump_json())
    return StageContext(
        stage=stage,
        iteration=iteration,
        job_id="job-1",
        fr=FeatureRequest(id="FR-7", title="Greeting", path=note, body="Say hello.\n"),
        worktree=worktree,
        artifacts=artifacts,
        prompt=prompt,
        prompt_file=prompt_file,
        output_file=artifacts / f"output-{stage}-{iteration}",
        log_file=artifacts / f"{stage}-{iteration}.log",
        base_commit="0" * 40,
        timeout=timeout,
        stall_timeout=timeout,
        feedback_file=feedback_file,
    )


def contract_agent(
    tmp_path: Path, stage: Stage, spec: dict[str, Any], **section: Any
) -> CommandAgent:
    record = tmp_path / "record.jsonl"
    command = [sys.executable, str(CONTRACT), str(record), json.dumps(spec)]
    return CommandAgent(
        AgentSection(kind="command", command=command, **section), stage, environ=PARENT_ENV
    )


def recorded(tmp_path: Path) -> dict[str, Any]:
    lines = (tmp_path / "record.jsonl").read_text().splitlines()
    assert len(lines) == 1
    got: dict[str, Any] = json.loads(lines[0])
    return got


@pytest.mark.anyio
async def test_the_command_contract(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, Stage.CODER, iteration=2, feedback=True)
    args = ["{prompt_file}", "{output_file}", "{worktree}", "{fr_file}", "{stage}",
            "{iteration}", "{job_id}", "{other}", "x{stage}y{iteration}", "{ stage }"]  # fmt: skip
    agent = contract_agent(
        tmp_path, Stage.CODER, {"stdout": "changed things\n"}, args=args,
        env={"AGENT_MODE": "fast"}, env_passthrough=["MY_API_KEY", "GITHUB_TOKEN"],
    )  # fmt: skip
    assert isinstance(agent, Agent)
    result = await agent.run(ctx)
    got = recorded(tmp_path)
    assert result.output == "changed things" and result.passed
    assert got["cwd"] == str(ctx.worktree)
    assert (got["stdin"], got["stdin_kind"]) == (ctx.prompt, "pipe")
    assert got["argv"] == [
        str(ctx.prompt_file), str(ctx.output_file), str(ctx.worktree), str(ctx.fr.path),
        "coder", "2", "job-1", "{other}", "xcodery2", "{ stage }",
    ]  # fmt: skip
    env = got["env"]
    for name in ("GITHUB_TOKEN", "GH_TOKEN", "NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS",
                 "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "UNRELATED"):  # fmt: skip
        assert name not in env, name
    for name in ("PATH", "HOME", "LANG", "LC_ALL", "TERM", "USER", "MY_API_KEY"):
        assert env[name] == PARENT_ENV[name], name
    assert env["AGENT_MODE"] == "fast"
    assert (env["GIT_TERMINAL_PROMPT"], env["NO_COLOR"]) == ("0", "1")
    assert {k: v for k, v in env.items() if k.startswith("OPUS_")} == {
        "OPUS_STAGE": "coder",
        "OPUS_ITERATION": "2",
        "OPUS_ROUND": "1",
        "OPUS_JOB_ID": "job-1",
        "OPUS_FR_ID": "FR-7",
        "OPUS_FR_FILE": str(ctx.fr.path),
        "OPUS_WORKTREE": str(ctx.worktree),
        "OPUS_PROMPT_FILE": str(ctx.prompt_file),
        "OPUS_OUTPUT_FILE": str(ctx.output_file),
        "OPUS_ARTIFACTS": str(ctx.artifacts),
        "OPUS_FEEDBACK_FILE": str(ctx.feedback_file),
    }
    assert "out| changed things" in ctx.log_file.read_text()


@pytest.mark.anyio
async def test_no_feedback_file_in_iteration_one_and_stdin_false(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, Stage.CODER)
    agent = contract_agent(tmp_path, Stage.CODER, {}, stdin=False)
    await agent.run(ctx)
    got = recorded(tmp_path)
    assert (got["stdin"], got["stdin_kind"]) == ("", "chardev")  # /dev/null
    assert "OPUS_FEEDBACK_FILE" not in got["env"]


@pytest.mark.anyio
async def test_command_as_a_string_is_split_like_a_shell(tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    command = f"{sys.executable} {CONTRACT} {record} '{{\"stdout\": \"a b\"}}' 'two words'"
    agent = CommandAgent(AgentSection(kind="command", command=command), Stage.PLANNER)
    result = await agent.run(make_ctx(tmp_path, Stage.PLANNER))
    assert result.output == "a b" and recorded(tmp_path)["argv"] == ["two words"]


@pytest.mark.anyio
async def test_planner_plan_from_output_file_else_stdout(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, Stage.PLANNER)
    spec = {"output": "# Plan\n\n1. from the file\n", "stdout": "chatter\n"}
    result = await contract_agent(tmp_path, Stage.PLANNER, spec).run(ctx)
    assert result.output == "# Plan\n\n1. from the file\n"
    ctx.output_file.write_text("stale plan of an earlier attempt")
    result = await contract_agent(tmp_path, Stage.PLANNER, {"stdout": "# Plan\n\nstdout\n"}).run(
        ctx
    )
    assert result.output == "# Plan\n\nstdout\n"
    assert result.usage is None


@pytest.mark.anyio
async def test_reviewer_verdict_and_usage_from_output_file(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, Stage.REVIEWER)
    verdict = {"verdict": "approve", "confidence": 92, "summary": "Fine.",
               "usage": {"input_tokens": 1200, "output_tokens": 300, "cost_usd": 0.42}}  # fmt: skip
    spec = {"output": json.dumps(verdict), "stdout": '{"verdict": "request_changes"}\n'}
    result = await contract_agent(tmp_path, Stage.REVIEWER, spec).run(ctx)
    assert result.verdict is not None
    assert (result.verdict.verdict, result.verdict.confidence) == ("approve", 92)
    assert result.usage is not None
    assert (result.usage.input_tokens, result.usage.output_tokens) == (1200, 300)
    assert (result.usage.cost_usd, result.usage.cost_estimated) == (0.42, False)


@pytest.mark.anyio
async def test_reviewer_verdict_from_the_last_json_object_in_stdout(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, Stage.REVIEWER)
    stdout = (
        'The format is {"verdict": "approve", "confidence": 100}.\n'
        "Some {braces} that are not JSON.\n"
        "```json\n"
        '{"verdict": "request_changes", "confidence": 60, "summary": "Almost.",\n'
        ' "issues": [{"severity": "minor", "message": "rename x", "file": "a.py", "line": 3}]}\n'
        "```\n"
        'Done. {"note": "not a verdict"}\n'
    )
    result = await contract_agent(tmp_path, Stage.REVIEWER, {"stdout": stdout}).run(ctx)
    assert result.verdict is not None
    assert result.verdict.verdict == "request_changes" and result.verdict.confidence == 60
    assert [(i.message, i.file, i.line) for i in result.verdict.issues] == [("rename x", "a.py", 3)]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "stdout", ["LGTM, ship it!\n", '{"verdict": "maybe", "confidence": 50}\n', ""]
)
async def test_unparseable_verdict_is_a_retryable_output_error(tmp_path: Path, stdout: str) -> None:
    ctx = make_ctx(tmp_path, Stage.REVIEWER)
    with pytest.raises(AgentOutputError) as info:
        await contract_agent(tmp_path, Stage.REVIEWER, {"stdout": stdout}).run(ctx)
    assert info.value.retryable and "no usable verdict" in str(info.value)


@pytest.mark.anyio
async def test_tester_pass_fail_and_cannot_run(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, Stage.TESTER)
    passed = await contract_agent(tmp_path, Stage.TESTER, {"stdout": "3 passed\n"}).run(ctx)
    assert passed.passed and "3 passed" in passed.output
    lines = "".join(f"log line {i}\n" for i in range(500))
    spec = {"stdout": lines + "FAILED test_greet\n", "stderr": "1 failed\n", "exit": 1}
    failed = await contract_agent(tmp_path, Stage.TESTER, spec).run(ctx)
    assert not failed.passed
    assert failed.output.endswith("FAILED test_greet\n1 failed")
    assert "log line 0\n" not in failed.output and len(failed.output.splitlines()) == 200
    with pytest.raises(AgentNotFound) as info:
        await contract_agent(tmp_path, Stage.TESTER, {"exit": 127}).run(ctx)
    assert not info.value.retryable and "127" in str(info.value)


@pytest.mark.anyio
async def test_usage_without_cost_is_estimated_from_prices(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, Stage.CODER)
    usage = {"usage": {"input_tokens": 1000, "output_tokens": 500}}
    agent = contract_agent(
        tmp_path, Stage.CODER, {"output": json.dumps(usage)},
        price_in_per_mtok=3.0, price_out_per_mtok=15.0,
    )  # fmt: skip
    result = await agent.run(ctx)
    assert result.usage is not None
    assert result.usage.cost_usd == pytest.approx(0.0105) and result.usage.cost_estimated


@pytest.mark.anyio
async def test_crashing_agent_is_retryable_with_output_tail(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, Stage.CODER)
    spec = {"stdout": "working\n", "stderr": "Traceback\nRuntimeError: boom\n", "exit": 2}
    with pytest.raises(AgentCrashed) as info:
        await contract_agent(tmp_path, Stage.CODER, spec).run(ctx)
    assert info.value.retryable
    assert "status 2" in str(info.value) and "RuntimeError: boom" in str(info.value)
    assert info.value.output == "working\nTraceback\nRuntimeError: boom"


@pytest.mark.anyio
async def test_timeout_comes_from_the_context(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, Stage.CODER, timeout=0.5)
    section = AgentSection(
        kind="command", command=[sys.executable, str(SCRIPTS / "behave.py"), "hang"]
    )
    with pytest.raises(AgentTimeout):
        await CommandAgent(section, Stage.CODER, grace=0.5).run(ctx)


@pytest.mark.anyio
async def test_missing_command_names_the_stage(tmp_path: Path) -> None:
    section = AgentSection(kind="command", command="no-such-agent-xyz --go")
    agent = CommandAgent(section, Stage.CODER, environ=PARENT_ENV)
    with pytest.raises(AgentNotFound) as info:
        await agent.run(make_ctx(tmp_path, Stage.CODER))
    assert str(info.value) == (
        "`no-such-agent-xyz` not found on PATH; install it or change [agents.coder] kind/command"
    )


def test_substitute_touches_only_the_known_placeholders() -> None:
    values = {"stage": "coder", "iteration": "2"}
    assert substitute("{stage}-{iteration}-{x}-{{stage}}", values) == "coder-2-{x}-{coder}"
    assert substitute("{stage}", {"stage": "{iteration}", "iteration": "no"}) == "{iteration}"


def test_parse_verdict_normalises_and_explains() -> None:
    verdict = parse_verdict('{"verdict": "APPROVED", "confidence": 0.9, "summary": "ok"}')
    assert (verdict.verdict, verdict.confidence) == ("approve", 90)
    with pytest.raises(ValueError, match="no JSON object"):
        parse_verdict("nothing here")
    with pytest.raises(ValueError, match="invalid verdict"):
        parse_verdict('{"verdict": "maybe", "confidence": 90}')


@pytest.mark.parametrize(
    ("given", "confidence"),
    [("0.9", 90), ('"85%"', 85), ("1", 1), ("1.0", 100), ("150", 0), ("-3", 0), ("null", 0),
     ('"high"', 0), ("true", 0)],
)  # fmt: skip
def test_a_clear_verdict_survives_loosely_written_fields(given: str, confidence: int) -> None:
    """SPEC §5.3's schema, as models write it: the verdict word decides; a bad optional
    field is read as well as it can be, never a reason to drop the verdict (and a
    confidence that says nothing is 0: it never auto-approves)."""
    text = (
        '{"verdict": "request_changes", "confidence": ' + given + ', "summary": null,'
        ' "issues": ["Add a test.", {"severity": "critical", "message": "SQL injection",'
        ' "file": "db.py", "line": "L12"}, {"severity": "high", "description": "No docs"},'
        ' {"file": "x.py"}, 7]}'
    )
    verdict = parse_verdict(text)
    assert (verdict.verdict, verdict.confidence, verdict.summary) == (
        "request_changes",
        confidence,
        "",
    )
    assert [(i.severity, i.message, i.file, i.line) for i in verdict.issues] == [
        ("major", "Add a test.", None, None),
        ("blocker", "SQL injection", "db.py", 12),
        ("major", "No docs", None, None),
    ]


def test_worktree_fingerprint_sees_changes_but_not_git(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("a = 1\n")
    first = worktree_fingerprint(tmp_path)
    (tmp_path / ".git" / "index").write_text("changed")
    assert worktree_fingerprint(tmp_path) == first
    (tmp_path / "src" / "a.py").write_text("a = 22\n")
    second = worktree_fingerprint(tmp_path)
    assert second != first
    (tmp_path / "src" / "a.py").unlink()
    assert worktree_fingerprint(tmp_path) not in (first, second)


# -- the scripted fake ------------------------------------------------------------------


@pytest.mark.anyio
async def test_scripted_agent_plays_steps_and_repeats_the_last(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, Stage.REVIEWER)
    agent = ScriptedAgent([request_changes("add a test", "rename x"), approve(88)])
    assert isinstance(agent, Agent)
    first, second, third = [await agent.run(ctx) for _ in range(3)]
    assert first.verdict is not None and first.verdict.verdict == "request_changes"
    assert [i.message for i in first.verdict.issues] == ["add a test", "rename x"]
    assert second.verdict is not None and second.verdict.confidence == 88
    assert third.verdict is not None and third.verdict.verdict == "approve"
    assert second is not third  # each call gets its own result
    assert agent.calls == [ctx, ctx, ctx]


@pytest.mark.anyio
async def test_scripted_agent_errors_and_callables(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, Stage.CODER)

    async def later(c: StageContext) -> StageResult:
        return StageResult(output=f"async in {c.stage}")

    agent = ScriptedAgent(
        AgentCrashed("boom", retryable=True), writes({"pkg/new.py": "x = 1\n"}), later
    )
    with pytest.raises(AgentCrashed) as info:
        await agent.run(ctx)
    assert info.value.retryable
    wrote = await agent.run(ctx)
    assert (ctx.worktree / "pkg" / "new.py").read_text() == "x = 1\n"
    assert "pkg/new.py" in wrote.output
    assert (await agent.run(ctx)).output == "async in coder"
    assert len(agent.calls) == 3


@pytest.mark.anyio
async def test_scripted_agent_defaults_and_tester_helpers(tmp_path: Path) -> None:
    blank = ScriptedAgent()
    review = await blank.run(make_ctx(tmp_path, Stage.REVIEWER))
    assert review.verdict is not None and review.verdict.verdict == "approve"
    assert (await blank.run(make_ctx(tmp_path, Stage.PLANNER))).output.startswith("# Plan")
    tester = ScriptedAgent([tests_fail("E   assert 1 == 2"), tests_pass()])
    ctx = make_ctx(tmp_path, Stage.TESTER)
    failing, passing = await tester.run(ctx), await tester.run(ctx)
    assert (failing.passed, failing.output) == (False, "E   assert 1 == 2")
    assert passing.passed

"""CLI presets against fake executables of the same name placed first on PATH."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from opus.orchestrator.agents.base import StageContext
from opus.orchestrator.agents.command import CommandAgent
from opus.orchestrator.agents.presets import (
    KINDS,
    AiderAgent,
    ClaudeAgent,
    CodexAgent,
    GeminiAgent,
    OpencodeAgent,
    build_agent,
)
from opus.orchestrator.config import AgentSection
from opus.orchestrator.errors import AgentCrashed, AgentNotFound
from opus.orchestrator.lifecycle import Stage
from opus.orchestrator.models import FeatureRequest

FAKE_CLI = Path(__file__).parent / "agent_scripts" / "fake_cli.py"
PROMPT = "# FR-7: Greeting\n\nSay hello, {worktree} stays literal.\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_ctx(
    tmp_path: Path, stage: Stage, *, prompt: str = "# FR-7\n\nSay hello.\n"
) -> StageContext:
    worktree, artifacts = tmp_path / "worktree", tmp_path / "state" / "jobs" / "job-1"
    worktree.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    prompt_file = artifacts / f"prompt-{stage}-1.md"
    prompt_file.write_text(prompt)
    fr = FeatureRequest(id="FR-7", title="Greeting", path=tmp_path / "FR-7.md", body="Say hello.")
    return StageContext(
        stage=stage, iteration=1, job_id="job-1", fr=fr, worktree=worktree,
        artifacts=artifacts, prompt=prompt, prompt_file=prompt_file,
        output_file=artifacts / f"output-{stage}-1", log_file=artifacts / f"{stage}-1.log",
        base_commit="0" * 40, timeout=20.0, stall_timeout=20.0,
    )  # fmt: skip


def install(bin_dir: Path, name: str) -> Path:
    """A python script called ``name``, with a shebang, executable."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / name
    body = FAKE_CLI.read_text()
    exe.write_text(f"#!{sys.executable}\n{body}")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def environ_with(bin_dir: Path) -> dict[str, str]:
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(bin_dir.parent),
        "GITHUB_TOKEN": "ghp_must_not_leak",
    }


def calls(bin_dir: Path) -> list[dict[str, Any]]:
    lines = (bin_dir / "calls.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


SECTION = {"model": "m1", "args": ["--extra", "{stage}"],
           "price_in_per_mtok": 1.0, "price_out_per_mtok": 10.0}  # fmt: skip

# name → (flags a reviewer must get, flags a coder must get, model flag, how the prompt arrives)
EXPECTED: dict[str, tuple[list[str], list[str], list[str], str]] = {
    "claude": (
        ["-p", "--output-format", "stream-json", "--tools", "Read,Grep,Glob", "dontAsk"],
        ["-p", "--output-format", "stream-json", "--permission-mode", "acceptEdits"],
        ["--model", "m1"],
        "stdin",
    ),
    "codex": (
        ["exec", "--json", "--sandbox", "read-only", "-o"],
        ["exec", "--json", "--sandbox", "workspace-write", "-o"],
        ["-m", "m1"],
        "last argument",
    ),
    "aider": (
        ["--message-file", "--yes-always", "--no-auto-commits", "--chat-mode", "ask"],
        ["--message-file", "--yes-always", "--no-auto-commits", "--no-stream"],
        ["--model", "m1"],
        "message file",
    ),
    "opencode": (
        ["run", "--format", "json", "--agent", "plan"],
        ["run", "--format", "json"],
        ["--model", "m1"],
        "stdin",
    ),
    "gemini": (
        ["-p", "--output-format", "stream-json", "--skip-trust", "--approval-mode", "plan"],
        ["-p", "--output-format", "stream-json", "--approval-mode", "auto_edit", "--policy"],
        ["--model", "m1"],
        "after -p",
    ),
}
# name → (input tokens, output tokens, cost, estimated)
USAGE = {
    "claude": (115, 42, 0.0123, False),
    "codex": (1200, 80, 0.002, True),
    "aider": (3000, 42, 0.0063, False),
    "opencode": (1300, 55, 0.003, False),
    "gemini": (1000, 55, 0.00155, True),
}


def contains_in_order(argv: list[str], flags: list[str]) -> bool:
    it = iter(argv)
    return all(flag in it for flag in flags)


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_reviewer_preset(tmp_path: Path, name: str) -> None:
    bin_dir = tmp_path / "bin"
    install(bin_dir, name)
    section = AgentSection(kind=name, **SECTION)  # type: ignore[arg-type]
    agent = build_agent(section, Stage.REVIEWER, environ=environ_with(bin_dir))
    ctx = make_ctx(tmp_path, Stage.REVIEWER, prompt=PROMPT)
    result = await agent.run(ctx)

    version_call, call = calls(bin_dir)
    assert version_call == {"version": True}
    assert result.meta["version"] == f"{name} 9.9.9"
    argv: list[str] = call["argv"]
    review_flags, _, model_flag, delivery = EXPECTED[name]
    assert contains_in_order(argv, review_flags), argv
    assert contains_in_order(argv, model_flag), argv
    assert contains_in_order(argv, ["--extra", "reviewer"]), argv
    if delivery == "stdin":
        assert call["stdin"] == PROMPT and call["stdin_kind"] == "pipe"
    else:
        assert call["stdin"] == "" and call["stdin_kind"] == "chardev", "stdin must be /dev/null"
    if delivery == "last argument":
        assert argv[-1] == PROMPT
    if delivery == "after -p":
        assert argv[argv.index("-p") + 1] == PROMPT
    if delivery == "message file":
        assert argv[argv.index("--message-file") + 1] == str(ctx.prompt_file)
        assert call["message_file"] == PROMPT
    if name == "codex":
        assert argv[argv.index("-o") + 1] == str(ctx.output_file)
    assert "GITHUB_TOKEN" not in call["env"] and call["cwd"] == str(ctx.worktree)

    assert result.verdict is not None
    assert (result.verdict.verdict, result.verdict.confidence) == ("request_changes", 70)
    assert [i.message for i in result.verdict.issues] == ["add a test"]
    assert result.usage is not None
    tokens_in, tokens_out, cost, estimated = USAGE[name]
    assert (result.usage.input_tokens, result.usage.output_tokens) == (tokens_in, tokens_out)
    assert result.usage.cost_usd == pytest.approx(cost)
    assert result.usage.cost_estimated is estimated


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_coder_preset_may_edit_and_version_is_asked_once(tmp_path: Path, name: str) -> None:
    bin_dir = tmp_path / "bin"
    install(bin_dir, name)
    agent = build_agent(AgentSection(kind=name), Stage.CODER, environ=environ_with(bin_dir))  # type: ignore[arg-type]
    ctx = make_ctx(tmp_path, Stage.CODER, prompt=PROMPT)
    first = await agent.run(ctx)
    second = await agent.run(ctx)
    records = calls(bin_dir)
    assert [r.get("version", False) for r in records] == [True, False, False]
    argv = records[1]["argv"]
    assert contains_in_order(argv, EXPECTED[name][1]), argv
    for read_only in ("read-only", "dontAsk", "ask", "plan", "default"):
        assert read_only not in argv, argv
    assert "push" not in " ".join(argv).replace("Bash(git push:*)", "")
    assert f"# Plan from {name}" in first.output
    assert second.meta["version"] == f"{name} 9.9.9"


@pytest.mark.anyio
async def test_planner_gets_the_cli_message_as_plan(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    install(bin_dir, "claude")
    agent = build_agent(AgentSection(kind="claude"), Stage.PLANNER, environ=environ_with(bin_dir))
    result = await agent.run(make_ctx(tmp_path, Stage.PLANNER))
    assert result.output == "# Plan from claude\n\n1. Do the thing.\n"


@pytest.mark.anyio
async def test_claude_reported_error_is_read_before_the_exit_status(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    install(bin_dir, "claude")
    said = "API Error: 500 Internal server error. This is a server-side issue"
    (bin_dir / "mode.json").write_text(json.dumps({"error": True, "status": 500, "said": said}))
    agent = build_agent(AgentSection(kind="claude"), Stage.CODER, environ=environ_with(bin_dir))
    with pytest.raises(AgentCrashed) as info:
        await agent.run(make_ctx(tmp_path, Stage.CODER))
    assert str(info.value) == f"claude: {said}"  # its words, not "exited with status 1: }"
    assert info.value.retryable
    assert info.value.usage is not None and info.value.usage.output_tokens == 42


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_claude_auth_and_request_errors_are_permanent(tmp_path: Path, status: int) -> None:
    bin_dir = tmp_path / "bin"
    install(bin_dir, "claude")
    mode = {"error": True, "status": status, "said": "Invalid API key · Fix external API key"}
    (bin_dir / "mode.json").write_text(json.dumps(mode))
    agent = build_agent(AgentSection(kind="claude"), Stage.PLANNER, environ=environ_with(bin_dir))
    with pytest.raises(AgentCrashed, match="Invalid API key") as info:
        await agent.run(make_ctx(tmp_path, Stage.PLANNER))
    assert not info.value.retryable


@pytest.mark.anyio
async def test_command_key_replaces_the_executable(tmp_path: Path) -> None:
    exe = install(tmp_path / "elsewhere", "codex")  # not on PATH
    section = AgentSection(kind="codex", command=[str(exe)], args=["-c", "x=1"])
    agent = build_agent(section, Stage.PLANNER, environ=environ_with(tmp_path / "bin"))
    result = await agent.run(make_ctx(tmp_path, Stage.PLANNER, prompt=PROMPT))
    argv = calls(tmp_path / "elsewhere")[1]["argv"]
    assert argv[:2] == ["exec", "--json"] and argv[-3:] == ["-c", "x=1", PROMPT]
    assert result.output == "# Plan from codex\n\n1. Do the thing.\n"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "product"),
    [
        ("claude", "Claude Code"),
        ("codex", "Codex"),
        ("aider", "aider"),
        ("opencode", "opencode"),
        ("gemini", "Gemini CLI"),
    ],
)
async def test_missing_cli_says_how_to_fix_it(tmp_path: Path, name: str, product: str) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    # only an empty folder on PATH: a real CLI installed on this machine must not be found
    environ = {**environ_with(empty), "PATH": str(empty)}
    agent = build_agent(AgentSection(kind=name), Stage.CODER, environ=environ)  # type: ignore[arg-type]
    with pytest.raises(AgentNotFound) as info:
        await agent.run(make_ctx(tmp_path, Stage.CODER))
    message = str(info.value)
    assert message.startswith(f"`{name}` not found on PATH; install {product}")
    assert "[agents.coder] kind =" in message
    assert not info.value.retryable


@pytest.mark.anyio
async def test_version_failure_is_unknown(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "gemini"
    exe.write_text(
        f"#!{sys.executable}\nimport sys, json\n"
        "if '--version' in sys.argv: sys.exit(3)\n"
        "print(json.dumps({'response': 'plan', 'stats': {}}))\n"
    )
    exe.chmod(0o755)
    agent = build_agent(AgentSection(kind="gemini"), Stage.PLANNER, environ=environ_with(bin_dir))
    result = await agent.run(make_ctx(tmp_path, Stage.PLANNER))
    assert result.meta["version"] == "unknown" and result.output == "plan"


def test_build_agent_kinds() -> None:
    expected = {"command": CommandAgent, "claude": ClaudeAgent, "codex": CodexAgent,
                "aider": AiderAgent, "opencode": OpencodeAgent, "gemini": GeminiAgent}  # fmt: skip
    for kind, cls in expected.items():
        section = AgentSection(kind=kind, command="x" if kind == "command" else None)  # type: ignore[arg-type]
        assert type(build_agent(section, Stage.CODER)) is cls
    assert set(expected) <= set(KINDS)
    with pytest.raises(ValueError, match="openai"):
        build_agent(AgentSection(kind="openai", model="m"), Stage.CODER)


def test_long_prompt_is_passed_by_file(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, Stage.CODER, prompt="x" * 200_000)
    argv = CodexAgent(AgentSection(kind="codex"), Stage.CODER).build_argv(ctx)
    assert str(ctx.prompt_file) in argv[-1] and len(argv[-1]) < 1000


@pytest.mark.anyio
async def test_quiet_json_clis_are_not_taken_for_stalled(tmp_path: Path) -> None:
    """gemini told ``--output-format json`` prints one JSON object at the end: its silence is
    not a stall (only the stage timeout applies); codex, claude and gemini by default
    (stream-json) stream events, so silence is one."""
    import dataclasses

    from opus.orchestrator.errors import AgentStalled

    bin_dir = tmp_path / "bin"
    for name in ("claude", "gemini", "codex"):
        install(bin_dir, name)
    (bin_dir / "mode.json").write_text('{"think": 1.0}')
    ctx = dataclasses.replace(make_ctx(tmp_path, Stage.PLANNER), stall_timeout=0.3)
    quiet = AgentSection(kind="gemini", args=["--output-format", "json"])
    gemini = build_agent(quiet, Stage.PLANNER, environ=environ_with(bin_dir))
    assert "Plan from" in (await gemini.run(ctx)).output
    for name in ("codex", "claude", "gemini"):
        agent = build_agent(AgentSection(kind=name), Stage.PLANNER, environ=environ_with(bin_dir))
        with pytest.raises(AgentStalled):
            await agent.run(ctx)

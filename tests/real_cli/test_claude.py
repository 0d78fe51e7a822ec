"""Claude Code (the real ``claude``, pinned) under ``opus run --once``, against a loopback
Anthropic Messages API (servers/anthropic.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from .harness import (
    COMMIT_MESSAGE,
    FAREWELL_FILE,
    PROBES,
    PUSH_COMMAND,
    Request,
    Response,
    World,
    closed_port,
)
from .servers.anthropic import INPUT_TOKENS, OUTPUT_TOKENS, AnthropicServer, error_response

pytestmark = pytest.mark.cli("claude")

KEY = "sk-ant-test-0123456789abcdef"
FAST = {"stage_timeout": 90, "stall_timeout": 20, "retries": 1}


def claude_world(
    make_world: Callable[[str], World], url: str, sandbox: str = "bwrap", **pipeline: Any
) -> World:
    world = make_world("claude")
    world.configure(
        {"kind": "claude", "base_url": url, "api_key_env": "OPUS_TEST_ANTHROPIC_KEY"},
        pipeline={**FAST, **pipeline},
        extra=f'[sandbox]\nkind = "{sandbox}"\n',
    )
    return world


def run(world: World) -> None:
    result = world.run_once(env={"OPUS_TEST_ANTHROPIC_KEY": KEY})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def person_setup(world: World) -> dict[str, Any]:
    """A person's own Claude Code setup in HOME: hooks, an MCP server, memory, settings."""
    touched = {name: world.root / f"{name}-ran" for name in ("hook", "mcp")}
    hook = {"hooks": [{"type": "command", "command": f"touch {touched['hook']}"}]}
    world.write_home(
        ".claude/settings.json",
        {
            "hooks": {"SessionStart": [hook], "UserPromptSubmit": [hook], "PreToolUse": [hook]},
            "permissions": {"allow": ["Bash", "Write", "Edit"]},
        },
    )
    world.write_home(".claude/CLAUDE.md", "PERSONAL-MEMORY-MARKER: always answer in French\n")
    server = {"type": "stdio", "command": "sh", "args": ["-c", f"touch {touched['mcp']}"]}
    world.write_home(".claude.json", {"mcpServers": {"mine": server}})
    return touched


@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
def test_claude_runs_every_stage_to_review(
    make_world: Callable[[str], World], sandbox: str
) -> None:
    with AnthropicServer(push=True) as server:
        world = claude_world(make_world, server.url, sandbox)
        touched = person_setup(world)
        run(world)

    fm = world.frontmatter()
    assert fm["status"] == "review", fm
    assert world.state_problems() == []  # SPEC §8: modes, artifacts
    # the coder wrote the file, ran the tests and committed it itself
    assert COMMIT_MESSAGE in world.commits()
    assert FAREWELL_FILE in world.branch_files()
    assert "Goodbye" in world.show(FAREWELL_FILE)
    assert world.pushed() == []  # its `git push` was denied
    pushes = [r for r in server.stage_requests("coder") if PUSH_COMMAND in r.text]
    assert pushes and "denied" in pushes[-1].text.lower()
    # planner and reviewer tried the Write tool and Bash: refused, nothing created anywhere
    probes = [name for pair in PROBES.values() for name in pair]
    assert world.stray(probes) == []
    for stage in ("planner", "reviewer"):
        results = [
            block
            for request in server.stage_requests(stage)
            for message in request.json["messages"]
            if isinstance(message.get("content"), list)
            for block in message["content"]
            if block.get("type") == "tool_result"
        ]
        assert len(results) >= 2 and all(block.get("is_error") for block in results), results
    # nothing of the person's own setup was loaded, no transcript kept
    assert [p for p in touched.values() if p.exists()] == []
    assert not [r for r in server.requests if b"PERSONAL-MEMORY-MARKER" in r.body]
    assert list((world.home / ".claude").rglob("*.jsonl")) == []
    plan = (world.job_files() / "plan.md").read_text()
    assert plan.startswith("## Plan") and "type" not in plan  # the message, not the events
    # nothing but the model API was asked for (no telemetry, update or login calls)
    assert {(r.method, r.path) for r in server.requests} <= {
        ("HEAD", "/"),
        ("POST", "/v1/messages"),
    }
    # the key went to the CLI, never to disk
    assert all(r.headers.get("x-api-key") == KEY for r in server.model_requests())
    assert not [p for p in world.root.rglob("*") if p.is_file() and _holds(p, KEY)]
    # usage per stage at the server's token counts: three model calls each, four for the coder
    calls = {"planner": 3, "coder": 4, "reviewer": 3}
    for stage, n in calls.items():
        (checkpoint,) = world.checkpoints(stage)
        usage = checkpoint["usage"]
        assert usage["input_tokens"] == n * INPUT_TOKENS, (stage, usage)
        assert usage["output_tokens"] == n * OUTPUT_TOKENS, (stage, usage)
    assert world.job()["usage"]["output_tokens"] == 10 * OUTPUT_TOKENS


def _holds(path: Any, secret: str) -> bool:
    try:
        return secret.encode() in path.read_bytes()
    except OSError:
        return False


@pytest.mark.parametrize(
    ("status", "kind", "message", "said"),
    [
        (401, "authentication_error", "invalid x-api-key", "Invalid API key"),
        (404, "not_found_error", "model: nope", "There's an issue with the selected model"),
    ],
)
def test_permanent_api_errors_reach_error_in_claudes_words_without_retries(
    make_world: Callable[[str], World], status: int, kind: str, message: str, said: str
) -> None:
    with AnthropicServer() as server:
        server.fail = error_response(status, kind, message)
        world = claude_world(make_world, server.url, retries=2)
        run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed"
    assert said in fm["error"], fm["error"]
    assert "exited with status" not in fm["error"]
    (checkpoint,) = world.checkpoints("planner")
    assert checkpoint["attempts"] == 1  # opus did not try again ...
    if status == 401:
        assert len(server.model_requests()) == 1  # ... nor did claude


def test_not_logged_in_is_permanent(make_world: Callable[[str], World]) -> None:
    world = make_world("claude")  # no login in its HOME, no key, no base_url
    world.configure({"kind": "claude"}, pipeline={**FAST, "retries": 2})
    run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed"
    assert "Not logged in" in fm["error"], fm["error"]
    assert world.checkpoints("planner")[0]["attempts"] == 1


def test_bad_arguments_are_permanent(make_world: Callable[[str], World]) -> None:
    with AnthropicServer() as server:
        world = make_world("claude")
        world.configure(
            {"kind": "claude", "base_url": server.url, "api_key_env": "OPUS_TEST_ANTHROPIC_KEY",
             "args": ["--nope"]},
            pipeline={**FAST, "retries": 2},
        )  # fmt: skip
        run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed"
    assert "error: unknown option '--nope'" in fm["error"], fm["error"]
    assert world.checkpoints("planner")[0]["attempts"] == 1
    assert server.model_requests() == []


def test_a_500_is_retried_then_fails_in_claudes_words(make_world: Callable[[str], World]) -> None:
    with AnthropicServer() as server:
        server.fail = error_response(500, "api_error", "Internal server error")
        world = claude_world(make_world, server.url, retries=1)
        run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed"
    assert "API Error: 500" in fm["error"], fm["error"]
    assert len(server.model_requests()) == 2  # one attempt, one retry
    (checkpoint,) = world.checkpoints("planner")
    assert checkpoint["outcome"] == "error" and checkpoint["attempts"] == 2


def test_an_unreachable_endpoint_fails_within_the_stall_timeout(
    make_world: Callable[[str], World],
) -> None:
    world = claude_world(make_world, f"http://127.0.0.1:{closed_port()}", stall_timeout=10)
    result = world.run_once(env={"OPUS_TEST_ANTHROPIC_KEY": KEY})
    assert result.returncode == 0, result.stderr[-3000:]
    fm = world.frontmatter()
    assert fm["status"] in ("failed", "blocked")
    assert "Unable to connect to API" in fm["error"], fm["error"]
    assert result.seconds < 10 * 2 + 15  # two attempts, each within the stall timeout


def test_claude_retrying_by_itself_is_stopped_by_the_stall_watch(
    make_world: Callable[[str], World],
) -> None:
    """With the CLI's own retries turned back on (``env``), it prints a ``system/api_retry``
    event every 0.5, 1, 2, 4, 8 … s while the endpoint is down; those are not progress, so
    the stall watch stops it ``stall_timeout`` after its last real event (any output counted
    as progress, the 8 s gap would come only after ~16 s)."""
    world = make_world("claude")
    url = f"http://127.0.0.1:{closed_port()}"
    world.configure(
        {"kind": "claude", "base_url": url, "api_key_env": "OPUS_TEST_ANTHROPIC_KEY",
         "env": {"CLAUDE_CODE_MAX_RETRIES": "10"}},
        pipeline={**FAST, "stall_timeout": 6, "retries": 0},
    )  # fmt: skip
    result = world.run_once(env={"OPUS_TEST_ANTHROPIC_KEY": KEY})
    assert result.returncode == 0, result.stderr[-3000:]
    fm = world.frontmatter()
    assert fm["status"] == "blocked" and "stalled" in fm["error"], fm
    # counted on the CLI's own clock (its retry events, ~0.5, 1.7, 3.7, 7.7, 15.7 s after it
    # started): stopped 6 s after its start, it got out three or four, not five
    log = (world.job_files() / "planner-1.log").read_text()
    retries = [line for line in log.splitlines() if '"subtype":"api_retry"' in line]
    # (on a crowded machine its start alone may take the 6 s: then it got out none)
    assert len(retries) <= 4, retries
    assert not retries or "api_retry" in fm["error"]  # its last words


class FailsAfterOne(AnthropicServer):
    """Answers the first model call, then 500s: an error result after a paid turn."""

    def respond(self, request: Request) -> Response:
        if len(self.model_requests()) > 1:
            return error_response(500, "api_error", "Internal server error")
        return super().respond(request)


def test_a_failed_attempt_keeps_what_it_spent(make_world: Callable[[str], World]) -> None:
    with FailsAfterOne() as server:
        world = claude_world(make_world, server.url, retries=0)
        run(world)
    assert world.frontmatter()["status"] == "failed"
    (checkpoint,) = world.checkpoints("planner")
    assert checkpoint["outcome"] == "error"
    assert checkpoint["usage"]["input_tokens"] == INPUT_TOKENS  # the one answered call
    assert checkpoint["usage"]["output_tokens"] == OUTPUT_TOKENS
    assert world.job()["usage"]["output_tokens"] == OUTPUT_TOKENS


def test_a_key_claude_does_not_use_stops_start_up_naming_it(
    make_world: Callable[[str], World],
) -> None:
    """SPEC §14: never silently ignored. Claude Code has no temperature flag."""
    world = make_world("claude")
    agent = {"kind": "claude", "base_url": "http://127.0.0.1:9", "temperature": 0.2}
    world.configure({**agent, "api_key_env": "OPUS_TEST_ANTHROPIC_KEY"})
    result = world.run_once(env={"OPUS_TEST_ANTHROPIC_KEY": KEY})
    assert result.returncode == 2, result.stderr
    assert "kind = 'claude' does not use `temperature`" in result.stderr
    assert world.frontmatter().get("status") is None  # nothing was started

"""Codex (the real ``codex``, pinned) under ``opus run --once``, against a loopback OpenAI
Responses API (servers/responses.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from .harness import COMMIT_MESSAGE, FAREWELL_FILE, PROBES, World, closed_port, executable
from .servers.responses import INPUT_TOKENS, OUTPUT_TOKENS, ResponsesServer, error_response

pytestmark = pytest.mark.cli("codex")

KEY = "sk-test-codex-0123456789abcdef"
KEY_ENV = "OPUS_TEST_OPENAI_KEY"
FAST = {"stage_timeout": 90, "stall_timeout": 20, "retries": 1}


def codex_world(
    make_world: Callable[[str], World], url: str, sandbox: str = "bwrap", **pipeline: Any
) -> World:
    world = make_world("codex")
    world.configure(
        {"kind": "codex", "base_url": f"{url}/v1", "api_key_env": KEY_ENV, "model": "scripted"},
        pipeline={**FAST, **pipeline},
        extra=f'[sandbox]\nkind = "{sandbox}"\n',
    )
    return world


def run(world: World) -> None:
    result = world.run_once(env={KEY_ENV: KEY})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
def test_codex_runs_every_stage_to_review(make_world: Callable[[str], World], sandbox: str) -> None:
    with ResponsesServer() as server:
        world = codex_world(make_world, server.url, sandbox)
        run(world)

    fm = world.frontmatter()
    assert fm["status"] == "review", fm.get("error")
    assert world.state_problems() == []  # SPEC §8: modes, artifacts
    # the coder wrote the file, ran the tests and committed it itself, through codex's shell
    assert COMMIT_MESSAGE in world.commits()
    assert FAREWELL_FILE in world.branch_files()
    assert "Goodbye" in world.show(FAREWELL_FILE)
    # planner and reviewer tried to write (codex's only tool is its shell): refused by its
    # read-only sandbox, nothing created anywhere
    probes = [name for pair in PROBES.values() for name in pair]
    assert world.stray(probes) == []
    for stage in ("planner", "reviewer"):
        outputs = server.tool_outputs(stage)
        assert len(outputs) == 2, (stage, outputs)
        assert all("Read-only file system" in out for out in outputs), outputs
    plan = (world.job_files() / "plan.md").read_text()
    assert plan.startswith("## Plan") and '"type"' not in plan
    # the key went to codex (its provider's env_key), never to disk
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in server.model_requests())
    assert not [p for p in world.root.rglob("*") if p.is_file() and _holds(p, KEY)]
    # usage per stage: three model calls each, at the server's token counts
    for stage in ("planner", "coder", "reviewer"):
        (checkpoint,) = world.checkpoints(stage)
        usage = checkpoint["usage"]
        assert usage["input_tokens"] == 3 * INPUT_TOKENS, (stage, usage)
        assert usage["output_tokens"] == 3 * OUTPUT_TOKENS, (stage, usage)


def _holds(path: Any, secret: str) -> bool:
    try:
        return secret.encode() in path.read_bytes()
    except OSError:
        return False


def test_a_401_reaches_error_in_codexs_words_without_retries(
    make_world: Callable[[str], World],
) -> None:
    with ResponsesServer() as server:
        server.fail = error_response(401, "Incorrect API key provided: sk-test***")
        world = codex_world(make_world, server.url, retries=2)
        run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed"
    assert "401 Unauthorized: Incorrect API key provided" in fm["error"], fm["error"]
    assert "exited with status" not in fm["error"]
    assert len(server.model_requests()) == 1  # neither codex nor opus tried again


def test_a_500_is_retried_then_fails_in_codexs_words(make_world: Callable[[str], World]) -> None:
    with ResponsesServer() as server:
        server.fail = error_response(500, "The server had an error", "server_error")
        world = codex_world(make_world, server.url, retries=1)
        run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed"
    assert "codex: " in fm["error"] and "high demand" in fm["error"], fm["error"]
    assert len(server.model_requests()) == 2  # one attempt, one retry (codex's own: off)
    (checkpoint,) = world.checkpoints("planner")
    assert checkpoint["outcome"] == "error" and checkpoint["attempts"] == 2


def test_an_unreachable_endpoint_fails_within_the_stall_timeout(
    make_world: Callable[[str], World],
) -> None:
    world = codex_world(make_world, f"http://127.0.0.1:{closed_port()}", stall_timeout=8)
    result = world.run_once(env={KEY_ENV: KEY})
    assert result.returncode == 0, result.stderr[-3000:]
    fm = world.frontmatter()
    assert fm["status"] in ("failed", "blocked")
    assert "Reconnecting... waiting for network" in fm["error"], fm["error"]
    assert "stalled" in fm["error"]
    # two attempts, each stopped at the stall timeout (not at stage_timeout = 90 s)
    (checkpoint,) = world.checkpoints("planner")
    assert checkpoint["attempts"] == 2
    started, finished = (
        datetime.fromisoformat(checkpoint[k]) for k in ("started_at", "finished_at")
    )
    assert (finished - started).total_seconds() < 2 * (8 + 6)


def test_a_codex_whose_own_sandbox_cannot_start_fails_at_once_in_its_words(
    make_world: Callable[[str], World],
) -> None:
    """codex inside a bubblewrap that may not map users (as a stricter outer sandbox would
    be): its own sandbox cannot start, and every shell command would fail while codex exits
    0. The preset's check says so before any model call, as a permanent error."""
    cli = executable("codex")
    assert cli is not None
    outer = ["bwrap", "--dev-bind", "/", "/", "--unshare-user", "--cap-drop", "ALL", "--",
             str(cli)]  # fmt: skip
    with ResponsesServer() as server:
        world = make_world("codex")
        world.configure(
            {"kind": "codex", "command": outer, "base_url": f"{server.url}/v1",
             "api_key_env": KEY_ENV, "model": "scripted"},
            pipeline={**FAST, "retries": 2},
        )  # fmt: skip
        run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed"
    assert "codex's own sandbox cannot start here" in fm["error"], fm["error"]
    assert "bwrap: " in fm["error"]  # its words
    assert server.model_requests() == []  # stopped before any model call, not retried
    (checkpoint,) = world.checkpoints("planner")
    assert checkpoint["attempts"] == 1

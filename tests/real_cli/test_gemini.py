"""Gemini CLI (the real ``gemini``, pinned) under ``opus run --once``, against a loopback
Gemini API (servers/gemini.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from .harness import COMMIT_MESSAGE, FAREWELL_FILE, PROBES, World, closed_port
from .servers.gemini import INPUT_TOKENS, MODEL, OUTPUT_TOKENS, GeminiServer, error_response

pytestmark = pytest.mark.cli("gemini")

KEY = "AIza-test-gemini-0123456789abcdef"
KEY_ENV = "OPUS_TEST_GEMINI_KEY"
FAST = {"stage_timeout": 120, "stall_timeout": 30, "retries": 1}


def gemini_world(
    make_world: Callable[[str], World], url: str, sandbox: str = "bwrap", **pipeline: Any
) -> World:
    world = make_world("gemini")
    world.configure(
        {"kind": "gemini", "base_url": url, "api_key_env": KEY_ENV, "model": MODEL},
        pipeline={**FAST, **pipeline},
        extra=f'[sandbox]\nkind = "{sandbox}"\n',
    )
    return world


def run(world: World) -> None:
    result = world.run_once(env={KEY_ENV: KEY})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
def test_gemini_runs_every_stage_to_review(
    make_world: Callable[[str], World], sandbox: str
) -> None:
    with GeminiServer() as server:
        world = gemini_world(make_world, server.url, sandbox)
        run(world)

    fm = world.frontmatter()
    assert fm["status"] == "review", fm.get("error")
    assert world.state_problems() == []  # SPEC §8: modes, artifacts
    # the coder wrote the file (write_file), ran the tests and committed (run_shell_command)
    assert COMMIT_MESSAGE in world.commits()
    assert FAREWELL_FILE in world.branch_files()
    assert "Goodbye" in world.show(FAREWELL_FILE)
    coder = server.tool_results("coder")
    assert [r["name"] for r in coder] == ["write_file", "run_shell_command"], coder
    assert all("error" not in r["response"] for r in coder), coder
    # planner and reviewer tried write_file (refused by plan mode) and the shell (which plan
    # mode does not offer): nothing created anywhere
    probes = [name for pair in PROBES.values() for name in pair]
    assert world.stray(probes) == []
    for stage in ("planner", "reviewer"):
        results = server.tool_results(stage)
        assert [r["name"] for r in results] == ["write_file", "run_shell_command"], results
        assert all("error" in r["response"] for r in results), results
    plan = (world.job_files() / "plan.md").read_text()
    assert plan.startswith("## Plan") and '"type"' not in plan
    # the key went to the CLI as GEMINI_API_KEY, never to disk
    assert all(r.headers.get("x-goog-api-key") == KEY for r in server.model_requests())
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


def test_a_401_reaches_error_in_geminis_words_without_retries(
    make_world: Callable[[str], World],
) -> None:
    with GeminiServer() as server:
        server.fail = error_response(401, "API key not valid. Please pass a valid API key.",
                                     "UNAUTHENTICATED")  # fmt: skip
        world = gemini_world(make_world, server.url, retries=2)
        run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed"
    assert "API key not valid" in fm["error"] and "gemini: " in fm["error"], fm["error"]
    assert "exited with status" not in fm["error"]
    assert len(server.model_requests()) == 1  # neither gemini nor opus tried again


def test_a_500_is_retried_then_fails_in_geminis_words(make_world: Callable[[str], World]) -> None:
    with GeminiServer() as server:
        server.fail = error_response(500, "Internal error encountered.", "INTERNAL")
        world = gemini_world(make_world, server.url, retries=1)
        run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed"
    assert "Internal error encountered" in fm["error"], fm["error"]
    # two attempts of opus, each with gemini's own two (its least: maxAttempts = 2)
    assert len(server.model_requests()) == 4
    (checkpoint,) = world.checkpoints("planner")
    assert checkpoint["outcome"] == "error" and checkpoint["attempts"] == 2


def test_an_unreachable_endpoint_fails_within_the_stall_timeout(
    make_world: Callable[[str], World],
) -> None:
    world = gemini_world(make_world, f"http://127.0.0.1:{closed_port()}", stall_timeout=20)
    result = world.run_once(env={KEY_ENV: KEY})
    assert result.returncode == 0, result.stderr[-3000:]
    fm = world.frontmatter()
    assert fm["status"] in ("failed", "blocked")
    assert "fetch failed" in fm["error"] and "gemini: " in fm["error"], fm["error"]
    # gemini gives up by itself (fetch errors not retried): each attempt within the stall timeout
    (checkpoint,) = world.checkpoints("planner")
    assert checkpoint["attempts"] == 2
    started, finished = (
        datetime.fromisoformat(checkpoint[k]) for k in ("started_at", "finished_at")
    )
    assert (finished - started).total_seconds() < 2 * 20
    assert "stalled" not in fm["error"]

"""opencode (the real ``opencode``, pinned) under ``opus run --once``, against a loopback
Chat Completions API (servers/chat.py) reached through its ``base_url`` mapping."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from .harness import COMMIT_MESSAGE, FAREWELL_FILE, PROBES, World, closed_port
from .servers.chat import COMPLETION_TOKENS, MODEL, PROMPT_TOKENS, ChatServer, error_response

pytestmark = [pytest.mark.cli("opencode"), pytest.mark.timeout(600)]

KEY = "sk-opencode-test-0123456789abcdef"
SANDBOX = '[sandbox]\nkind = "bwrap"\n'
"""Every agent inside bubblewrap (SPEC §17), as a person's opus runs them."""
FAST = {"stage_timeout": 180, "stall_timeout": 60, "retries": 1}
"""opencode prints nothing until its first model answer: 8 s after it starts on an idle
machine, 20-30 s on a loaded one, so the stall timeout here is generous."""


def opencode_world(
    make_world: Callable[[str], World], url: str, *, agent: dict[str, Any] | None = None,
    **pipeline: Any,
) -> World:  # fmt: skip
    world = make_world("opencode")
    world.configure(
        {
            "kind": "opencode",
            "base_url": url,
            "api_key_env": "OPUS_TEST_OPENCODE_KEY",
            "model": MODEL,
            **(agent or {}),
        },
        pipeline={**FAST, **pipeline},
        extra=SANDBOX,
    )
    return world


def run(world: World) -> None:
    result = world.run_once(env={"OPUS_TEST_OPENCODE_KEY": KEY})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def tool_results(server: ChatServer, stage: str) -> list[str]:
    """The tool results opencode sent back to the model in ``stage`` (the last request has
    them all)."""
    requests = server.completions(stage)
    assert requests, f"no {stage} request"
    messages = requests[-1].json["messages"]
    return [json.dumps(m.get("content")) for m in messages if m.get("role") == "tool"]


def test_opencode_runs_every_stage_to_review(make_world: Callable[[str], World]) -> None:
    with ChatServer("tools") as server:
        world = opencode_world(
            make_world,
            server.url + "/v1",
            agent={"price_in_per_mtok": 3.0, "price_out_per_mtok": 15.0},
        )
        run(world)

    fm = world.frontmatter()
    assert fm["status"] == "review", fm
    assert world.state_problems() == []  # SPEC §8: modes, artifacts
    # the coder wrote the file with its write tool, ran the tests and committed (bash tool)
    assert COMMIT_MESSAGE in world.commits()
    assert FAREWELL_FILE in world.branch_files()
    assert "Goodbye" in world.show(FAREWELL_FILE)
    # planner and reviewer called write and bash: neither is offered, both refused
    assert world.stray([name for pair in PROBES.values() for name in pair]) == []
    for stage in ("planner", "reviewer"):
        for request in server.completions(stage):
            offered = {t["function"]["name"] for t in request.json.get("tools") or []}
            assert not offered & {"write", "edit", "bash", "task"}, (stage, offered)
        results = tool_results(server, stage)
        assert len(results) == 2, results
        assert all("unavailable tool" in r for r in results), results
    plan = (world.job_files() / "plan.md").read_text()
    assert plan.startswith("## Plan") and "step_finish" not in plan
    # the key reached the endpoint as a bearer token, never the disk
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in server.completions())
    assert not [p for p in world.root.rglob("*") if p.is_file() and _holds(p, KEY)]
    # usage per stage: three model calls each (no title request), and opencode's cost of 0
    # for a model it has no price for does not hide the configured prices
    assert len(server.completions()) == 9
    for stage in ("planner", "coder", "reviewer"):
        (checkpoint,) = world.checkpoints(stage)
        usage = checkpoint["usage"]
        assert usage["input_tokens"] == 3 * PROMPT_TOKENS, (stage, usage)
        assert usage["output_tokens"] == 3 * COMPLETION_TOKENS, (stage, usage)
        expected = 3 * (PROMPT_TOKENS * 3.0 + COMPLETION_TOKENS * 15.0) / 1e6
        assert usage["cost_usd"] == pytest.approx(expected), (stage, usage)


def _holds(path: Any, secret: str) -> bool:
    try:
        return secret.encode() in path.read_bytes()
    except OSError:
        return False


def test_a_prompt_over_100_kb_reaches_the_model_whole(make_world: Callable[[str], World]) -> None:
    with ChatServer("tools") as server:
        world = opencode_world(make_world, server.url + "/v1")
        note = world.note.read_text()
        world.note.write_text(note + "\n" + "A line of background for the feature.\n" * 4000)
        run(world)
    assert world.frontmatter()["status"] == "review"
    (first,) = server.completions("planner")[:1]
    assert len(first.body) > 150_000
    assert "A line of background for the feature." * 1 in first.text


def test_a_401_reaches_error_in_opencodes_words_without_retries(
    make_world: Callable[[str], World],
) -> None:
    with ChatServer("tools") as server:
        server.fail = error_response(401, "Incorrect API key provided: sk-bad")
        world = opencode_world(make_world, server.url + "/v1", retries=2)
        run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed"
    assert "Incorrect API key provided" in fm["error"], fm["error"]
    assert "exited with status" not in fm["error"]
    assert len(server.completions()) == 1  # neither opencode nor opus tried again


def test_a_500_is_retried_then_fails_in_opencodes_words(
    make_world: Callable[[str], World],
) -> None:
    with ChatServer("tools") as server:
        failure = error_response(500, "The scripted server had an internal error")
        failure.headers["retry-after-ms"] = "50"  # opencode's own 5 retries, quickly
        server.fail = failure
        world = opencode_world(make_world, server.url + "/v1", retries=1)
        run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed"
    assert "The scripted server had an internal error" in fm["error"], fm["error"]
    assert len(server.completions()) == 2 * 6  # opus: 2 attempts; opencode: 1 + 5 retries
    (checkpoint,) = world.checkpoints("planner")
    assert checkpoint["outcome"] == "error" and checkpoint["attempts"] == 2


def test_an_unreachable_endpoint_is_stopped_within_the_stall_timeout(
    make_world: Callable[[str], World],
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    world = opencode_world(make_world, url, stall_timeout=45, retries=0)
    result = world.run_once(env={"OPUS_TEST_OPENCODE_KEY": KEY})
    assert result.returncode == 0, result.stderr[-3000:]
    fm = world.frontmatter()
    assert fm["status"] in ("failed", "blocked")
    assert "Unable to connect" in fm["error"], fm["error"]
    # one attempt, stopped at the stall timeout (not at stage_timeout): opencode alone would
    # retry for over a minute
    (checkpoint,) = world.checkpoints("planner")
    started, finished = (
        datetime.fromisoformat(checkpoint[k]) for k in ("started_at", "finished_at")
    )
    assert (finished - started).total_seconds() < 45 + 20  # its --version, the kill grace


def test_base_url_without_model_is_a_configuration_error(
    make_world: Callable[[str], World],
) -> None:
    world = make_world("opencode")
    world.configure({"kind": "opencode", "base_url": "http://127.0.0.1:9/v1"})
    result = world.run_once()
    assert result.returncode != 0
    assert "needs `model`" in result.stdout + result.stderr

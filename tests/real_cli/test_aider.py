"""aider (the real ``aider``, pinned) under ``opus run --once``, against a loopback Chat
Completions API (servers/chat.py, aider's whole-file edit format) reached through
``base_url`` → ``--openai-api-base``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from .harness import FAREWELL_FILE, PLAN_TEXT, PROBES, World, closed_port, executable
from .servers.chat import COMPLETION_TOKENS, MODEL, PROMPT_TOKENS, ChatServer, error_response

pytestmark = [pytest.mark.cli("aider"), pytest.mark.timeout(600)]

KEY = "sk-aider-test-0123456789abcdef"
SANDBOX = '[sandbox]\nkind = "bwrap"\n'
"""Every agent inside bubblewrap (SPEC §17), as a person's opus runs them."""
FAST = {"stage_timeout": 120, "stall_timeout": 45, "retries": 1}
TESTS = ["--auto-test", "--test-cmd", f"{sys.executable} -m pytest -q"]
"""The project's python by its path: aider's own venv comes first on PATH in these worlds."""
URL_LINE = "\nSee https://docs.python.org/3/library/functions.html for the details.\n"


def aider_world(
    make_world: Callable[[str], World], url: str, *, agent: dict[str, Any] | None = None,
    **pipeline: Any,
) -> World:  # fmt: skip
    world = make_world("aider")
    world.configure(
        {
            "kind": "aider",
            "base_url": url,
            "api_key_env": "OPUS_TEST_AIDER_KEY",
            "model": MODEL,
            **(agent or {}),
        },
        stages={"coder": {"args": TESTS}},
        pipeline={**FAST, **pipeline},
        extra=SANDBOX,
    )
    return world


def run(world: World) -> None:
    result = world.run_once(env={"OPUS_TEST_AIDER_KEY": KEY})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_aider_runs_every_stage_to_review(make_world: Callable[[str], World]) -> None:
    with ChatServer("aider") as server:
        world = aider_world(
            make_world,
            server.url + "/v1",
            agent={"price_in_per_mtok": 3.0, "price_out_per_mtok": 15.0},
        )
        world.note.write_text(world.note.read_text() + URL_LINE)  # no Playwright for this
        run(world)

    fm = world.frontmatter()
    assert fm["status"] == "review", fm
    assert world.state_problems() == []  # SPEC §8: modes, artifacts
    # the coder's whole-file edit is committed on the branch; aider's own files are not
    assert "Goodbye" in world.show(FAREWELL_FILE)
    files = world.branch_files()
    assert not [f for f in files if ".aider" in f], files
    assert world.show(".gitignore") == "__pycache__/\n.pytest_cache/"  # untouched
    # aider ran the tests after its edit (--auto-test): they passed, nothing went back
    history = (world.job_files() / "output-coder-1").read_text()
    assert "Applied edit to calc/farewell.py" in history
    assert len(server.completions("coder")) == 1
    # planner and reviewer answered with an edit and a shell block: neither applied or run
    assert world.stray([name for pair in PROBES.values() for name in pair]) == []
    # the plan is the model's answer alone: no banner, warning, URL or token line
    plan = (world.job_files() / "plan.md").read_text()
    assert plan.startswith(PLAN_TEXT.strip()), plan
    for noise in ("Aider v", "Tokens:", "Model:", "Repo-map", "https://", "Update git"):
        assert noise not in plan, (noise, plan)
    # the verdict parsed although it is longer than 80 columns (COLUMNS is wide)
    (review,) = world.checkpoints("reviewer")
    assert review["outcome"] not in ("error", "failed"), review
    # the key went to the endpoint, never to disk; no request was about anything else
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in server.completions())
    assert not [p for p in world.root.rglob("*") if p.is_file() and _holds(p, KEY)]
    # usage per stage, with aider's cost from the configured prices
    for stage in ("planner", "coder", "reviewer"):
        (checkpoint,) = world.checkpoints(stage)
        usage = checkpoint["usage"]
        assert usage["input_tokens"] == PROMPT_TOKENS, (stage, usage)
        assert usage["output_tokens"] == COMPLETION_TOKENS, (stage, usage)
        cost = (PROMPT_TOKENS * 3.0 + COMPLETION_TOKENS * 15.0) / 1e6
        assert usage["cost_usd"] == pytest.approx(cost, rel=0.02), (stage, usage)
    # aider did not install Playwright for the URL in the prompt
    aider = executable("aider")
    assert aider is not None
    assert not list(Path(aider).parent.parent.glob("lib/python*/site-packages/playwright"))


def _holds(path: Any, secret: str) -> bool:
    try:
        return secret.encode() in path.read_bytes()
    except OSError:
        return False


def test_a_401_reaches_error_in_aiders_words_without_retries(
    make_world: Callable[[str], World],
) -> None:
    with ChatServer("aider") as server:
        server.fail = error_response(401, "Incorrect API key provided: sk-bad")
        world = aider_world(make_world, server.url + "/v1", retries=2)
        run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed"
    assert "AuthenticationError" in fm["error"], fm["error"]
    assert "Incorrect API key provided" in fm["error"], fm["error"]
    assert len(server.completions()) == 1  # neither aider nor opus tried again
    assert not (world.job_files() / "plan.md").exists()


def test_a_500_is_retried_then_fails_in_aiders_words(make_world: Callable[[str], World]) -> None:
    """aider retries for about a minute, then exits 0 with no answer: a failed attempt, not
    a plan made of its error text."""
    with ChatServer("aider") as server:
        server.fail = error_response(500, "The scripted server had an internal error")
        world = aider_world(make_world, server.url + "/v1", stall_timeout=100, retries=0)
        run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed"
    assert "InternalServerError" in fm["error"], fm["error"]
    assert "The scripted server had an internal error" in fm["error"], fm["error"]
    assert len(server.completions()) > 3  # aider (and the openai client in it) retried
    assert not (world.job_files() / "plan.md").exists()


def test_an_unreachable_endpoint_is_stopped_within_the_stall_timeout(
    make_world: Callable[[str], World],
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    world = aider_world(make_world, url, stall_timeout=15, retries=0)
    result = world.run_once(env={"OPUS_TEST_AIDER_KEY": KEY})
    assert result.returncode == 0, result.stderr[-3000:]
    fm = world.frontmatter()
    assert fm["status"] in ("failed", "blocked")
    assert "Connection error" in fm["error"], fm["error"]  # litellm words it so
    # one attempt, stopped at the stall timeout (not at stage_timeout): aider alone would
    # retry for over a minute
    (checkpoint,) = world.checkpoints("planner")
    started, finished = (
        datetime.fromisoformat(checkpoint[k]) for k in ("started_at", "finished_at")
    )
    assert (finished - started).total_seconds() < 15 + 20  # its --version, the kill grace


def test_api_key_env_without_base_url_is_a_configuration_error(
    make_world: Callable[[str], World],
) -> None:
    world = make_world("aider")
    world.configure({"kind": "aider", "api_key_env": "OPUS_TEST_AIDER_KEY"})
    result = world.run_once(env={"OPUS_TEST_AIDER_KEY": KEY})
    assert result.returncode != 0
    assert "api_key_env only with base_url" in result.stdout + result.stderr

"""The ``openai`` kind under ``opus run --once`` against a real OpenAI-compatible server: the
LiteLLM proxy (pinned), with a model routed to the loopback Chat Completions API
(servers/chat.py) and a master key, so its own auth answers a wrong key."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import FAREWELL_FILE, PLAN_TEXT, World, closed_port, executable
from .servers.chat import COMPLETION_TOKENS, MODEL, PROMPT_TOKENS, ChatServer, error_response

pytestmark = [pytest.mark.cli("litellm"), pytest.mark.timeout(600)]

MASTER_KEY = "sk-litellm-master-0123456789"
PROXY_MODEL = "opus-scripted"
SANDBOX = '[sandbox]\nkind = "bwrap"\n'
"""Every agent inside bubblewrap (SPEC §17), as a person's opus runs them."""
FAST = {"stage_timeout": 60, "stall_timeout": 30, "retries": 1}
STARTUP = 180.0
"""Seconds the proxy may take to answer its health check (about 10 s idle, ~60 s loaded)."""


class Proxy:
    """A LiteLLM proxy on a free loopback port, routing PROXY_MODEL to ``upstream``."""

    def __init__(self, root: Path, upstream: ChatServer) -> None:
        self.upstream = upstream
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.config = root / "litellm.yaml"
        self.config.write_text(
            "model_list:\n"
            f"  - model_name: {PROXY_MODEL}\n"
            "    litellm_params:\n"
            f"      model: openai/{MODEL}\n"
            f"      api_base: {upstream.url}/v1\n"
            "      api_key: upstream-key\n"
            "general_settings:\n"
            f"  master_key: {MASTER_KEY}\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
            "  num_retries: 0\n"
        )
        self.home = root / "home"
        self.home.mkdir()
        self.log = root / "litellm.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Proxy:
        litellm = executable("litellm")
        assert litellm is not None
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.home),
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        }
        argv = [str(litellm), "--config", str(self.config)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"litellm exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url[:-3]}/health/liveliness", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.proc.kill()
        raise AssertionError(f"litellm did not start: {self.log.read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    if executable("litellm") is None:
        pytest.skip("litellm is not installed: run `python tests/real_cli/install.py litellm`")
    with ChatServer("openai") as upstream, Proxy(tmp_path_factory.mktemp("litellm"), upstream) as p:
        yield p


@pytest.fixture
def upstream(proxy: Proxy) -> Iterator[ChatServer]:
    """The proxy's upstream, reset for each test."""
    server = proxy.upstream
    server.fail, server.bad_verdicts = None, False
    server.requests.clear()
    yield server
    server.fail, server.bad_verdicts = None, False


def openai_world(make_world: Callable[[str], World], url: str, **pipeline: Any) -> World:
    world = make_world("litellm")
    world.configure(
        {
            "kind": "openai",
            "base_url": url,
            "api_key_env": "OPUS_TEST_PROXY_KEY",
            "model": PROXY_MODEL,
            "price_in_per_mtok": 3.0,
            "price_out_per_mtok": 15.0,
        },
        pipeline={**FAST, **pipeline},
        extra=SANDBOX,
    )
    return world


def run(world: World, key: str = MASTER_KEY) -> None:
    result = world.run_once(env={"OPUS_TEST_PROXY_KEY": key})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_openai_kind_reaches_review_through_litellm(
    make_world: Callable[[str], World], proxy: Proxy, upstream: ChatServer
) -> None:
    world = openai_world(make_world, proxy.url)
    run(world)
    fm = world.frontmatter()
    assert fm["status"] == "review", fm
    # the coder's diff was applied and opus committed it on the branch
    assert FAREWELL_FILE in world.branch_files()
    assert "Goodbye" in world.show(FAREWELL_FILE)
    assert (world.job_files() / "plan.md").read_text().strip() == PLAN_TEXT.strip()
    # one request per stage went through the proxy to the upstream model
    assert [upstream.stage(r.json) for r in upstream.completions()] == [
        "planner",
        "coder",
        "reviewer",
    ]
    for stage in ("planner", "coder", "reviewer"):
        (checkpoint,) = world.checkpoints(stage)
        usage = checkpoint["usage"]
        assert usage["input_tokens"] == PROMPT_TOKENS, (stage, usage)
        assert usage["output_tokens"] == COMPLETION_TOKENS, (stage, usage)
        assert usage["cost_usd"] > 0, (stage, usage)
    assert not [p for p in world.root.rglob("*") if p.is_file() and _holds(p, MASTER_KEY)]


def _holds(path: Path, secret: str) -> bool:
    try:
        return secret.encode() in path.read_bytes()
    except OSError:
        return False


def test_failed_reviewer_attempts_keep_their_usage(
    make_world: Callable[[str], World], proxy: Proxy, upstream: ChatServer
) -> None:
    upstream.bad_verdicts = True
    world = openai_world(make_world, proxy.url, retries=1)
    run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed", fm
    assert "no valid verdict" in fm["error"], fm["error"]
    assert len(upstream.completions("reviewer")) == 4  # 2 attempts, each asked twice
    (checkpoint,) = world.checkpoints("reviewer")
    assert checkpoint["outcome"] == "error" and checkpoint["attempts"] == 2
    assert checkpoint["usage"]["input_tokens"] == 4 * PROMPT_TOKENS, checkpoint
    assert checkpoint["usage"]["output_tokens"] == 4 * COMPLETION_TOKENS, checkpoint
    assert world.job()["usage"]["input_tokens"] == 6 * PROMPT_TOKENS


def test_a_wrong_key_is_refused_by_the_proxy_and_not_retried(
    make_world: Callable[[str], World], proxy: Proxy, upstream: ChatServer
) -> None:
    """LiteLLM without a database refuses any key but its master key with HTTP 400 "No
    connected db." (it cannot look the key up): a permanent error, in its words."""
    world = openai_world(make_world, proxy.url, retries=2)
    started = time.monotonic()
    run(world, key="sk-not-the-master-key")
    fm = world.frontmatter()
    assert fm["status"] == "failed", fm
    assert "HTTP 400" in fm["error"] and "No connected db" in fm["error"], fm["error"]
    assert "sk-not-the-master-key" not in fm["error"]
    assert upstream.completions() == []  # the proxy said no; nothing reached the model
    (checkpoint,) = world.checkpoints("planner")
    assert checkpoint["attempts"] == 1
    assert "(try 2/" not in (world.job_files() / "planner-1.log").read_text()
    assert time.monotonic() - started < 30


def test_an_upstream_500_is_retried_then_fails_in_its_words(
    make_world: Callable[[str], World], proxy: Proxy, upstream: ChatServer
) -> None:
    upstream.fail = error_response(500, "The scripted server had an internal error")
    world = openai_world(make_world, proxy.url)
    run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed", fm
    assert "HTTP 500" in fm["error"], fm["error"]
    assert "internal error" in fm["error"], fm["error"]
    assert upstream.completions()  # the proxy passed the upstream's answer on
    log = (world.job_files() / "planner-1.log").read_text()
    tries = re.findall(r"## error \(try (\d+)/(\d+)\)", log)
    assert len(tries) >= 2 and tries[-1][0] == tries[-1][1], tries  # the kind's own tries


def test_an_unreachable_endpoint_fails_within_the_stall_timeout(
    make_world: Callable[[str], World],
) -> None:
    world = openai_world(make_world, f"http://127.0.0.1:{closed_port()}/v1", retries=0)
    started = time.monotonic()
    run(world)
    fm = world.frontmatter()
    assert fm["status"] == "failed", fm
    assert "cannot reach" in fm["error"] and "ConnectError" in fm["error"], fm["error"]
    assert time.monotonic() - started < FAST["stall_timeout"]

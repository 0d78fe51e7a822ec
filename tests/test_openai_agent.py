"""The ``openai`` agent kind against httpx.MockTransport and real git repositories."""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from opus.orchestrator.agents.base import StageContext
from opus.orchestrator.agents.command import parse_verdict
from opus.orchestrator.agents.openai import OpenAIAgent
from opus.orchestrator.agents.patches import extract_diff
from opus.orchestrator.config import AgentSection
from opus.orchestrator.errors import AgentError, AgentOutputError, BackendError
from opus.orchestrator.lifecycle import Stage
from opus.orchestrator.models import FeatureRequest, Feedback, Issue, Usage, Verdict
from opus.orchestrator.redact import Redactor

KEY = "sk-test-VERY-SECRET-4242"
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
HELLO = "def greet():\n    return 'hi'\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        [*GIT, *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "hello.py").write_text(HELLO)
    (repo / "README.md").write_text("# demo\n")
    (repo / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0binary")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    return repo


def make_ctx(repo: Path, stage: Stage, **kw: Any) -> StageContext:
    fr = FeatureRequest(
        id="FR-9",
        title="Greet loudly",
        path=repo.parent / "FR-9.md",
        body="Make greet() in hello.py return 'HELLO'.",
    )
    fields: dict[str, Any] = {
        "stage": stage,
        "iteration": 1,
        "job_id": "job-9",
        "fr": fr,
        "worktree": repo,
        "artifacts": repo.parent,
        "prompt": "(rendered prompt)",
        "prompt_file": repo.parent / "prompt.md",
        "output_file": repo.parent / "out",
        "log_file": repo.parent / f"{stage}-1.log",
        "base_commit": git(repo, "rev-parse", "HEAD"),
        "timeout": 30.0,
        "stall_timeout": 30.0,
        "plan": "1. change hello.py",
    }
    fields.update(kw)
    return StageContext(**fields)


Reply = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


class Server:
    """Plays scripted replies, one per request (the last one repeats), and records requests."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, httpx.Response):
            return reply
        return reply(request)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]


def answer(text: str, usage: dict[str, Any] | None = None, status: int = 200) -> httpx.Response:
    data: dict[str, Any] = {"choices": [{"message": {"role": "assistant", "content": text}}]}
    if usage is not None:
        data["usage"] = usage
    return httpx.Response(status, json=data)


def section(**kw: Any) -> AgentSection:
    data: dict[str, Any] = {
        "kind": "openai",
        "model": "test-model",
        "base_url": "http://llm.test/v1/",
        "api_key_env": "TEST_LLM_KEY",
    }
    data.update(kw)
    return AgentSection.model_validate(data)


def agent(
    stage: Stage, server: Server, sleeps: list[float] | None = None, **kw: Any
) -> OpenAIAgent:
    async def sleep(seconds: float) -> None:
        (sleeps if sleeps is not None else []).append(seconds)

    return OpenAIAgent(
        kw.pop("section", None) or section(),
        stage,
        environ={"TEST_LLM_KEY": KEY},
        transport=server.transport,
        sleep=sleep,
        rand=kw.pop("rand", lambda: 0.5),
        **kw,
    )


@pytest.mark.anyio
async def test_planner_returns_the_assistant_message(repo: Path) -> None:
    server = Server(answer("## Plan\n1. edit hello.py\n"))
    sec = section(temperature=0.2, max_tokens=500)
    result = await agent(Stage.PLANNER, server, section=sec).run(make_ctx(repo, Stage.PLANNER))
    assert result.output == "## Plan\n1. edit hello.py"
    (request,) = server.requests
    assert str(request.url) == "http://llm.test/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    body = server.bodies()[0]
    assert body["model"] == "test-model"
    assert body["temperature"] == 0.2 and body["max_tokens"] == 500
    system, user = body["messages"]
    assert system["role"] == "system" and "plan" in system["content"]
    assert "FR-9" in user["content"] and "return 'HELLO'" in user["content"]
    assert HELLO in user["content"]  # named in the FR: its content is shown
    assert "logo.png" in user["content"]  # listed …
    assert "binary" not in user["content"]  # … but a binary's bytes are not


@pytest.mark.anyio
async def test_reviewer_retries_once_with_the_validation_error(repo: Path) -> None:
    (repo / "hello.py").write_text("def greet():\n    return 'HELLO'\n")
    good = '{"verdict": "approve", "confidence": 88, "summary": "does it", "issues": []}'
    server = Server(
        answer('{"verdict": "looks good", "confidence": 88}', {"prompt_tokens": 10}),
        answer(f"Here you go:\n```json\n{good}\n```\n", {"prompt_tokens": 15}),
    )
    ctx = make_ctx(repo, Stage.REVIEWER)
    result = await agent(Stage.REVIEWER, server).run(ctx)
    assert result.verdict == Verdict(verdict="approve", confidence=88, summary="does it")
    assert result.usage is not None and result.usage.input_tokens == 25
    first, second = server.bodies()
    assert "approve" in first["messages"][0]["content"]  # the schema is in the system message
    assert "+    return 'HELLO'" in first["messages"][1]["content"]  # the diff is sent
    assert second["messages"][2] == {
        "role": "assistant",
        "content": '{"verdict": "looks good", "confidence": 88}',
    }
    feedback = second["messages"][3]["content"]
    assert "not a valid verdict" in feedback and "verdict:" in feedback
    assert "'approve' or 'request_changes'" in feedback


@pytest.mark.anyio
async def test_reviewer_gives_up_after_the_second_bad_answer(repo: Path) -> None:
    server = Server(answer("no json here"), answer("still {not json"))
    with pytest.raises(AgentOutputError) as info:
        await agent(Stage.REVIEWER, server).run(make_ctx(repo, Stage.REVIEWER))
    assert info.value.retryable
    assert len(server.requests) == 2
    assert "no JSON object" in server.bodies()[1]["messages"][3]["content"]


@pytest.mark.anyio
async def test_a_failed_reviewer_attempt_keeps_the_usage_of_its_answered_requests(
    repo: Path,
) -> None:
    used = {"prompt_tokens": 100, "completion_tokens": 7}
    server = Server(answer("no json here", used), answer("still {not json", used))
    with pytest.raises(AgentOutputError) as info:
        await agent(Stage.REVIEWER, server).run(make_ctx(repo, Stage.REVIEWER))
    assert info.value.usage == Usage(input_tokens=200, output_tokens=14)


@pytest.mark.anyio
async def test_an_http_failure_after_an_answer_keeps_the_answered_usage(repo: Path) -> None:
    used = {"prompt_tokens": 50, "completion_tokens": 5}
    server = Server(answer("no json here", used), httpx.Response(401, text="bad key"))
    with pytest.raises(BackendError) as info:
        await agent(Stage.REVIEWER, server).run(make_ctx(repo, Stage.REVIEWER))
    assert info.value.status == 401
    assert info.value.usage == Usage(input_tokens=50, output_tokens=5)


DIFF_OK = """I changed the greeting.

```diff
--- a/hello.py
+++ b/hello.py
@@ -1,2 +1,2 @@
 def greet():
-    return 'hi'
+    return 'HELLO'
--- /dev/null
+++ b/NOTES.md
@@ -0,0 +1 @@
+loud now
```
"""

DIFF_BAD = """```diff
--- a/hello.py
+++ b/hello.py
@@ -1,2 +1,2 @@
 def greet_someone():
-    return 'bye'
+    return 'HELLO'
```"""


@pytest.mark.anyio
async def test_coder_applies_the_diff_to_the_worktree(repo: Path) -> None:
    server = Server(answer(DIFF_OK))
    fb = Feedback(
        iteration=1,
        reason="changes_requested",
        message="be louder",
        issues=[Issue(message="still quiet", file="hello.py", line=2)],
    )
    result = await agent(Stage.CODER, server).run(make_ctx(repo, Stage.CODER, feedback=fb))
    assert result.passed
    assert "I changed the greeting." in result.output
    assert (repo / "hello.py").read_text() == "def greet():\n    return 'HELLO'\n"
    assert (repo / "NOTES.md").read_text() == "loud now\n"
    user = server.bodies()[0]["messages"][1]["content"]
    assert "be louder" in user and "hello.py:2 still quiet" in user and "1. change hello.py" in user


@pytest.mark.anyio
async def test_coder_patch_that_does_not_apply_fails_the_iteration(repo: Path) -> None:
    server = Server(answer(DIFF_BAD))
    result = await agent(Stage.CODER, server).run(make_ctx(repo, Stage.CODER))
    assert result.passed is False
    assert "the patch did not apply" in result.output
    assert "hello.py" in result.output and "patch does not apply" in result.output
    assert (repo / "hello.py").read_text() == HELLO
    assert git(repo, "status", "--porcelain") == ""


@pytest.mark.anyio
async def test_coder_answer_without_a_diff_fails_the_iteration(repo: Path) -> None:
    result = await agent(Stage.CODER, Server(answer("Sorry, I can't."))).run(
        make_ctx(repo, Stage.CODER)
    )
    assert result.passed is False and "no unified diff" in result.output


@pytest.mark.anyio
async def test_coder_context_respects_the_budget(repo: Path) -> None:
    (repo / "big.txt").write_text("x" * 5000 + "\n")
    (repo / "small.txt").write_text("tiny\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "more")
    server = Server(answer(DIFF_OK))
    await agent(Stage.CODER, server, context_bytes=3000).run(make_ctx(repo, Stage.CODER))
    user = server.bodies()[0]["messages"][1]["content"]
    assert HELLO in user and "tiny" in user
    assert "x" * 5000 not in user and "big.txt" in user  # listed, not shown


@pytest.mark.anyio
async def test_429_with_retry_after_then_success(repo: Path) -> None:
    sleeps: list[float] = []
    server = Server(
        httpx.Response(429, headers={"Retry-After": "0"}, json={"error": "slow down"}),
        httpx.Response(503, headers={"retry-after-ms": "1500"}),
        httpx.ConnectError("refused"),
        answer("the plan"),
    )
    result = await agent(Stage.PLANNER, server, sleeps, tries=4).run(make_ctx(repo, Stage.PLANNER))
    assert result.output == "the plan"
    assert len(server.requests) == 4
    assert sleeps == [0.0, 1.5, 4.0]  # Retry-After, retry-after-ms, then 1·2² × (0.5 + 0.5)


@pytest.mark.anyio
async def test_401_is_not_retried_and_hides_the_key(repo: Path) -> None:
    sleeps: list[float] = []
    server = Server(httpx.Response(401, json={"error": f"invalid api key {KEY}"}))
    ctx = make_ctx(repo, Stage.PLANNER)
    with pytest.raises(BackendError) as info:
        await agent(Stage.PLANNER, server, sleeps).run(ctx)
    assert info.value.status == 401 and info.value.retryable is False
    assert len(server.requests) == 1 and sleeps == []
    assert KEY not in str(info.value) and "***" in str(info.value)
    assert KEY not in ctx.log_file.read_text()


@pytest.mark.anyio
async def test_5xx_exhausted_is_a_final_backend_error(repo: Path) -> None:
    """The agent retries HTTP itself; once its tries are used up the pipeline adds none."""
    sleeps: list[float] = []
    server = Server(httpx.Response(502, text="bad gateway"))
    with pytest.raises(BackendError) as info:
        await agent(Stage.PLANNER, server, sleeps, rand=lambda: 0.0).run(
            make_ctx(repo, Stage.PLANNER)
        )
    assert info.value.status == 502 and info.value.retryable is False
    assert len(server.requests) == 3
    assert sleeps == [0.5, 1.0]


@pytest.mark.parametrize(
    ("usage", "prices", "expected"),
    [
        (
            {"prompt_tokens": 1000, "completion_tokens": 200, "cost": 0.0042},
            {"price_in_per_mtok": 3.0, "price_out_per_mtok": 15.0},
            Usage(input_tokens=1000, output_tokens=200, cost_usd=0.0042),
        ),
        (
            {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200},
            {"price_in_per_mtok": 3.0, "price_out_per_mtok": 15.0},
            Usage(input_tokens=1000, output_tokens=200, cost_usd=0.006, cost_estimated=True),
        ),
        (
            {"prompt_tokens": 7, "completion_tokens": 3},
            {},
            Usage(input_tokens=7, output_tokens=3),
        ),
    ],
)
@pytest.mark.anyio
async def test_usage_and_cost(
    repo: Path, usage: dict[str, Any], prices: dict[str, float], expected: Usage
) -> None:
    server = Server(answer("plan", usage))
    result = await agent(Stage.PLANNER, server, section=section(**prices)).run(
        make_ctx(repo, Stage.PLANNER)
    )
    assert result.usage == expected


@pytest.mark.anyio
async def test_the_key_is_never_logged(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = Server(
        httpx.Response(500, text=f"upstream rejected Bearer {KEY}"),
        answer(f"plan mentioning {KEY} and other-secret-value"),
    )
    ctx = make_ctx(repo, Stage.PLANNER, redactor=Redactor(["other-secret-value"]))
    result = await agent(Stage.PLANNER, server).run(ctx)
    log = ctx.log_file.read_text()
    assert "## request 1" in log and "## response 1" in log and "HTTP 500" in log
    assert "authorization" not in log.lower()
    for text in (log, result.output, caplog.text):
        assert KEY not in text
        assert "other-secret-value" not in text
    assert any(r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.anyio
async def test_missing_key_variable_is_a_permanent_error(repo: Path) -> None:
    server = Server(answer("plan"))
    a = OpenAIAgent(section(), Stage.PLANNER, environ={}, transport=server.transport)
    with pytest.raises(AgentError) as info:
        await a.run(make_ctx(repo, Stage.PLANNER))
    assert not info.value.retryable and "TEST_LLM_KEY" in str(info.value)
    assert server.requests == []


def test_tester_is_not_supported() -> None:
    with pytest.raises(AgentError) as info:
        OpenAIAgent(section(), Stage.TESTER)
    assert not info.value.retryable and "tester" in str(info.value)


@pytest.mark.anyio
async def test_no_key_configured_sends_no_authorization(repo: Path) -> None:
    server = Server(answer("plan"))
    a = OpenAIAgent(
        section(api_key_env=None), Stage.PLANNER, environ={}, transport=server.transport
    )
    assert a.url == "http://llm.test/v1/chat/completions"
    result = await a.run(make_ctx(repo, Stage.PLANNER))
    assert result.output == "plan"
    (request,) = server.requests
    assert "authorization" not in request.headers


@pytest.mark.parametrize(
    "text",
    [
        '{"verdict": "approve", "confidence": 90}',
        'Sure!\n```json\n{"verdict": "approve", "confidence": 90}\n```',
        'My review: {"verdict": "approve", "confidence": 90, "issues": [{"message": "x"}]} done',
        '{"note": 1}\n{"verdict": "approve", "confidence": 90}',
    ],
)
def test_parse_verdict_finds_the_object(text: str) -> None:
    assert parse_verdict(text).verdict == "approve"
    assert parse_verdict(text).confidence == 90


def test_extract_diff_variants() -> None:
    assert extract_diff("no diff") is None
    bare = "--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b"
    assert extract_diff(f"Here:\n{bare}") == bare + "\n"
    fenced = f"```\n{bare}\n```\ntrailing words"
    assert extract_diff(fenced) == bare + "\n"
    two = f"```diff\n{bare}\n```\nand\n```patch\n{bare}\n```"
    assert extract_diff(two) == f"{bare}\n{bare}\n"
    md = "```diff\n--- a/R.md\n+++ b/R.md\n@@ -1 +1,3 @@\n-a\n+```\n+code\n+```\n```"
    assert extract_diff(md) == "--- a/R.md\n+++ b/R.md\n@@ -1 +1,3 @@\n-a\n+```\n+code\n+```\n"


@pytest.mark.anyio
async def test_miscounted_hunks_still_apply(repo: Path) -> None:
    diff = "```diff\n--- a/hello.py\n+++ b/hello.py\n@@ -1,7 +1,9 @@\n def greet():\n"
    diff += "-    return 'hi'\n+    return 'HELLO'\n```\n"
    result = await agent(Stage.CODER, Server(answer(diff))).run(make_ctx(repo, Stage.CODER))
    assert result.passed, result.output
    assert (repo / "hello.py").read_text() == "def greet():\n    return 'HELLO'\n"


@pytest.mark.anyio
async def test_a_3way_conflict_is_undone(repo: Path) -> None:
    blob = git(repo, "rev-parse", "HEAD:hello.py")
    (repo / "hello.py").write_text("def greet():\n    return 'hey'\n")
    git(repo, "commit", "-q", "-am", "hey")
    diff = (
        f"```diff\ndiff --git a/hello.py b/hello.py\nindex {blob[:12]}..{'1' * 12} 100644\n"
        "--- a/hello.py\n+++ b/hello.py\n@@ -1,2 +1,2 @@\n def greet():\n"
        "-    return 'hi'\n+    return 'HELLO'\n```\n"
    )
    result = await agent(Stage.CODER, Server(answer(diff))).run(make_ctx(repo, Stage.CODER))
    assert result.passed is False and "patch does not apply" in result.output
    assert (repo / "hello.py").read_text() == "def greet():\n    return 'hey'\n"
    assert git(repo, "status", "--porcelain") == ""

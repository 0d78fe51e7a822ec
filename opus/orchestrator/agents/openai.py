"""The ``openai`` agent kind: an OpenAI-compatible Chat Completions endpoint (SPEC §5).

- planner: the assistant's answer is the plan;
- coder: asks for ONE unified diff in a fenced ``diff`` block and applies it to the worktree
  with ``git apply --3way``, falling back to ``git apply``; a diff that does not apply is a
  rejected iteration (``passed=False``, the git error as output), not an error;
- reviewer: asks for the verdict JSON of SPEC §5.3, validates it, and asks once more with the
  validation error when it is invalid;
- tester: not supported (a permanent AgentError at construction).

Inside one attempt, connection errors and HTTP 408/409/429/5xx are retried with backoff and
jitter (``retry-after-ms`` / ``Retry-After`` honoured) up to ``tries`` requests. The api key
never appears in an exception, a log line or the transcript written to ``ctx.log_file``.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx

from ..config import AgentSection
from ..errors import AgentError, AgentOutputError, AgentTimeout, BackendError
from ..lifecycle import Stage
from ..models import Usage
from ..redact import Redactor
from .base import StageContext, StageResult
from .command import parse_verdict
from .patches import apply_diff, diff_against, extract_diff
from .repo_context import feedback_text, fr_text, hint_text, plan_text, repo_files

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUSES = frozenset({408, 409, 429})

_SYSTEM = {
    Stage.PLANNER: (
        "You are the planner of an autonomous coding pipeline. Read the feature request and "
        "the repository context, then write a concise, step-by-step implementation plan in "
        "markdown: the files to change or add, what to change in each, and how to test it. "
        "Do not write the code."
    ),
    Stage.CODER: (
        "You are the coder of an autonomous coding pipeline. Implement the feature request "
        "following the plan (and fix what the feedback reports, if any). Answer with exactly "
        "ONE unified diff against the repository root in a single ```diff fenced block, with "
        "`--- a/path` / `+++ b/path` headers (`--- /dev/null` for a new file) and enough "
        "unchanged context lines copied exactly from the files shown. Add a short explanation "
        "before the block if you like; put nothing after it."
    ),
    Stage.REVIEWER: (
        "You are the reviewer of an autonomous coding pipeline. Review the diff against the "
        "feature request and the plan. Answer with ONLY a JSON object (no prose), following "
        "this schema:\n"
        '{"verdict": "approve" | "request_changes", "confidence": 0-100, '
        '"summary": "one paragraph", "issues": [{"severity": "blocker|major|minor|nit", '
        '"message": "…", "file": "path (optional)", "line": 12}]}\n'
        "Approve only when the change implements the request correctly; otherwise request "
        "changes and list each issue."
    ),
}


class OpenAIAgent:
    """Runs the planner, coder or reviewer stage through ``POST {base_url}/chat/completions``."""

    def __init__(
        self,
        section: AgentSection,
        stage: Stage,
        *,
        environ: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rand: Callable[[], float] = random.random,
        context_bytes: int = 60_000,
        tries: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
    ) -> None:
        if stage not in _SYSTEM:
            raise AgentError(
                f"[agents.{stage}] kind = 'openai' cannot run the {stage} stage; "
                "use kind = 'command' (e.g. command = \"python -m pytest -q\")",
                retryable=False,
            )
        if not section.model:
            raise AgentError(f"[agents.{stage}] kind = 'openai' needs `model`", retryable=False)
        self.section = section
        self.stage = stage
        self.model = section.model
        self.url = (section.base_url or DEFAULT_BASE_URL).rstrip("/") + "/chat/completions"
        try:
            httpx.URL(self.url)
        except httpx.InvalidURL as e:
            raise BackendError(
                f"[agents.{stage}] base_url is not a valid URL: {e}", retryable=False
            ) from e
        self._environ = environ
        self._transport = transport
        self._sleep = sleep
        self._rand = rand
        self.context_bytes = context_bytes
        self.tries = max(1, tries)
        self.base_delay = base_delay
        self.max_delay = max_delay

    async def run(self, ctx: StageContext) -> StageResult:
        key = self._api_key()
        hide = Redactor([key] if key else [])

        def redact(text: str) -> str:
            return hide(ctx.redactor(text))

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        chat: _Chat | None = None
        try:
            with anyio.fail_after(ctx.timeout):
                async with httpx.AsyncClient(
                    transport=self._transport, timeout=ctx.timeout, headers=headers
                ) as client:
                    chat = _Chat(self, ctx, client, redact)
                    await chat.log(f"# {self.stage} via {self.model} at {redact(self.url)}\n")
                    if self.stage is Stage.PLANNER:
                        return await self._plan(ctx, chat)
                    if self.stage is Stage.CODER:
                        return await self._code(ctx, chat)
                    return await self._review(ctx, chat)
        except AgentError as e:  # a failed attempt still paid for the requests answered
            e.usage = e.usage or (chat.usage if chat is not None else None)
            raise
        except TimeoutError as e:
            timeout = AgentTimeout(f"no answer from {self.model} within {ctx.timeout:g} s")
            timeout.usage = chat.usage if chat is not None else None
            raise timeout from e

    def _api_key(self) -> str | None:
        name = self.section.api_key_env
        if not name:
            return None
        env = os.environ if self._environ is None else self._environ
        value = env.get(name)
        if not value:
            raise AgentError(
                f"[agents.{self.stage}] api_key_env names {name}, which is not set",
                retryable=False,
            )
        return value

    async def _plan(self, ctx: StageContext, chat: _Chat) -> StageResult:
        context = await anyio.to_thread.run_sync(
            repo_files, ctx.worktree, hint_text(ctx), self.context_bytes
        )
        user = f"{fr_text(ctx)}\n\n{context}"
        answer = await chat.ask([_msg("system", _SYSTEM[Stage.PLANNER]), _msg("user", user)])
        return StageResult(output=chat.redact(answer.strip()), usage=chat.usage)

    async def _code(self, ctx: StageContext, chat: _Chat) -> StageResult:
        context = await anyio.to_thread.run_sync(
            repo_files, ctx.worktree, hint_text(ctx), self.context_bytes
        )
        parts = [fr_text(ctx), plan_text(ctx), feedback_text(ctx), context]
        user = "\n\n".join(p for p in parts if p)
        answer = await chat.ask([_msg("system", _SYSTEM[Stage.CODER]), _msg("user", user)])
        diff = extract_diff(answer)
        if diff is None:
            output = "the answer held no unified diff (expected one ```diff block)"
            await chat.log(f"## patch\n{output}\n")
            return StageResult(output=output, passed=False, usage=chat.usage)
        error = await anyio.to_thread.run_sync(apply_diff, ctx.worktree, diff, ctx.timeout)
        if error is not None:
            output = chat.redact(f"the patch did not apply: {error}")
            await chat.log(f"## patch\n{output}\n")
            return StageResult(output=output, passed=False, usage=chat.usage)
        await chat.log("## patch\napplied\n")
        return StageResult(output=chat.redact(answer.strip()), usage=chat.usage)

    async def _review(self, ctx: StageContext, chat: _Chat) -> StageResult:
        diff = await anyio.to_thread.run_sync(
            diff_against, ctx.worktree, ctx.base_commit, self.context_bytes, ctx.timeout
        )
        parts = [fr_text(ctx), plan_text(ctx), f"## Diff against the base\n\n{diff}"]
        messages = [_msg("system", _SYSTEM[Stage.REVIEWER]), _msg("user", "\n\n".join(parts))]
        answer = await chat.ask(messages)
        try:
            verdict = parse_verdict(answer)
        except ValueError as first:
            problem = str(first)
            await chat.log(f"## invalid verdict\n{chat.redact(problem)}\n")
            messages += [
                _msg("assistant", answer),
                _msg(
                    "user",
                    f"That answer is not a valid verdict: {problem}\n"
                    "Reply with ONLY the JSON object, following the schema.",
                ),
            ]
            answer = await chat.ask(messages)
            try:
                verdict = parse_verdict(answer)
            except ValueError as second:
                raise AgentOutputError(
                    chat.redact(f"the reviewer gave no valid verdict: {second}"),
                    output=chat.redact(answer[-2000:]),
                ) from None
        return StageResult(output=chat.redact(verdict.summary), verdict=verdict, usage=chat.usage)


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


class _Chat:
    """One stage's conversation: retried requests, summed usage, the redacted transcript."""

    def __init__(
        self,
        agent: OpenAIAgent,
        ctx: StageContext,
        client: httpx.AsyncClient,
        redact: Callable[[str], str],
    ) -> None:
        self.agent = agent
        self.ctx = ctx
        self.client = client
        self.redact = redact
        self.usage: Usage | None = None
        self.requests = 0

    async def log(self, text: str) -> None:
        await anyio.to_thread.run_sync(_append, self.ctx.log_file, self.redact(text))

    async def ask(self, messages: list[dict[str, str]]) -> str:
        """Send the conversation; return the assistant's text (usage is added up)."""
        a = self.agent
        payload: dict[str, Any] = {"model": a.model, "messages": messages}
        if a.section.temperature is not None:
            payload["temperature"] = a.section.temperature
        if a.section.max_tokens is not None:
            payload["max_tokens"] = a.section.max_tokens
        self.requests += 1
        shown = "\n".join(f"### {m['role']}\n{m['content']}" for m in messages)
        await self.log(f"\n## request {self.requests}\n{shown}\n")
        data = await self._post(payload)
        usage = _usage(data, a.section)
        self.usage = usage if self.usage is None else self.usage + usage
        try:
            content = data["choices"][0]["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise AgentOutputError(
                self.redact(f"{a.model} returned no chat completion: {str(data)[:300]}")
            ) from e
        if isinstance(content, list):  # content parts
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        text = str(content)
        cost = f", ${usage.cost_usd:.6f}{' (estimated)' if usage.cost_estimated else ''}"
        await self.log(
            f"\n## response {self.requests} ({usage.input_tokens} in, "
            f"{usage.output_tokens} out{cost})\n{text}\n"
        )
        return text

    async def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        a = self.agent
        for attempt in range(1, a.tries + 1):
            try:
                response = await self.client.post(a.url, json=payload)
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
                raise BackendError(
                    self.redact(f"bad base_url for [agents.{a.stage}]: {e}"), retryable=False
                ) from e
            except httpx.TransportError as e:
                error = BackendError(
                    self.redact(f"cannot reach {a.url}: {type(e).__name__}: {e}"), retryable=True
                )
            else:
                status = response.status_code
                if response.is_success:
                    try:
                        data = response.json()
                    except ValueError as e:
                        raise AgentOutputError(
                            self.redact(f"{a.url} answered with something that is not JSON")
                        ) from e
                    if not isinstance(data, dict):
                        raise AgentOutputError(self.redact(f"{a.url} answered a non-object"))
                    return data
                body = " ".join(response.text.split())[:300]
                message = self.redact(f"{a.url} answered HTTP {status}: {body}")
                if status not in RETRY_STATUSES and status < 500:
                    await self.log(f"\n## error\n{message}\n")
                    raise BackendError(message, status=status, retryable=False)
                error = BackendError(
                    message, status=status, retryable=True, retry_after=_retry_after(response)
                )
            await self.log(f"\n## error (try {attempt}/{a.tries})\n{error}\n")
            if attempt == a.tries:  # its own retries used up: the pipeline does not add more
                raise BackendError(str(error), status=error.status, retryable=False) from error
            delay = min(a.base_delay * 2 ** (attempt - 1), a.max_delay) * (0.5 + a._rand())
            if error.retry_after is not None:
                delay = min(error.retry_after, a.max_delay)
            logger.warning(
                "%s %s: %s; retry %d/%d in %.1f s",
                self.ctx.fr.id,
                a.stage,
                error,
                attempt,
                a.tries - 1,
                delay,
            )
            await a._sleep(delay)
        raise AssertionError("unreachable")


def _usage(data: Mapping[str, Any], section: AgentSection) -> Usage:
    raw = data.get("usage")
    u: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    tokens_in = _int(u.get("prompt_tokens"))
    tokens_out = _int(u.get("completion_tokens"))
    cost = u.get("cost")
    if isinstance(cost, int | float) and not isinstance(cost, bool):
        return Usage(input_tokens=tokens_in, output_tokens=tokens_out, cost_usd=float(cost))
    price_in, price_out = section.price_in_per_mtok, section.price_out_per_mtok
    if price_in is None and price_out is None:
        return Usage(input_tokens=tokens_in, output_tokens=tokens_out)
    estimate = (tokens_in * (price_in or 0.0) + tokens_out * (price_out or 0.0)) / 1_000_000
    return Usage(
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        cost_usd=round(estimate, 6),
        cost_estimated=True,
    )


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    ms = response.headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)

"""Agent CLIs run headless: claude, codex, aider, opencode, gemini (NOTES "Agent CLIs").

Each preset is a :class:`CommandAgent` that builds its CLI's documented non-interactive
argv (planner and reviewer read-only where the CLI allows it; none may push), hands over the
prompt the way the CLI wants it, and reads the final message and usage from its output.
``command`` replaces the executable (argv head), ``args`` are appended, ``model`` becomes the
CLI's model flag. The CLI's ``--version`` is asked once per agent and kept in ``meta``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Protocol

from ..config import AgentSection
from ..errors import AgentCrashed, AgentError, AgentNotFound
from ..lifecycle import Stage
from ..models import Usage
from ..supervisor import ProcessResult
from .base import Agent, StageContext, StageResult
from .command import (
    CommandAgent,
    Reply,
    json_objects,
    placeholder_values,
    priced_usage,
    split_command,
    substitute,
)

__all__ = (
    "KINDS",
    "AgentFactory",
    "AiderAgent",
    "ClaudeAgent",
    "CodexAgent",
    "GeminiAgent",
    "OpencodeAgent",
    "PresetAgent",
    "build_agent",
)

log = logging.getLogger(__name__)

VERSION_TIMEOUT = 10.0
MAX_PROMPT_ARG = 100_000
"""Bytes of prompt passed as one argument; beyond it (Linux caps one at 128 KiB) the CLI is
told to read the prompt file instead."""


class PresetAgent(CommandAgent):
    """A CommandAgent for one known CLI."""

    executable: ClassVar[str]
    product: ClassVar[str]

    def __init__(
        self,
        section: AgentSection,
        stage: Stage,
        *,
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
        grace: float = 5.0,
    ) -> None:
        super().__init__(section, stage, argv=argv, environ=environ, grace=grace)
        if argv is not None:
            self.head = list(argv)
        else:
            self.head = split_command(section.command) or [self.executable]
        self.version: str | None = None

    @property
    def read_only(self) -> bool:
        return self.stage is not Stage.CODER

    def model_flag(self, flag: str = "--model") -> list[str]:
        return [flag, self.section.model] if self.section.model else []

    def fill(self, args: Sequence[str], ctx: StageContext) -> list[str]:
        """Placeholders replaced (never in the prompt itself)."""
        values = placeholder_values(ctx)
        return [substitute(a, values) for a in args]

    def prompt_arg(self, ctx: StageContext) -> str:
        """The prompt as one argument (a pointer to the prompt file when it is too long)."""
        prompt = ctx.prompt
        if len(prompt.encode()) > MAX_PROMPT_ARG:
            prompt = f"Read the file {ctx.prompt_file} and carry out the task it describes."
        return " " + prompt if prompt.startswith("-") else prompt

    def stdin_for(self, ctx: StageContext) -> bytes | None:
        return None

    def not_found(self, exe: str) -> str:
        where = "" if os.sep in exe else " on PATH"
        return (
            f"`{exe}` not found{where}; install {self.product} or set "
            f"[agents.{self.stage}] kind = another agent (or command = its full path)"
        )

    async def run(self, ctx: StageContext) -> StageResult:
        version = await self.cli_version(ctx)
        result = await super().run(ctx)
        result.meta = {**result.meta, "version": version}
        return result

    async def cli_version(self, ctx: StageContext) -> str:
        """``<exe> --version`` (first line), asked once; "unknown" when it fails."""
        if self.version is None:
            try:
                proc = await self.execute(
                    ctx, [*self.head, "--version"], None, timeout=VERSION_TIMEOUT, watch=False
                )
            except AgentNotFound:
                raise
            except AgentError as e:
                log.warning("%s --version failed: %s", self.head[0], e)
                proc = None
            text = (proc.stdout.strip() or proc.stderr.strip()) if proc else ""
            ok = proc is not None and proc.returncode == 0 and text
            self.version = text.splitlines()[0].strip()[:200] if ok else "unknown"
        return self.version


def _lines_json(text: str) -> Iterator[dict[str, Any]]:
    """Each line of ``text`` that is a JSON object (JSONL / NDJSON)."""
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return 0
    try:
        return int(float(value))
    except ValueError:
        return 0


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class ClaudeAgent(PresetAgent):
    """Claude Code: ``claude -p --output-format json``, the prompt on stdin."""

    executable = "claude"
    product = "Claude Code"

    def quiet(self) -> bool:
        return "stream-json" not in self.section.args  # json: one object at the very end

    def build_argv(self, ctx: StageContext) -> list[str]:
        prompt = [] if self.section.stdin else [self.prompt_arg(ctx)]
        if self.read_only:
            perms = ["--permission-mode", "dontAsk", "--allowedTools", "Read,Grep,Glob"]
        else:
            perms = ["--permission-mode", "acceptEdits"]
        return [
            *self.fill(self.head, ctx),
            "-p",
            *prompt,
            *self.fill(
                [
                    "--output-format", "json", *perms,
                    "--disallowedTools", "Bash(git push:*)",
                    *self.model_flag(), *self.section.args,
                    # stream-json (chosen through args) needs --verbose (NOTES.md)
                    *(["--verbose"] if "stream-json" in self.section.args
                      and "--verbose" not in self.section.args else []),
                ],
                ctx,
            ),
        ]  # fmt: skip

    def stdin_for(self, ctx: StageContext) -> bytes | None:
        return ctx.prompt.encode() if self.section.stdin else None

    def reply(self, ctx: StageContext, result: ProcessResult) -> Reply:
        final = _claude_result(result.stdout)
        if final is None:
            return Reply(result.stdout)
        text = str(final.get("result") or "")
        usage = _dict(final.get("usage"))
        sent = sum(
            _int(usage.get(k))
            for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        cost = final.get("total_cost_usd")
        spent = priced_usage(
            self.section,
            sent,
            _int(usage.get("output_tokens")),
            float(cost) if isinstance(cost, int | float) else None,
        )
        if final.get("is_error"):
            error = AgentCrashed(
                f"claude reported an error ({final.get('subtype', 'error')}): {text[:300]}",
                retryable=True,
                output=result.stdout[-4000:],
            )
            error.usage = spent  # an error result was still paid for
            raise error
        return Reply(text, spent)


def _claude_result(stdout: str) -> dict[str, Any] | None:
    """The final ``type: result`` object (json: one object or a list; stream-json: lines)."""
    try:
        doc = json.loads(stdout)
    except ValueError:
        doc = None
    items = doc if isinstance(doc, list) else [doc] if doc is not None else []
    if not items:
        items = list(_lines_json(stdout))
    found = [i for i in items if isinstance(i, dict) and i.get("type") == "result"]
    return found[-1] if found else None


class CodexAgent(PresetAgent):
    """Codex: ``codex exec --json --sandbox …``, the prompt as an argument, stdin /dev/null."""

    executable = "codex"
    product = "Codex (npm i -g @openai/codex)"

    def build_argv(self, ctx: StageContext) -> list[str]:
        sandbox = "read-only" if self.read_only else "workspace-write"
        return [
            *self.fill(
                [
                    *self.head, "exec", "--json", "--sandbox", sandbox,
                    "-o", "{output_file}", *self.model_flag("-m"), *self.section.args,
                ],
                ctx,
            ),
            self.prompt_arg(ctx),
        ]  # fmt: skip

    def reply(self, ctx: StageContext, result: ProcessResult) -> Reply:
        message, failure, seen = "", "", False
        sent = received = 0
        for event in _lines_json(result.stdout):
            kind = event.get("type")
            item = _dict(event.get("item"))
            if kind == "item.completed" and item.get("type") == "agent_message":
                message = str(item.get("text") or "")
            elif kind == "turn.completed":
                counts = _dict(event.get("usage"))
                sent += _int(counts.get("input_tokens"))
                received += _int(counts.get("output_tokens"))
                seen = True
            elif kind in ("turn.failed", "error"):
                error = _dict(event.get("error"))
                failure = str(error.get("message") or event.get("message") or kind)
        if failure and not message:
            raise AgentCrashed(f"codex failed: {failure[:300]}", retryable=True)
        usage: Usage | None = priced_usage(self.section, sent, received, None) if seen else None
        return Reply(message or result.stdout, usage)


_AIDER_TOKENS = re.compile(
    r"Tokens:\s*(?P<sent>[\d.,]+[kKmM]?)\s+sent,(?:[^\n]*?,)?\s*"
    r"(?P<received>[\d.,]+[kKmM]?)\s+received\.(?:\s*Cost:\s*\$(?P<cost>[\d.,]+)\s+message)?"
)


def _count(text: str) -> int:
    text = text.replace(",", "")
    scale = {"k": 1e3, "m": 1e6}.get(text[-1:].lower(), 1.0)
    number = text[:-1] if scale != 1.0 else text
    try:
        return round(float(number) * scale)
    except ValueError:
        return 0


class AiderAgent(PresetAgent):
    """Aider: ``aider --message-file {prompt_file} --yes-always --no-auto-commits …``."""

    executable = "aider"
    product = "aider (pip install aider-chat)"

    def build_argv(self, ctx: StageContext) -> list[str]:
        read_only = ["--chat-mode", "ask", "--dry-run"] if self.read_only else []
        return self.fill(
            [
                *self.head, "--message-file", "{prompt_file}", "--yes-always",
                "--no-auto-commits", "--no-dirty-commits", "--no-stream", "--no-pretty",
                "--no-check-update", "--analytics-disable", *read_only,
                *self.model_flag(), *self.section.args,
            ],
            ctx,
        )  # fmt: skip

    def reply(self, ctx: StageContext, result: ProcessResult) -> Reply:
        sent = received = 0
        cost: float | None = None
        seen = False
        for m in _AIDER_TOKENS.finditer(result.stdout):
            seen = True
            sent += _count(m["sent"])
            received += _count(m["received"])
            if m["cost"]:
                cost = (cost or 0.0) + float(m["cost"].replace(",", ""))
        usage = priced_usage(self.section, sent, received, cost) if seen else None
        return Reply(result.stdout, usage)


class OpencodeAgent(PresetAgent):
    """opencode: ``opencode run --format json PROMPT`` (NDJSON events)."""

    executable = "opencode"
    product = "opencode (npm i -g opencode-ai)"

    def build_argv(self, ctx: StageContext) -> list[str]:
        agent = ["--agent", "plan"] if self.read_only else []
        return [
            *self.fill(
                [
                    *self.head, "run", "--format", "json", *agent,
                    *self.model_flag(), *self.section.args,
                ],
                ctx,
            ),
            self.prompt_arg(ctx),
        ]  # fmt: skip

    def reply(self, ctx: StageContext, result: ProcessResult) -> Reply:
        step: list[str] = []
        last: list[str] = []
        failure = ""
        sent = received = 0
        cost: float | None = None
        seen = False
        for event in _lines_json(result.stdout):
            kind = event.get("type")
            part = _dict(event.get("part"))
            if kind == "step_start":
                step = []
            elif kind == "text" and isinstance(part.get("text"), str):
                step.append(part["text"])
                last = step
            elif kind == "step_finish":
                tokens = _dict(part.get("tokens"))
                cache = _dict(tokens.get("cache"))
                sent += _int(tokens.get("input")) + _int(cache.get("read"))
                sent += _int(cache.get("write"))
                received += _int(tokens.get("output")) + _int(tokens.get("reasoning"))
                if isinstance(part.get("cost"), int | float):
                    cost = (cost or 0.0) + float(part["cost"])
                seen = True
            elif kind == "error":
                error = _dict(event.get("error")) or _dict(part.get("error"))
                failure = str(
                    error.get("message") or _dict(error.get("data")).get("message") or kind
                )
        if failure and not last:
            raise AgentCrashed(f"opencode failed: {failure[:300]}", retryable=True)
        usage = priced_usage(self.section, sent, received, cost) if seen else None
        return Reply("\n".join(last) if last else result.stdout, usage)


class GeminiAgent(PresetAgent):
    """Gemini CLI: ``gemini -p PROMPT --output-format json --approval-mode …``."""

    executable = "gemini"
    product = "Gemini CLI (npm i -g @google/gemini-cli)"

    def quiet(self) -> bool:
        return True  # --output-format json: one object at the very end

    def build_argv(self, ctx: StageContext) -> list[str]:
        mode = "default" if self.read_only else "auto_edit"
        return [
            *self.fill(self.head, ctx),
            "-p",
            self.prompt_arg(ctx),
            *self.fill(
                [
                    "--output-format", "json", "--approval-mode", mode,
                    *self.model_flag(), *self.section.args,
                ],
                ctx,
            ),
        ]  # fmt: skip

    def reply(self, ctx: StageContext, result: ProcessResult) -> Reply:
        doc = next(
            (o for o in json_objects(result.stdout) if "response" in o or "stats" in o), None
        )
        if doc is None:
            return Reply(result.stdout)
        error = _dict(doc.get("error"))
        if error and not doc.get("response"):
            raise AgentCrashed(f"gemini failed: {str(error.get('message'))[:300]}", retryable=True)
        sent = received = 0
        models = _dict(_dict(doc.get("stats")).get("models"))
        for stats in models.values():
            tokens = _dict(_dict(stats).get("tokens"))
            sent += _int(tokens.get("prompt"))
            received += _int(tokens.get("candidates")) + _int(tokens.get("thoughts"))
        usage: Usage | None = priced_usage(self.section, sent, received, None) if models else None
        return Reply(str(doc.get("response") or ""), usage)


class AgentFactory(Protocol):
    """Builds the agent of one ``[agents.STAGE]`` section."""

    def __call__(
        self, section: AgentSection, stage: Stage, *, environ: Mapping[str, str] | None = None
    ) -> Agent: ...


KINDS: dict[str, AgentFactory] = {
    "command": CommandAgent,
    "claude": ClaudeAgent,
    "codex": CodexAgent,
    "aider": AiderAgent,
    "opencode": OpencodeAgent,
    "gemini": GeminiAgent,
}
"""``kind`` → factory. Other modules register their kinds here (e.g. ``openai``, ``python``)."""


def build_agent(
    section: AgentSection, stage: Stage, *, environ: Mapping[str, str] | None = None
) -> Agent:
    """The agent for ``section.kind``; ValueError for a kind no factory is registered for."""
    factory = KINDS.get(section.kind)
    if factory is None:
        known = ", ".join(sorted(KINDS))
        raise ValueError(f"no agent for kind {section.kind!r} here (known: {known})")
    return factory(section, stage, environ=environ)

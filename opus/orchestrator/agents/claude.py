"""Claude Code (`claude -p`), measured against the real CLI 2.1.197 (README "Agent presets").

- Output: ``--output-format stream-json --verbose``, one JSON event a line, the last one the
  ``type: result`` object (``result``, ``is_error``, ``api_error_status``, ``usage``,
  ``total_cost_usd``). Every event but ``system/api_retry`` is progress, so a CLI retrying
  an unreachable model is stopped by the stall watch.
- Read-only stages: ``--tools Read,Grep,Glob`` (Write, Edit and Bash do not exist for the
  model: "No such tool available") under ``--permission-mode dontAsk``.
- The coder: ``acceptEdits`` plus an allowlist of shell commands (the tests, git's local
  commands), ``git push`` denied; anything else is refused by the CLI.
- Nothing from the person's setup: ``--setting-sources ""`` (no user/project settings, hooks
  or CLAUDE.md from HOME), ``--strict-mcp-config`` (no MCP servers),
  ``--no-session-persistence`` (no transcripts) — unless ``home = "real"``.
- ``CLAUDE_CODE_MAX_RETRIES=0``: the CLI retries every API error itself, 401 included, ten
  times with backoff; opus decides instead, from ``api_error_status``.
- ``base_url`` → ``ANTHROPIC_BASE_URL``, ``api_key_env`` → ``ANTHROPIC_API_KEY``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ..errors import AgentCrashed, AgentError
from ..models import Usage
from ..process_output import Counts, output_tail
from ..supervisor import ProcessResult
from .base import StageContext
from .command import Reply, priced_usage
from .preset import PresetAgent, dict_of, int_of, lines_json

READ_ONLY_TOOLS = "Read,Grep,Glob"
CODER_SHELL = (
    "Bash(python -m pytest:*)", "Bash(python3 -m pytest:*)", "Bash(pytest:*)",
    "Bash(git status:*)", "Bash(git diff:*)", "Bash(git log:*)", "Bash(git show:*)",
    "Bash(git add:*)", "Bash(git rm:*)", "Bash(git mv:*)", "Bash(git commit:*)",
)  # fmt: skip
"""Shell commands the coder may run without asking; extend with ``args = ["--allowedTools",
"Bash(npm test:*)"]``."""
DENIED = ("Bash(git push:*)",)
PERMANENT_STATUS = frozenset({400, 401, 403, 404, 413})
"""API statuses another attempt cannot fix: bad request, auth, permission, unknown model."""
PERMANENT_CODES = frozenset({"authentication_failed", "billing_error", "invalid_request"})
"""The ``error`` code of its synthetic assistant message that no retry fixes ("Not logged
in · Please run /login" is ``authentication_failed`` with no API status at all)."""
_USAGE = re.compile(r"error: (unknown option|option '|too many arguments|missing required)", re.I)
"""A line of its argument parser (commander) refusing the command line."""


class ClaudeAgent(PresetAgent):
    """Claude Code: ``claude -p --output-format stream-json``, the prompt on stdin."""

    executable = "claude"
    home_paths = (".claude", ".claude.json")
    product = "Claude Code"

    def endpoint(self, environ: Mapping[str, str]) -> dict[str, str]:
        env = {"ANTHROPIC_BASE_URL": self.section.base_url} if self.section.base_url else {}
        key = self.api_key(environ)
        if key is not None:
            env["ANTHROPIC_API_KEY"] = key
        return env

    def cli_env(self, ctx: StageContext) -> dict[str, str]:
        return {
            "CLAUDE_CODE_MAX_RETRIES": "0",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",  # no updater, telemetry, reports
            "DISABLE_AUTOUPDATER": "1",
        }

    def progress(self) -> Counts:
        return _counts

    def quiet(self) -> bool:
        """``args`` may choose ``--output-format json``: one object at the very end."""
        args = self.section.args
        return any(a == "--output-format" and args[i + 1 : i + 2] == ["json"]
                   for i, a in enumerate(args))  # fmt: skip

    def build_argv(self, ctx: StageContext) -> list[str]:
        prompt = [] if self.section.stdin else [self.prompt_arg(ctx)]
        if self.read_only:
            perms = ["--tools", READ_ONLY_TOOLS, "--permission-mode", "dontAsk",
                     "--allowedTools", READ_ONLY_TOOLS]  # fmt: skip
        else:
            perms = ["--permission-mode", "acceptEdits", "--allowedTools", *CODER_SHELL]
        private = [] if self.section.home == "real" else [
            "--setting-sources", "", "--strict-mcp-config", "--no-session-persistence",
        ]  # fmt: skip
        return [
            *self.fill(self.head, ctx),
            "-p",
            *prompt,
            *self.fill(
                [
                    "--output-format", "stream-json", "--verbose", *perms,
                    "--disallowedTools", *DENIED, *private,
                    *self.model_flag(), *self.section.args,
                ],
                ctx,
            ),
        ]  # fmt: skip

    def stdin_for(self, ctx: StageContext) -> bytes | None:
        return ctx.prompt.encode() if self.section.stdin else None

    def cli_error(self, ctx: StageContext, result: ProcessResult) -> AgentError | None:
        final = _claude_result(result.stdout)
        if final is None and result.returncode != 0:
            refused = next((ln for ln in result.stderr.splitlines() if _USAGE.match(ln)), None)
            if refused is not None:  # its argument parser: every attempt would say the same
                return AgentCrashed(
                    f"claude refused its arguments: {refused.strip()[:300]}; "
                    f"check [agents.{self.stage}] args",
                    retryable=False,
                    output=output_tail(result.stdout, result.stderr),
                )
        if final is None or not final.get("is_error"):
            return None
        status = final.get("api_error_status")
        codes = {e.get("error") for e in lines_json(result.stdout) if e.get("type") == "assistant"}
        permanent = (isinstance(status, int) and status in PERMANENT_STATUS) or bool(
            codes & PERMANENT_CODES
        )
        said = str(final.get("result") or final.get("subtype") or "error").strip()
        error = AgentCrashed(
            f"claude: {said[:500]}",
            retryable=not permanent,
            output=output_tail(result.stdout, result.stderr),
        )
        error.usage = self._usage(final)  # an error result was still paid for
        return error

    def reply(self, ctx: StageContext, result: ProcessResult) -> Reply:
        final = _claude_result(result.stdout)
        if final is None:
            return self.answer("", None, result)
        return self.answer(str(final.get("result") or ""), self._usage(final), result)

    def _usage(self, final: dict[str, Any]) -> Usage:
        usage = dict_of(final.get("usage"))
        sent = sum(
            int_of(usage.get(k))
            for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        cost = final.get("total_cost_usd")
        return priced_usage(
            self.section,
            sent,
            int_of(usage.get("output_tokens")),
            float(cost) if isinstance(cost, int | float) else None,
        )


def _counts(tag: str, line: str) -> bool:
    """Progress: any output but the CLI's own retry notices (``system/api_retry``)."""
    if '"api_retry"' not in line:
        return bool(line.strip())
    try:
        event = json.loads(line)
    except ValueError:
        return True
    return not (isinstance(event, dict) and event.get("subtype") == "api_retry")


def _claude_result(stdout: str) -> dict[str, Any] | None:
    """The final ``type: result`` object (json: one object or a list; stream-json: lines)."""
    try:
        doc = json.loads(stdout)
    except ValueError:
        doc = None
    items = doc if isinstance(doc, list) else [doc] if doc is not None else []
    if not items:
        items = list(lines_json(stdout))
    found = [i for i in items if isinstance(i, dict) and i.get("type") == "result"]
    return found[-1] if found else None

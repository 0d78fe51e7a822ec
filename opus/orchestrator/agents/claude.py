"""Claude Code (`claude -p`)."""

from __future__ import annotations

import json
from typing import Any

from ..errors import AgentCrashed
from ..supervisor import ProcessResult
from .base import StageContext
from .command import Reply, priced_usage
from .preset import PresetAgent, dict_of, int_of, lines_json


class ClaudeAgent(PresetAgent):
    """Claude Code: ``claude -p --output-format json``, the prompt on stdin."""

    executable = "claude"
    home_paths = (".claude", ".claude.json")
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
        usage = dict_of(final.get("usage"))
        sent = sum(
            int_of(usage.get(k))
            for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        cost = final.get("total_cost_usd")
        spent = priced_usage(
            self.section,
            sent,
            int_of(usage.get("output_tokens")),
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
        items = list(lines_json(stdout))
    found = [i for i in items if isinstance(i, dict) and i.get("type") == "result"]
    return found[-1] if found else None

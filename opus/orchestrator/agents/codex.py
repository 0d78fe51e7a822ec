"""Codex (`codex exec`)."""

from __future__ import annotations

from ..errors import AgentCrashed
from ..models import Usage
from ..supervisor import ProcessResult
from .base import StageContext
from .command import Reply, priced_usage
from .preset import PresetAgent, dict_of, int_of, lines_json


class CodexAgent(PresetAgent):
    """Codex: ``codex exec --json --sandbox …``, the prompt as an argument, stdin /dev/null."""

    executable = "codex"
    home_paths = (".codex",)
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
        for event in lines_json(result.stdout):
            kind = event.get("type")
            item = dict_of(event.get("item"))
            if kind == "item.completed" and item.get("type") == "agent_message":
                message = str(item.get("text") or "")
            elif kind == "turn.completed":
                counts = dict_of(event.get("usage"))
                sent += int_of(counts.get("input_tokens"))
                received += int_of(counts.get("output_tokens"))
                seen = True
            elif kind in ("turn.failed", "error"):
                error = dict_of(event.get("error"))
                failure = str(error.get("message") or event.get("message") or kind)
        if failure and not message:
            raise AgentCrashed(f"codex failed: {failure[:300]}", retryable=True)
        usage: Usage | None = priced_usage(self.section, sent, received, None) if seen else None
        return self.answer(message, usage, result)

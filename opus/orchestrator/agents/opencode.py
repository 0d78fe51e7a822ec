"""opencode (`opencode run`)."""

from __future__ import annotations

from ..errors import AgentCrashed
from ..supervisor import ProcessResult
from .base import StageContext
from .command import Reply, priced_usage
from .preset import PresetAgent, dict_of, int_of, lines_json


class OpencodeAgent(PresetAgent):
    """opencode: ``opencode run --format json PROMPT`` (NDJSON events)."""

    executable = "opencode"
    home_paths = (".config/opencode", ".local/share/opencode")
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
        for event in lines_json(result.stdout):
            kind = event.get("type")
            part = dict_of(event.get("part"))
            if kind == "step_start":
                step = []
            elif kind == "text" and isinstance(part.get("text"), str):
                step.append(part["text"])
                last = step
            elif kind == "step_finish":
                tokens = dict_of(part.get("tokens"))
                cache = dict_of(tokens.get("cache"))
                sent += int_of(tokens.get("input")) + int_of(cache.get("read"))
                sent += int_of(cache.get("write"))
                received += int_of(tokens.get("output")) + int_of(tokens.get("reasoning"))
                if isinstance(part.get("cost"), int | float):
                    cost = (cost or 0.0) + float(part["cost"])
                seen = True
            elif kind == "error":
                error = dict_of(event.get("error")) or dict_of(part.get("error"))
                failure = str(
                    error.get("message") or dict_of(error.get("data")).get("message") or kind
                )
        if failure and not last:
            raise AgentCrashed(f"opencode failed: {failure[:300]}", retryable=True)
        usage = priced_usage(self.section, sent, received, cost) if seen else None
        return self.answer("\n".join(last), usage, result)

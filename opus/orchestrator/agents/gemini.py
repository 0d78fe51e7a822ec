"""Gemini CLI (`gemini -p`)."""

from __future__ import annotations

from ..errors import AgentCrashed
from ..models import Usage
from ..supervisor import ProcessResult
from .base import StageContext
from .command import Reply, json_objects, priced_usage
from .preset import PresetAgent, dict_of, int_of


class GeminiAgent(PresetAgent):
    """Gemini CLI: ``gemini -p PROMPT --output-format json --approval-mode …``."""

    executable = "gemini"
    home_paths = (".gemini",)
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
            return self.answer("", None, result)
        error = dict_of(doc.get("error"))
        if error and not doc.get("response"):
            raise AgentCrashed(f"gemini failed: {str(error.get('message'))[:300]}", retryable=True)
        sent = received = 0
        models = dict_of(dict_of(doc.get("stats")).get("models"))
        for stats in models.values():
            tokens = dict_of(dict_of(stats).get("tokens"))
            sent += int_of(tokens.get("prompt"))
            received += int_of(tokens.get("candidates")) + int_of(tokens.get("thoughts"))
        usage: Usage | None = priced_usage(self.section, sent, received, None) if models else None
        return self.answer(str(doc.get("response") or ""), usage, result)

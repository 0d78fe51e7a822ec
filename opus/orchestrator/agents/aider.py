"""aider (`aider --message-file`)."""

from __future__ import annotations

import re

from ..supervisor import ProcessResult
from .base import StageContext
from .command import Reply, priced_usage
from .preset import PresetAgent

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
    home_paths = (".aider.conf.yml", ".aider.model.settings.yml", ".aider.model.metadata.json")
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

"""The agent kinds that are commands: ``command`` and the CLI presets, one module each."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from ..config import AgentSection
from ..lifecycle import Stage
from .aider import AiderAgent
from .base import Agent
from .claude import ClaudeAgent
from .codex import CodexAgent
from .command import CommandAgent
from .gemini import GeminiAgent
from .opencode import OpencodeAgent
from .preset import PresetAgent

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

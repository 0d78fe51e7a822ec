"""Agents: one per stage, built from ``[agents.STAGE]`` or passed in code."""

from __future__ import annotations

from collections.abc import Mapping

from ..config import AgentSection, Config
from ..lifecycle import Stage
from .base import Agent, StageContext, StageResult
from .fake import ScriptedAgent

__all__ = ("Agent", "ScriptedAgent", "StageContext", "StageResult", "build_agent", "build_agents")

PIPELINE_STAGES = (Stage.PLANNER, Stage.CODER, Stage.TESTER, Stage.REVIEWER)


def build_agent(
    section: AgentSection, stage: Stage, *, environ: Mapping[str, str] | None = None
) -> Agent:
    """The agent a config section describes (imports the backend it needs, lazily)."""
    if section.kind == "openai":
        from .openai import OpenAIAgent

        return OpenAIAgent(section, stage, environ=environ)
    if section.kind == "python":
        from .python import PythonAgent

        return PythonAgent(section, stage)
    from .presets import build_agent as build_command_agent

    return build_command_agent(section, stage, environ=environ)


def build_agents(
    config: Config,
    overrides: Mapping[str, Agent] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> dict[Stage, Agent]:
    """One agent per pipeline stage; ``overrides`` (by stage name) win over the config."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - {s.value for s in PIPELINE_STAGES}
    if unknown:
        raise ValueError(f"no such stage: {', '.join(sorted(unknown))}")
    agents: dict[Stage, Agent] = {}
    for stage in PIPELINE_STAGES:
        given = overrides.get(stage.value)
        if given is not None and not isinstance(given, Agent):
            from .python import CallableAgent

            given = CallableAgent(given)
        agents[stage] = given or build_agent(config.agents.for_stage(stage), stage, environ=environ)
    return agents

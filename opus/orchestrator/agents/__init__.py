"""Agents: one per stage, built from ``[agents.STAGE]`` or passed in code."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..config import AgentSection, Config
from ..lifecycle import Stage
from .base import Agent, StageContext, StageResult
from .fake import ScriptedAgent

__all__ = ("Agent", "ScriptedAgent", "StageContext", "StageResult", "build_agent", "build_agents")

PIPELINE_STAGES = (Stage.PLANNER, Stage.CODER, Stage.TESTER, Stage.REVIEWER)


def build_agent(
    section: AgentSection,
    stage: Stage,
    *,
    environ: Mapping[str, str] | None = None,
    retries: int = 2,
) -> Agent:
    """The agent a config section describes (imports the backend it needs, lazily)."""
    if section.kind == "openai":
        from .openai import OpenAIAgent

        # it retries HTTP itself (honouring Retry-After), as often as [pipeline] retries says
        return OpenAIAgent(section, stage, environ=environ, tries=retries + 1)
    if section.kind == "python":
        from .python import PythonAgent

        return PythonAgent(section, stage)
    from .presets import build_agent as build_command_agent

    return build_command_agent(section, stage, environ=environ)


AgentLike = Agent | Callable[[StageContext], Any]
"""An agent, or a plain (sync or async) function taking the stage context."""


def build_agents(
    config: Config,
    overrides: Mapping[str, AgentLike] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> dict[Stage, Agent]:
    """One agent per pipeline stage; ``overrides`` (by stage name) win over the config."""
    given = dict(overrides or {})
    unknown = set(given) - {s.value for s in PIPELINE_STAGES}
    if unknown:
        raise ValueError(f"no such stage: {', '.join(sorted(unknown))}")
    agents: dict[Stage, Agent] = {}
    for stage in PIPELINE_STAGES:
        agent = given.get(stage.value)
        if agent is None:
            agents[stage] = build_agent(
                config.agents.for_stage(stage),
                stage,
                environ=environ,
                retries=config.pipeline.retries,
            )
        elif isinstance(agent, Agent):
            agents[stage] = agent
        else:
            from .python import CallableAgent

            agents[stage] = CallableAgent(agent)
    return agents

"""opus.orchestrator — the library core. Importing it starts nothing and does no I/O.

from opus.orchestrator import Orchestrator, load_config

config = load_config("vault/opus.toml")
async with Orchestrator(config) as orch:
    await orch.run_once()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agents import build_agent, build_agents
    from .agents.base import Agent, StageContext, StageResult
    from .agents.fake import ScriptedAgent
    from .config import Config, load_config
    from .errors import (
        AgentError,
        AgentNotFound,
        AgentOutputError,
        AgentStalled,
        AgentTimeout,
        ConfigError,
        LockHeld,
        MergeConflict,
        NoteError,
        OpusError,
        WorkspaceError,
    )
    from .lifecycle import Outcome, Stage, Status
    from .models import Checkpoint, FeatureRequest, Feedback, Issue, Job, Priority, Usage, Verdict
    from .service import Orchestrator, Summary, serve

__all__ = (
    "Agent",
    "AgentError",
    "AgentNotFound",
    "AgentOutputError",
    "AgentStalled",
    "AgentTimeout",
    "Checkpoint",
    "Config",
    "ConfigError",
    "FeatureRequest",
    "Feedback",
    "Issue",
    "Job",
    "LockHeld",
    "MergeConflict",
    "NoteError",
    "OpusError",
    "Orchestrator",
    "Outcome",
    "Priority",
    "ScriptedAgent",
    "Stage",
    "StageContext",
    "StageResult",
    "Status",
    "Summary",
    "Usage",
    "Verdict",
    "WorkspaceError",
    "build_agent",
    "build_agents",
    "load_config",
    "serve",
)

_WHERE = {
    "build_agent": ".agents",
    "build_agents": ".agents",
    "Agent": ".agents.base",
    "StageContext": ".agents.base",
    "StageResult": ".agents.base",
    "ScriptedAgent": ".agents.fake",
    "Config": ".config",
    "load_config": ".config",
    "AgentError": ".errors",
    "AgentNotFound": ".errors",
    "AgentOutputError": ".errors",
    "AgentStalled": ".errors",
    "AgentTimeout": ".errors",
    "ConfigError": ".errors",
    "LockHeld": ".errors",
    "MergeConflict": ".errors",
    "NoteError": ".errors",
    "OpusError": ".errors",
    "WorkspaceError": ".errors",
    "Outcome": ".lifecycle",
    "Stage": ".lifecycle",
    "Status": ".lifecycle",
    "Checkpoint": ".models",
    "FeatureRequest": ".models",
    "Feedback": ".models",
    "Issue": ".models",
    "Job": ".models",
    "Priority": ".models",
    "Usage": ".models",
    "Verdict": ".models",
    "Orchestrator": ".service",
    "Summary": ".service",
    "serve": ".service",
}
"""Each public name's module: imported on first use, so ``import opus.orchestrator`` (and
``opus status``) does not load the agents, httpx or the service."""


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

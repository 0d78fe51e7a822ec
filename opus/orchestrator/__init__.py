"""opus.orchestrator — the library core. Importing it starts nothing and does no I/O.

from opus.orchestrator import Orchestrator, load_config

config = load_config("vault/opus.toml")
async with Orchestrator(config) as orch:
    await orch.run_once()
"""

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

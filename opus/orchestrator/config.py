"""``opus.toml``: one typed, frozen settings object with one parser (SPEC §6)."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .lifecycle import Stage
from .models import Priority

Event = Literal[
    "review", "plan-review", "done", "failed", "blocked", "recovered", "stuck", "budget"
]
ALL_EVENTS: tuple[Event, ...] = (
    "review",
    "plan-review",
    "done",
    "failed",
    "blocked",
    "recovered",
    "stuck",
    "budget",
)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


PositiveFloat = Annotated[float, Field(gt=0)]


class VaultSection(_Section):
    planned: str = "10_features/03_planned"
    dashboard: str = "00_system/opus-dashboard.md"
    plans: str = "10_features/05_plans"
    """Folder of plan notes (SPEC §16); "" turns plan notes off."""

    @model_validator(mode="after")
    def _plans_apart(self) -> VaultSection:
        # a plan note in the planned folder would be an FR: each plan a new pipeline
        plans, planned = PurePosixPath(self.plans), PurePosixPath(self.planned)
        if self.plans and (plans == planned or planned in plans.parents):
            raise ValueError("plans: must be a folder outside the planned folder")
        return self


class StateSection(_Section):
    dir: str = ".opus"
    keep_days: int = Field(default=30, ge=0)


class RepoSection(_Section):
    path: Path
    base: str = "main"
    branch_prefix: str = "opus/"

    @field_validator("branch_prefix")
    @classmethod
    def _a_ref_prefix(cls, value: str) -> str:
        problem = _ref_problem(value + "x")
        if problem:
            raise ValueError(f"{value!r} does not start a git branch name: {problem}")
        return value


def _ref_problem(name: str) -> str | None:
    """Why ``name`` is not a branch name git takes (``git check-ref-format --branch``)."""
    if any(c in name for c in " ~^:?*[\\") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "no spaces, control characters or any of ~ ^ : ? * [ \\"
    if ".." in name or "@{" in name or "//" in name:
        return "no '..', '@{' or '//'"
    if name.startswith(("-", "/")):
        return "it cannot start with '-' or '/'"
    if any(part.startswith(".") or part.endswith(".lock") for part in name.split("/")):
        return "no part may start with '.' or end with '.lock'"
    return None


class PollingSection(_Section):
    watch: bool = True
    active: PositiveFloat = 30
    idle_max: PositiveFloat = 300
    backoff: float = Field(default=2.0, ge=1.0)
    debounce_ms: int = Field(default=250, ge=0)


class PipelineSection(_Section):
    max_iterations: int = Field(default=3, ge=1)
    concurrency: int = Field(default=3, ge=1)
    stage_timeout: PositiveFloat = 1800
    stall_timeout: PositiveFloat = 600
    retries: int = Field(default=2, ge=0)
    preempt: bool = True


_PROCESS = frozenset(
    {"command", "args", "env", "env_passthrough", "network", "home", "price_in_per_mtok",
     "price_out_per_mtok"}
)  # fmt: skip
_CLI = _PROCESS | {"model", "base_url", "api_key_env"}  # the preset says how, or refuses
_HTTP = frozenset(
    {"model", "base_url", "api_key_env", "temperature", "max_tokens", "price_in_per_mtok",
     "price_out_per_mtok"}
)  # fmt: skip
AGENT_KEYS: dict[str, frozenset[str]] = {
    kind: frozenset({"kind", "timeout"}) | keys
    for kind, keys in {
        "command": _PROCESS | {"stdin"},
        "claude": _CLI | {"stdin"},
        "codex": _CLI,
        "gemini": _CLI,
        "opencode": _CLI,
        "aider": _CLI | {"max_tokens"},
        "openai": _HTTP,
        "python": frozenset({"callable"}),
    }.items()
}
"""The keys each agent kind uses (SPEC §14): any other key set for it is an error, never
silently ignored (``stdin`` on a CLI that always takes its prompt one way, ``temperature``
on a CLI without such a flag, ``env`` on an HTTP or Python agent, …)."""


class AgentSection(_Section):
    kind: Literal["command", "claude", "codex", "aider", "opencode", "gemini", "openai", "python"]
    command: str | list[str] | None = None
    args: list[str] = Field(default_factory=list)
    stdin: bool = True
    env: dict[str, str] = Field(default_factory=dict)
    env_passthrough: list[str] = Field(default_factory=list)
    timeout: PositiveFloat | None = None
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    temperature: float | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    price_in_per_mtok: float | None = Field(default=None, ge=0)
    price_out_per_mtok: float | None = Field(default=None, ge=0)
    callable: str | None = None
    network: bool = True
    """False: the sandbox gives the agent loopback only (SPEC §17)."""
    home: Literal["private", "real"] = "private"
    """"real": the agent sees the real HOME (opts out of the sandbox's private HOME)."""

    @model_validator(mode="after")
    def _needs(self) -> AgentSection:
        unused = sorted(self.model_fields_set - AGENT_KEYS[self.kind])
        if unused:
            keys = ", ".join(f"`{k}`" for k in unused)
            raise ValueError(f"kind = {self.kind!r} does not use {keys}")
        if self.kind == "command" and not self.command:
            raise ValueError("kind = 'command' needs `command`")
        if self.kind == "python" and not self.callable:
            raise ValueError("kind = 'python' needs `callable` ('package.module:function')")
        if self.kind == "python" and self.callable and ":" not in self.callable:
            raise ValueError("`callable` must look like 'package.module:function'")
        if self.kind == "openai" and not self.model:
            raise ValueError("kind = 'openai' needs `model`")
        return self


class AgentsSection(_Section):
    planner: AgentSection = AgentSection(kind="claude")
    coder: AgentSection = AgentSection(kind="claude")
    tester: AgentSection = AgentSection(kind="command", command="python -m pytest -q")
    reviewer: AgentSection = AgentSection(kind="claude")

    ideator: AgentSection | None = None
    """The ideation agent (SPEC §19); any kind, run read-only."""

    def for_stage(self, stage: Stage) -> AgentSection:
        section: AgentSection = getattr(self, stage.value)
        return section


class ApprovalSection(_Section):
    mode: Literal["manual", "auto"] = "manual"
    auto_priorities: list[Priority] = Field(default_factory=list)
    min_confidence: int = Field(default=90, ge=0, le=100)
    plan: bool = False
    """True: stop after the planner at `plan-review` (SPEC §16)."""

    @field_validator("auto_priorities", mode="before")
    @classmethod
    def _priorities(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [Priority.parse(v) for v in value]
        return value


class DeliverySection(_Section):
    kind: Literal["local", "github"] = "local"
    repository: str | None = None
    remote: str = "origin"
    token_env: str = "GITHUB_TOKEN"
    api_url: str = "https://api.github.com"

    @model_validator(mode="after")
    def _needs(self) -> DeliverySection:
        if self.kind == "github" and (not self.repository or "/" not in self.repository):
            raise ValueError("kind = 'github' needs `repository = \"owner/name\"`")
        return self


class NotifySection(_Section):
    kind: Literal["log", "desktop", "webhook", "command", "apprise"] = "log"
    events: list[Event] = Field(default_factory=lambda: list(ALL_EVENTS))
    url: str | None = None
    url_env: str | None = None
    """The name of an environment variable holding the URL (webhook, apprise): a secret."""
    headers: dict[str, str] = Field(default_factory=dict)
    headers_env: dict[str, str] = Field(default_factory=dict)
    """Header name → the name of an environment variable holding its value."""
    format: Literal["json", "slack", "ntfy"] = "json"
    command: str | list[str] | None = None
    timeout: PositiveFloat = 10

    @model_validator(mode="after")
    def _needs(self) -> NotifySection:
        if self.kind == "webhook" and not (self.url or self.url_env):
            raise ValueError("kind = 'webhook' needs `url` or `url_env`")
        if self.kind == "apprise" and not (self.url or self.url_env):
            raise ValueError("kind = 'apprise' needs `url_env` (or `url`)")
        if self.kind == "command" and not self.command:
            raise ValueError("kind = 'command' needs `command`")
        return self


class BudgetSection(_Section):
    daily_usd: float = Field(default=0, ge=0)
    monthly_usd: float = Field(default=0, ge=0)
    alert_at: list[Annotated[float, Field(gt=0, le=100)]] = Field(
        default_factory=lambda: [50.0, 75.0, 90.0]
    )
    """Shares (percent) of a cap whose first crossing sends a `budget` notification."""


class SandboxSection(_Section):
    """SPEC §17."""

    kind: Literal["auto", "bwrap", "none"] = "auto"
    paths: list[str] = Field(default_factory=list)
    """Folders made writable inside every sandbox."""
    home_binds: list[str] = Field(default_factory=list)
    """Paths of the real HOME (``~/…`` or relative to it) bound into the private HOME."""
    memory_max: str | None = None
    """cgroup v2 ``memory.max`` per stage, e.g. "4G"."""

    @field_validator("memory_max")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9]+[KMGT]?", value):
            raise ValueError("`memory_max` must look like 512M, 4G or a number of bytes")
        return value


class ReactionsSection(_Section):
    """SPEC §15."""

    github: bool = False
    ci: bool = False
    max_rounds: int = Field(default=3, ge=1)
    update: Literal["merge", "rebase"] = "merge"


ExecutorStage = Literal["planner", "coder", "tester", "reviewer"]
_REMOTE_STAGES: list[ExecutorStage] = ["coder", "tester"]


class ExecutorSection(_Section):
    """SPEC §18."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = None
    token_env: str | None = None
    stages: list[ExecutorStage] = Field(default_factory=lambda: _REMOTE_STAGES.copy())
    schedule_timeout: PositiveFloat = 600
    setup: str = ""
    resources: dict[ExecutorStage, dict[str, float]] = Field(
        default_factory=lambda: {s: {"agent": 1.0} for s in _REMOTE_STAGES}
    )

    @model_validator(mode="after")
    def _needs(self) -> ExecutorSection:
        if self.kind == "ray" and not self.token_env:
            raise ValueError("kind = 'ray' needs `token_env` (the cluster must use token auth)")
        return self


IDEATION_CATEGORIES: tuple[str, ...] = (
    "optimization",
    "innovation",
    "architecture",
    "front end",
    "back end",
    "security",
    "testing",
    "documentation",
    "technical debt",
    "developer experience",
    "observability",
    "devops",
    "accessibility",
    "dependencies",
    "data management",
    "internationalization",
    "error handling",
    "code quality",
    "compliance",
    "scalability",
    "API evolution",
)


class IdeationSection(_Section):
    """SPEC §19."""

    enabled: bool = False
    interval: PositiveFloat = 3600
    categories: list[str] = Field(default_factory=lambda: list(IDEATION_CATEGORIES), min_length=1)
    folder: str = "10_features/01_ideas"
    max_open: int = Field(default=5, ge=1)


class ServiceSection(_Section):
    shutdown_grace: float = Field(default=60, ge=0)


class Config(_Section):
    """The whole of ``opus.toml``. ``source`` is the file; paths resolve against its folder."""

    source: Path
    vault: VaultSection = VaultSection()
    state: StateSection = StateSection()
    repos: dict[str, RepoSection]
    polling: PollingSection = PollingSection()
    pipeline: PipelineSection = PipelineSection()
    agents: AgentsSection = AgentsSection()
    approval: ApprovalSection = ApprovalSection()
    delivery: DeliverySection = DeliverySection()
    notify: list[NotifySection] = Field(default_factory=lambda: [NotifySection()])
    budget: BudgetSection = BudgetSection()
    service: ServiceSection = ServiceSection()
    sandbox: SandboxSection = SandboxSection()
    reactions: ReactionsSection = ReactionsSection()
    executor: ExecutorSection = ExecutorSection()
    ideation: IdeationSection = IdeationSection()

    @field_validator("repos")
    @classmethod
    def _one_repo(cls, value: dict[str, RepoSection]) -> dict[str, RepoSection]:
        if not value:
            raise ValueError("at least one [repos.NAME] table with a `path` is required")
        return value

    @property
    def root(self) -> Path:
        """The vault: the folder holding the config file."""
        return self.source.parent

    def resolve(self, path: str | Path) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.root / p)

    @property
    def planned_dir(self) -> Path:
        return self.resolve(self.vault.planned)

    @property
    def state_dir(self) -> Path:
        return self.resolve(self.state.dir)

    @property
    def dashboard_path(self) -> Path | None:
        return self.resolve(self.vault.dashboard) if self.vault.dashboard else None

    @property
    def plans_dir(self) -> Path | None:
        return self.resolve(self.vault.plans) if self.vault.plans else None

    @property
    def ideas_dir(self) -> Path:
        return self.resolve(self.ideation.folder)

    @property
    def default_repo(self) -> str:
        return next(iter(self.repos))

    def repo_path(self, name: str) -> Path:
        return self.resolve(self.repos[name].path).resolve()

    def agent_sections(self) -> list[AgentSection]:
        """Every configured agent: the four stages' and the ideator's."""
        sections = [self.agents.for_stage(s) for s in Stage if s is not Stage.DELIVERY]
        return sections + ([self.agents.ideator] if self.agents.ideator else [])

    def secret_env_names(self) -> list[str]:
        """Every environment variable a ``*_env`` key names, and every name an agent's
        ``env_passthrough`` lists that looks like a credential (their values are secrets)."""
        names = [self.delivery.token_env] if self.delivery.kind == "github" else []
        if self.executor.kind == "ray" and self.executor.token_env:
            names.append(self.executor.token_env)
        for notifier in self.notify:
            names += [notifier.url_env] if notifier.url_env else []
            names += list(notifier.headers_env.values())
        for section in self.agent_sections():
            if section.api_key_env:
                names.append(section.api_key_env)
            names += [n for n in section.env_passthrough if _SECRET_NAME.search(n)]
        return names

    def secrets(self, environ: Mapping[str, str] | None = None) -> list[str]:
        """The secret values to redact: of those variables, and of credential-looking keys
        of the agents' ``env`` tables."""
        env = os.environ if environ is None else environ
        values = [env[n] for n in self.secret_env_names() if env.get(n)]
        for section in self.agent_sections():
            values += [v for k, v in section.env.items() if _SECRET_NAME.search(k) and v]
        return values


_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)


def default_config_path() -> Path:
    """``./opus.toml`` if it exists, else ``$OPUS_CONFIG``, else ``./opus.toml``."""
    local = Path("opus.toml")
    if local.exists():
        return local
    env = os.environ.get("OPUS_CONFIG")
    return Path(env) if env else local


def parse_config(data: dict[str, Any], source: Path) -> Config:
    """Validate a parsed TOML document. Problems raise one ConfigError naming the file; its
    ``problems`` lists each one (``[key] message``), in the file's order."""
    try:
        return Config.model_validate({**data, "source": source})
    except ValidationError as e:
        problems: list[tuple[str | None, str]] = []
        for err in e.errors():
            key = ".".join(str(part) for part in err["loc"]) or None
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            elif err["type"] == "missing":
                message = "missing required value"
            if (key, message) not in problems:
                problems.append((key, message))
        key, message = problems[0]
        raise ConfigError(
            message,
            key=key,
            file=source,
            problems=[f"[{k}] {m}" if k else m for k, m in problems],
        ) from e


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate ``opus.toml``. Raises ConfigError naming the key and the file."""
    source = Path(path) if path is not None else default_config_path()
    source = source.expanduser().absolute()
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError("config file not found", file=source) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config: {e}", file=source) from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}", file=source) from e
    return parse_config(data, source)

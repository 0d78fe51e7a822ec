"""What ``opus validate`` and ``opus run`` check before anything is touched (SPEC §9).

Each function returns problems as lines ``<file>: [<key>] <problem>``; none raises.
``repo_problems`` are configuration errors (``opus run`` refuses to start on one); the
others are problems the service survives (it logs them at start, ``validate`` lists them).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

from .config import AgentSection, Config, NotifySection
from .errors import AgentError, ConfigError, WorkspaceError
from .lifecycle import Stage

__all__ = ("agent_problems", "notifier_problems", "repo_problems", "split_argv")


def split_argv(command: str | list[str] | None) -> list[str]:
    import shlex

    return shlex.split(command) if isinstance(command, str) else list(command or [])


def repo_problems(config: Config) -> list[str]:
    """Each ``[repos.NAME]`` that is not a git repository or lacks its base branch."""
    from .workspace import Workspace

    problems = []
    for name, repo in config.repos.items():
        try:
            Workspace(
                config.repo_path(name), base=repo.base, worktrees_dir=config.state_dir / "worktrees"
            ).check()
        except WorkspaceError as e:
            key = "base" if "base branch" in str(e) else "path"
            problems.append(f"{config.source}: [repos.{name}.{key}] {e}")
    return problems


def agent_problems(config: Config, environ: Mapping[str, str] | None = None) -> list[str]:
    """An agent program missing from PATH, an ``api_key_env`` that is not set."""
    env = os.environ if environ is None else environ
    problems: list[str] = []
    sections = [(s.value, config.agents.for_stage(s)) for s in Stage if s is not Stage.DELIVERY]
    if config.agents.ideator is not None:
        sections.append(("ideator", config.agents.ideator))
    for name, section in sections:
        if section.kind == "python" and section.callable:
            from .agents.python import load_callable

            try:  # what the stage will import: a typo or a missing module shows now
                load_callable(section.callable, Stage(name) if name != "ideator" else None)
            except AgentError as e:
                problems.append(f"{config.source}: [agents.{name}.callable] {e}")
        if section.kind in ("openai", "python"):
            if section.api_key_env and not env.get(section.api_key_env):
                problems.append(
                    f"{config.source}: [agents.{name}.api_key_env] "
                    f"${section.api_key_env} is not set"
                )
            continue
        argv = split_argv(section.command) or [section.kind]
        if shutil.which(argv[0], path=env.get("PATH")) is None:
            problems.append(f"{config.source}: [agents.{name}] `{argv[0]}` not found on PATH")
        if section.kind != "command":
            problems += [f"{config.source}: {p}" for p in _preset_problems(section, name, env)]
    if config.delivery.kind == "github" and not env.get(config.delivery.token_env):
        problems.append(
            f"{config.source}: [delivery.token_env] ${config.delivery.token_env} is not set"
        )
    if config.delivery.kind == "github":
        from .workspace import Workspace

        remote = config.delivery.remote
        for name, repo in config.repos.items():
            path = config.repo_path(name)
            try:
                url = Workspace(path, base=repo.base, worktrees_dir=path).remote_url(remote)
            except WorkspaceError:
                continue  # (not a repository: repo_problems says so)
            if url is None:
                problems.append(
                    f"{config.source}: [delivery.remote] no remote {remote!r} in {path} "
                    "(`git remote -v` lists them)"
                )
    return problems


def _preset_problems(section: AgentSection, name: str, env: Mapping[str, str]) -> list[str]:
    """What a preset refuses when it is built (a ``base_url`` / ``api_key_env`` it cannot
    map, a key variable that is not set): ``opus run`` stops on it, so ``validate`` says it."""
    from .agents.presets import build_agent

    stage = Stage(name) if name in {s.value for s in Stage} else Stage.PLANNER
    try:
        build_agent(section, stage, environ=env)
    except ConfigError as e:
        return [str(e)]
    return []


def notifier_problem(section: NotifySection, environ: Mapping[str, str]) -> str | None:
    """Why one notifier cannot deliver, or None."""
    if section.kind == "desktop" and shutil.which("notify-send", path=environ.get("PATH")) is None:
        return "`notify-send` not found on PATH (install libnotify-bin), so nothing is shown"
    if section.kind == "command":
        argv = split_argv(section.command)
        if argv and shutil.which(argv[0], path=environ.get("PATH")) is None:
            return f"`{argv[0]}` not found on PATH"
    if section.url_env and not environ.get(section.url_env):
        return f"url_env: ${section.url_env} is not set"
    for header, name in section.headers_env.items():
        if not environ.get(name):
            return f"headers_env.{header}: ${name} is not set"
    if section.kind == "apprise":
        try:
            import importlib.util

            if importlib.util.find_spec("apprise") is None:
                return "the `apprise` package is not installed"
        except ValueError:  # pragma: no cover (a broken module spec)
            return "the `apprise` package cannot be imported"
    return None


def notifier_problems(config: Config, environ: Mapping[str, str] | None = None) -> list[str]:
    """Each ``[[notify]]`` whose tool, package or environment variable is missing."""
    env = os.environ if environ is None else environ
    problems = []
    for i, section in enumerate(config.notify):
        problem = notifier_problem(section, env)
        if problem is not None:
            problems.append(f"{config.source}: [notify.{i}] ({section.kind}) {problem}")
    return problems

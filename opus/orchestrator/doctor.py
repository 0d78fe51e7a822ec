"""``opus doctor``: check what ``opus run`` will need before it runs (SPEC §9).

``CHECKS`` is a list of small functions ``(config, environ) -> Iterable[Check]``, one per
concern (agents, repositories, sandbox, executor, notifiers); a module that brings a new
concern appends its own. Each ``Check`` is one printed line; the command exits 1 if any
check failed. A check never raises: what it cannot find is a failed check saying so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .checks import notifier_problem, split_argv
from .config import _SECRET_NAME, AgentSection, Config
from .errors import WorkspaceError
from .lifecycle import Stage

__all__ = ("CHECKS", "Check", "CheckFn", "render", "run_checks")

VERSION_TIMEOUT = 10.0


@dataclass(frozen=True)
class Check:
    """One line of the report: ``what`` was checked, whether it is ``ok``, and ``detail``."""

    what: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.what}: {self.detail}"


CheckFn = Callable[[Config, Mapping[str, str]], Iterable[Check]]


# -- agents ----------------------------------------------------------------------------------


def _agents(config: Config) -> list[tuple[str, AgentSection]]:
    named = [(s.value, config.agents.for_stage(s)) for s in Stage if s is not Stage.DELIVERY]
    if config.agents.ideator is not None:
        named.append(("ideator", config.agents.ideator))
    return named


def _preset(kind: str) -> type | None:
    from .agents.preset import PresetAgent
    from .agents.presets import KINDS

    factory = KINDS.get(kind)
    return factory if isinstance(factory, type) and issubclass(factory, PresetAgent) else None


def _version(argv: list[str], env: Mapping[str, str]) -> tuple[bool, str]:
    try:
        done = subprocess.run(
            [*argv, "--version"],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, f"`{argv[0]} --version` gave no answer in {VERSION_TIMEOUT:g} s"
    except OSError as e:
        return False, f"`{argv[0]} --version` cannot run: {e.strerror or e}"
    text = (done.stdout or done.stderr).decode("utf-8", "replace").strip()
    first = text.splitlines()[0][:120] if text else ""
    if done.returncode != 0:
        return False, f"`{argv[0]} --version` exited {done.returncode}: {first}"
    return True, first or "(no version printed)"


def check_agents(config: Config, env: Mapping[str, str]) -> Iterator[Check]:
    """Each agent's program on PATH and its ``--version``; its config under HOME; its keys."""
    seen: set[tuple[str, ...]] = set()
    for name, section in _agents(config):
        what = f"agents.{name} ({section.kind})"
        if section.api_key_env:
            ok = bool(env.get(section.api_key_env))
            yield Check(what, ok, f"${section.api_key_env} {'is set' if ok else 'is not set'}")
        if section.kind == "python" and section.callable:
            from .agents.python import load_callable
            from .errors import AgentError

            try:
                load_callable(section.callable)
                yield Check(what, True, f"{section.callable} imports")
            except AgentError as e:
                yield Check(what, False, str(e))
            continue
        if section.kind in ("openai", "python"):
            if not section.api_key_env:
                yield Check(what, True, "nothing to check locally")
            continue
        argv = split_argv(section.command) or [section.kind]
        exe = shutil.which(argv[0], path=env.get("PATH"))
        if exe is None:
            yield Check(what, False, f"`{argv[0]}` not found on PATH")
            continue
        preset = _preset(section.kind)
        if preset is None:  # a plain command: finding it is all one can check
            yield Check(what, True, f"`{argv[0]}` found at {exe}")
            continue
        key = (exe, *argv[1:])
        if key in seen:
            yield Check(what, True, f"{exe} (checked above)")
            continue
        seen.add(key)
        ok, version = _version([exe, *argv[1:]], env)
        yield Check(what, ok, f"{version} ({exe})" if ok else version)
        home = Path(env.get("HOME") or Path.home())
        paths: tuple[str, ...] = getattr(preset, "home_paths", ())
        keys = [n for n in section.env_passthrough if _SECRET_NAME.search(n) and env.get(n)]
        keys += [k for k, v in section.env.items() if _SECRET_NAME.search(k) and v]
        if keys:  # a key handed over in the environment is a login too
            yield Check(f"{what} credentials", True, f"${', $'.join(keys)} handed to the agent")
        elif paths:
            found = [p for p in paths if (home / p).exists()]
            yield Check(
                f"{what} config",
                bool(found),
                f"found ~/{', ~/'.join(found)}"
                if found
                else f"none of ~/{', ~/'.join(paths)} exists (log in with `{argv[0]}` first)",
            )


# -- repositories ----------------------------------------------------------------------------


def check_repos(config: Config, env: Mapping[str, str]) -> Iterator[Check]:
    """Each repository a git repository, its base branch present; with GitHub delivery, its
    ``[delivery] remote`` configured (else the push fails only after every agent ran)."""
    from .workspace import Workspace

    remote = config.delivery.remote if config.delivery.kind == "github" else None
    for name, repo in config.repos.items():
        path = config.repo_path(name)
        ws = Workspace(path, base=repo.base, worktrees_dir=config.state_dir / "worktrees")
        try:
            ws.check()
        except WorkspaceError as e:
            yield Check(f"repos.{name}", False, str(e))
            continue
        if remote is not None and ws.remote_url(remote) is None:
            yield Check(
                f"repos.{name} remote", False,
                f"no remote {remote!r} in {path} ([delivery] remote; `git remote -v` lists them)",
            )  # fmt: skip
            continue
        yield Check(f"repos.{name}", True, f"git repository {path}, base branch '{repo.base}'")


def check_delivery(config: Config, env: Mapping[str, str]) -> Iterator[Check]:
    """GitHub delivery's token variable."""
    d = config.delivery
    if d.kind == "github":
        ok = bool(env.get(d.token_env))
        yield Check("delivery (github)", ok, f"${d.token_env} {'is set' if ok else 'is not set'}")


# -- sandbox (its module's checks), executor (its module fills this slot) -----------------------


def check_sandbox(config: Config, env: Mapping[str, str]) -> Iterator[Check]:
    """The sandbox (SPEC §17): bubblewrap found and working, memory_max enforced or why not."""
    from .sandbox import doctor_checks

    yield from doctor_checks(config, env)


def check_executor(config: Config, env: Mapping[str, str]) -> Iterator[Check]:
    """The executor (SPEC §18): with Ray installed, ``agents.remote.doctor_checks`` joins the
    cluster (reachable, token accepted, a node with an `agent` resource, versions match)."""
    ex = config.executor
    if ex.kind == "local":
        yield Check("executor", True, "local")
        return
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        yield Check(
            "executor (ray)", False, "ray is not installed: pip install 'opus-orchestrator[ray]'"
        )
        return
    if ex.token_env and not env.get(ex.token_env):
        yield Check("executor (ray)", False, f"${ex.token_env} is not set")
        return
    from .agents.remote import doctor_checks

    yield from doctor_checks(config, env)


# -- notifiers -------------------------------------------------------------------------------


def check_notifiers(config: Config, env: Mapping[str, str]) -> Iterator[Check]:
    """Each notifier's tool, package and environment variables."""
    for i, section in enumerate(config.notify):
        problem = notifier_problem(section, env)
        yield Check(f"notify.{i} ({section.kind})", problem is None, problem or "ready")


CHECKS: list[CheckFn] = [
    check_agents,
    check_repos,
    check_delivery,
    check_sandbox,
    check_executor,
    check_notifiers,
]
"""Run in this order; append a function to add a concern."""


def run_checks(config: Config, environ: Mapping[str, str] | None = None) -> list[Check]:
    env = dict(os.environ if environ is None else environ)
    results: list[Check] = []
    for fn in CHECKS:
        try:
            results.extend(fn(config, env))
        except Exception as e:  # a broken check is a failed line, never a traceback
            results.append(Check(fn.__name__.removeprefix("check_"), False, f"{e!r}"))
    return results


def render(checks: Iterable[Check]) -> str:
    return "\n".join(c.line() for c in checks)

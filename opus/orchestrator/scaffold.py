"""``opus init``: a new vault with its folders, ``opus.toml``, an FR template (Obsidian's
``{{title}}``/``{{date}}`` placeholders) and ``00_system/opus.base`` (an Obsidian Bases view
of the planned folder: a table, and a board grouped by ``status``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OpusError

CONFIG = """\
# opus configuration — see README.md for every key. Paths are relative to this file.

[vault]
planned = "10_features/03_planned"        # move a note here and opus picks it up
dashboard = "00_system/opus-dashboard.md"  # "" disables the dashboard note

[state]
dir = ".opus"
keep_days = 30

[repos.app]            # the first repository is the default one
path = "{repo}"
base = "{base}"
branch_prefix = "opus/"

[pipeline]
max_iterations = 3
concurrency = 3
stage_timeout = 1800
stall_timeout = 600
retries = 2

[agents.planner]
kind = "{agent}"

[agents.coder]
kind = "{agent}"

[agents.tester]
kind = "command"
command = "python -m pytest -q"
network = false        # the tests run with loopback only (the sandbox, README "Sandbox")

[agents.reviewer]
kind = "{agent}"

[sandbox]               # every agent runs in bubblewrap: apt install bubblewrap
kind = "auto"           # auto (warns when bwrap is missing) | bwrap (required) | none
# paths = []            # folders agents may write besides their worktree
# home_binds = []       # paths of your HOME an agent's private HOME gets (e.g. ".gitconfig")
# memory_max = "4G"     # per agent process, where opus has a delegated cgroup v2

[approval]
mode = "manual"

[delivery]
kind = "local"

[[notify]]
kind = "log"
"""

TEMPLATE = """\
---
id: FR-000
title: "{{title}}"
priority: medium
created: {{date}}
aliases: []
# repo: app
# depends_on: []
# approval: manual
---
# {{title}}

What should change, and why. Be specific: the agents read exactly this.

## Acceptance criteria

- …
"""

BASE = """\
# An Obsidian Bases view of the feature requests opus serves (open it in Obsidian ≥ 1.9).
filters:
  and:
    - file.inFolder("{planned}")
    - file.ext == "md"
properties:
  note.status:
    displayName: Status
  note.stage:
    displayName: Stage
  note.updated_at:
    displayName: Updated
views:
  - type: table
    name: Feature requests
    order:
      - file.name
      - id
      - title
      - status
      - stage
      - iteration
      - priority
      - branch
      - error
      - updated_at
    sort:
      - property: updated_at
        direction: DESC
  - type: cards
    name: Board
    groupBy:
      property: status
      direction: ASC
    order:
      - file.name
      - title
      - stage
      - priority
      - branch
"""

FOLDERS = (
    "00_system",
    "10_features/01_inbox",
    "10_features/03_planned",
    "10_features/04_done",
    "templates",
)

AGENT_CLIS = ("claude", "codex", "gemini", "opencode", "aider")
"""Agent CLIs ``opus init`` looks for on PATH, the first found preferred."""


@dataclass
class InitReport:
    """What ``opus init`` did and found, and what to do next."""

    directory: Path
    created: list[Path] = field(default_factory=list)
    base: str = "main"
    base_detected: bool = False
    agents_found: list[str] = field(default_factory=list)
    agent: str = "claude"
    repo_problem: str | None = None
    """Why the repository ``opus.toml`` names cannot be served yet (None: it can)."""

    def data(self) -> dict[str, object]:
        """``opus init --json``."""
        return {
            "created": [str(p) for p in self.created],
            "config": str(self.directory / "opus.toml"),
            "base": self.base,
            "base_detected": self.base_detected,
            "agents_found": self.agents_found,
            "agent": self.agent,
            "repo_problem": self.repo_problem,
        }

    def lines(self) -> list[str]:
        out = [f"created {p}" for p in self.created]
        if self.repo_problem is not None:
            out.append(
                f"warning: [repos.app] path {self.repo_problem}; "
                "opus validate and opus run refuse it until then"
            )
        how = "detected" if self.base_detected else "assumed"
        out.append(f"base branch: {self.base} ({how})")
        if self.agents_found:
            out.append(
                f"agent CLIs on PATH: {', '.join(self.agents_found)}; "
                f"planner, coder and reviewer use {self.agent}"
            )
        else:
            out.append(
                "no agent CLI found on PATH (" + ", ".join(AGENT_CLIS) + "): install one, "
                'or set [agents.*] in opus.toml (kind = "command" runs any program)'
            )
        config = self.directory / "opus.toml"
        out.append(f"next: opus doctor --config {config}   (then: opus run --config {config})")
        return out


def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def default_branch(repo: Path) -> str | None:
    """The repository's default branch: origin's HEAD, else the branch checked out, else
    ``main`` or ``master`` if one exists."""
    remote = _git(repo, "symbolic-ref", "--short", "refs/remotes/origin/HEAD")
    if remote and "/" in remote:
        return remote.split("/", 1)[1]
    head = _git(repo, "symbolic-ref", "--short", "HEAD")
    if head:
        return head
    for name in ("main", "master"):
        if _git(repo, "rev-parse", "-q", "--verify", f"refs/heads/{name}") is not None:
            return name
    return None


DEFAULT_REPO = "../app"


def init_vault(directory: Path, *, repo: str | None = None, force: bool = False) -> InitReport:
    """Create the vault's folders, ``opus.toml``, the FR template and the Bases view.

    ``repo`` (relative to ``directory``) must be a git repository: its default branch goes
    into ``opus.toml``. Raises OpusError, creating nothing, when it is not, or when
    ``opus.toml`` exists (unless ``force``). Without ``repo``, ``../app`` is named in
    ``opus.toml`` whether or not it exists yet: the report says what to do about it (and
    ``opus validate`` / ``opus run`` refuse it until then)."""
    directory = directory.expanduser()
    config = directory / "opus.toml"
    if config.exists() and not force:
        raise OpusError(f"{config} already exists (use --force to overwrite it)")
    given, repo = repo is not None, repo or DEFAULT_REPO
    repo_path = Path(repo).expanduser()
    repo_path = Path(
        os.path.normpath(repo_path if repo_path.is_absolute() else directory.absolute() / repo_path)
    )
    missing = None
    if not repo_path.is_dir():
        missing = f"{repo_path} does not exist (create or clone it first"
    elif _git(repo_path, "rev-parse", "--git-dir") is None:
        missing = f"{repo_path} is not a git repository (git init it first"
    if missing is not None and given:
        raise OpusError(f"--repo {repo}: {missing})")
    if missing is not None:
        missing = f"{repo}: {missing}, or name another in opus.toml)"
    report = InitReport(directory, repo_problem=missing)
    base = default_branch(repo_path) if missing is None else None
    report.base, report.base_detected = base or "main", base is not None
    report.agents_found = [name for name in AGENT_CLIS if shutil.which(name)]
    report.agent = report.agents_found[0] if report.agents_found else "claude"
    for folder in FOLDERS:
        path = directory / folder
        if not path.exists():
            path.mkdir(parents=True)
            report.created.append(path)
    text = (
        CONFIG.replace("{repo}", repo.replace("\\", "/"))
        .replace("{base}", report.base)
        .replace("{agent}", report.agent)
    )
    config.write_text(text, encoding="utf-8")
    report.created.append(config)
    extra = {
        directory / "templates" / "feature-request.md": TEMPLATE,
        directory / "00_system" / "opus.base": BASE.replace("{planned}", "10_features/03_planned"),
    }
    for path, content in extra.items():
        if not path.exists():
            path.write_text(content, encoding="utf-8")
            report.created.append(path)
    return report

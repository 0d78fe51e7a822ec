"""``opus init``: a new vault with its folders, ``opus.toml`` and an FR template."""

from __future__ import annotations

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
base = "main"
branch_prefix = "opus/"

[pipeline]
max_iterations = 3
concurrency = 3
stage_timeout = 1800
stall_timeout = 600
retries = 2

[agents.planner]
kind = "claude"

[agents.coder]
kind = "claude"

[agents.tester]
kind = "command"
command = "python -m pytest -q"

[agents.reviewer]
kind = "claude"

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
title: A short title
priority: medium
# repo: app
# depends_on: []
# approval: manual
---
# A short title

What should change, and why. Be specific: the agents read exactly this.

## Acceptance criteria

- …
"""

FOLDERS = (
    "00_system",
    "10_features/01_inbox",
    "10_features/03_planned",
    "10_features/04_done",
    "templates",
)


def init_vault(directory: Path, *, repo: str = "../app", force: bool = False) -> list[Path]:
    """Create the vault's folders, ``opus.toml`` and the FR template; return what was made."""
    directory = directory.expanduser()
    config = directory / "opus.toml"
    if config.exists() and not force:
        raise OpusError(f"{config} already exists (use --force to overwrite it)")
    created: list[Path] = []
    for folder in FOLDERS:
        path = directory / folder
        if not path.exists():
            path.mkdir(parents=True)
            created.append(path)
    config.write_text(CONFIG.replace("{repo}", repo), encoding="utf-8")
    created.append(config)
    template = directory / "templates" / "feature-request.md"
    if not template.exists():
        template.write_text(TEMPLATE, encoding="utf-8")
        created.append(template)
    return created

"""Shared fixtures: a real git repository, a real vault, scripted agents as child processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

AGENT = Path(__file__).parent / "agents" / "scripted.py"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test Person",
    "GIT_AUTHOR_EMAIL": "person@example.com",
    "GIT_COMMITTER_NAME": "Test Person",
    "GIT_COMMITTER_EMAIL": "person@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    # no ~/.gitconfig either: a person's gpgsign, hooksPath or merge.ff must not change results
    "GIT_CONFIG_GLOBAL": os.devnull,
}


@pytest.fixture(autouse=True)
def _opus_logger_restored() -> Iterator[None]:
    """A CLI command run in-process (CliRunner) configures the "opus" logger; later tests
    must not inherit its level, handlers or propagation."""
    logger = logging.getLogger("opus")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


@pytest.fixture(autouse=True)
def _git_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    # a suite run from a systemd unit must not turn every opus log line into journal form
    # (the tests of that form set the variable themselves)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **GIT_ENV},
    ).stdout.strip()


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    (path / "README.md").write_text("# app\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


@dataclass
class Vault:
    """A vault on disk with its opus.toml, a target repo and the scripted agents' files."""

    root: Path
    repo: Path
    script_file: Path
    calls_file: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.root / "opus.toml"

    @property
    def planned(self) -> Path:
        return self.root / "10_features" / "03_planned"

    @property
    def state(self) -> Path:
        return self.root / ".opus"

    def script(self, data: dict[str, Any]) -> None:
        self.script_file.write_text(json.dumps(data))

    def calls(self) -> list[dict[str, Any]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def runs(self, stage: str, fr: str | None = None) -> list[dict[str, Any]]:
        return [
            c
            for c in self.calls()
            if c["event"] == "end" and c["stage"] == stage and (fr is None or c["fr"] == fr)
        ]

    def note(self, name: str, text: str) -> Path:
        """Write a note outside the planned folder, then rename it in (as a person would)."""
        inbox = self.root / "10_features" / "01_inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        src = inbox / name
        src.write_text(textwrap.dedent(text).lstrip())
        dst = self.planned / name
        os.replace(src, dst)
        return dst

    def write_config(self, **sections: str) -> None:
        script, calls = json.dumps(str(self.script_file)), json.dumps(str(self.calls_file))
        agents = "\n".join(
            textwrap.dedent(f"""
            [agents.{stage}]
            kind = "command"
            command = [{json.dumps(sys.executable)}, {json.dumps(str(AGENT))}, "{stage}"]
            env = {{ SCRIPT = {script}, CALLS = {calls} }}
            """)
            for stage in ("planner", "coder", "tester", "reviewer")
            if f"agents.{stage}" not in sections
        )
        base = {
            "vault": 'planned = "10_features/03_planned"\n'
            'dashboard = "00_system/opus-dashboard.md"',
            "repos.app": f'path = {json.dumps(str(self.repo))}\nbase = "main"',
            "polling": "active = 0.2\nidle_max = 1\ndebounce_ms = 50",
            "pipeline": "stage_timeout = 60\nstall_timeout = 30\nretries = 1",
            # the sandbox's own tests (test_sandbox.py) turn it on; its agents write CALLS
            "sandbox": 'kind = "none"',
        }
        base.update(sections)
        text = "\n".join(
            f"[{name}]\n{body}\n" for name, body in base.items() if not name.startswith("[[")
        )
        text += "".join(f"{name}\n{body}\n" for name, body in base.items() if name.startswith("[["))
        self.config.write_text(text + agents)


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[Vault]:
    repo = make_repo(tmp_path / "app")
    root = tmp_path / "vault"
    (root / "10_features" / "03_planned").mkdir(parents=True)
    v = Vault(
        root=root,
        repo=repo,
        script_file=tmp_path / "script.json",
        calls_file=tmp_path / "calls.jsonl",
    )
    v.script({})
    v.write_config()
    yield v


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

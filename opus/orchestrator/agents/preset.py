"""The base of the agent-CLI presets (NOTES "Agent CLIs"): one module per CLI beside it.

Each preset is a :class:`CommandAgent` that builds its CLI's documented non-interactive
argv (planner and reviewer read-only where the CLI allows it; none may push), hands over the
prompt the way the CLI wants it, and reads the final message and usage from its output.
``command`` replaces the executable (argv head), ``args`` are appended, ``model`` becomes the
CLI's model flag. The CLI's ``--version`` is asked once per agent and kept in ``meta``.
``home_paths`` names the CLI's own config and credential paths under HOME: the sandbox binds
only those into the private HOME it makes for a job, and ``opus doctor`` looks for them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

from ..config import AgentSection
from ..errors import AgentError, AgentNotFound
from ..lifecycle import Stage
from .base import StageContext, StageResult
from .command import CommandAgent, placeholder_values, split_command, substitute

__all__ = ("PresetAgent", "dict_of", "int_of", "lines_json")

log = logging.getLogger(__name__)

VERSION_TIMEOUT = 10.0
MAX_PROMPT_ARG = 100_000
"""Bytes of prompt passed as one argument; beyond it (Linux caps one at 128 KiB) the CLI is
told to read the prompt file instead."""


class PresetAgent(CommandAgent):
    """A CommandAgent for one known CLI."""

    executable: ClassVar[str]
    product: ClassVar[str]
    home_paths: ClassVar[tuple[str, ...]] = ()
    """The CLI's config and credential paths, relative to HOME (files or folders)."""

    def __init__(
        self,
        section: AgentSection,
        stage: Stage,
        *,
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
        grace: float = 5.0,
    ) -> None:
        super().__init__(section, stage, argv=argv, environ=environ, grace=grace)
        if argv is not None:
            self.head = list(argv)
        else:
            self.head = split_command(section.command) or [self.executable]
        self.version: str | None = None

    @property
    def read_only(self) -> bool:
        return self.stage is not Stage.CODER

    def model_flag(self, flag: str = "--model") -> list[str]:
        return [flag, self.section.model] if self.section.model else []

    def fill(self, args: Sequence[str], ctx: StageContext) -> list[str]:
        """Placeholders replaced (never in the prompt itself)."""
        values = placeholder_values(ctx)
        return [substitute(a, values) for a in args]

    def prompt_arg(self, ctx: StageContext) -> str:
        """The prompt as one argument (a pointer to the prompt file when it is too long)."""
        prompt = ctx.prompt
        if len(prompt.encode()) > MAX_PROMPT_ARG:
            prompt = f"Read the file {ctx.prompt_file} and carry out the task it describes."
        return " " + prompt if prompt.startswith("-") else prompt

    def stdin_for(self, ctx: StageContext) -> bytes | None:
        return None

    def not_found(self, exe: str) -> str:
        where = "" if os.sep in exe else " on PATH"
        return (
            f"`{exe}` not found{where}; install {self.product} or set "
            f"[agents.{self.stage}] kind = another agent (or command = its full path)"
        )

    async def run(self, ctx: StageContext) -> StageResult:
        version = await self.cli_version(ctx)
        result = await super().run(ctx)
        result.meta = {**result.meta, "version": version}
        return result

    async def cli_version(self, ctx: StageContext) -> str:
        """``<exe> --version`` (first line), asked once; "unknown" when it fails."""
        if self.version is None:
            try:
                proc = await self.execute(
                    ctx, [*self.head, "--version"], None, timeout=VERSION_TIMEOUT, watch=False
                )
            except AgentNotFound:
                raise
            except AgentError as e:
                log.warning("%s --version failed: %s", self.head[0], e)
                proc = None
            text = (proc.stdout.strip() or proc.stderr.strip()) if proc else ""
            ok = proc is not None and proc.returncode == 0 and text
            self.version = text.splitlines()[0].strip()[:200] if ok else "unknown"
        return self.version


def lines_json(text: str) -> Iterator[dict[str, Any]]:
    """Each line of ``text`` that is a JSON object (JSONL / NDJSON)."""
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj


def int_of(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return 0
    try:
        return int(float(value))
    except ValueError:
        return 0


def dict_of(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}

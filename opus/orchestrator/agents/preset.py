"""The base of the agent-CLI presets (NOTES "Agent CLIs"): one module per CLI beside it.

Each preset is a :class:`CommandAgent` that builds its CLI's documented non-interactive
argv (planner and reviewer read-only where the CLI allows it; none may push), hands over the
prompt the way the CLI wants it, and reads the final message and usage from its output.
``command`` replaces the executable (argv head), ``args`` are appended, ``model`` becomes the
CLI's model flag. The CLI's ``--version`` is asked once per agent and kept in ``meta``.
``home_paths`` names the CLI's own config and credential paths under HOME: the sandbox binds
only those into the private HOME it makes for a job, and ``opus doctor`` looks for them.

The hooks of SPEC §14 a preset fills in: ``cli_error`` (the CLI's own error, read before the
exit status), ``progress`` (which output lines are progress for the stall watch),
``endpoint`` (how ``base_url`` / ``api_key_env`` reach the CLI — refused by default, at
build time), ``cli_env`` (variables the CLI always gets; the agent's ``env`` wins).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

from ..config import AgentSection
from ..errors import AgentError, AgentNotFound, AgentOutputError, ConfigError
from ..lifecycle import Stage
from ..models import Usage
from ..process_output import output_tail
from ..supervisor import ProcessResult
from .base import StageContext, StageResult
from .command import CommandAgent, Reply, placeholder_values, split_command, substitute

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
        self.endpoint_env = self.endpoint(os.environ if environ is None else environ)

    def endpoint(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The variables that give the CLI ``base_url`` and the key ``api_key_env`` names.

        This base refuses both (ConfigError): a preset whose CLI takes its endpoint another
        way must say so rather than ignore them. ``environ`` is opus's environment."""
        given = [k for k in ("base_url", "api_key_env") if getattr(self.section, k)]
        if given:
            raise ConfigError(
                f"kind = {self.section.kind!r} cannot take {' / '.join(given)}: "
                f"set {self.product}'s endpoint and key in its own configuration",
                key=f"agents.{self.stage}",
            )
        return {}

    def api_key(self, environ: Mapping[str, str]) -> str | None:
        """The value of the variable ``api_key_env`` names (ConfigError when it is unset)."""
        name = self.section.api_key_env
        if not name:
            return None
        value = environ.get(name)
        if not value:
            raise ConfigError(
                f"api_key_env names {name}, which is not set in opus's environment",
                key=f"agents.{self.stage}",
            )
        return value

    def cli_env(self, ctx: StageContext) -> dict[str, str]:
        """Variables the CLI always gets (quiet, no updates, no analytics); ``env`` wins."""
        return {}

    def build_env(self, ctx: StageContext) -> dict[str, str]:
        return {**self.cli_env(ctx), **super().build_env(ctx), **self.endpoint_env}

    def answer(self, text: str, usage: Usage | None, result: ProcessResult) -> Reply:
        """The reply with the CLI's final message. Without one, the planner and the reviewer
        fail the attempt (usage kept): the CLI's event stream is never taken for the answer;
        the coder's work is in the worktree, its message may be empty."""
        if text.strip() or self.stage is Stage.CODER:
            return Reply(text, usage)
        error = AgentOutputError(
            f"{self.head[0].rsplit(os.sep, 1)[-1]} ended without a final message",
            output=output_tail(result.stdout, result.stderr),
        )
        error.usage = usage
        raise error

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

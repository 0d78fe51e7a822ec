"""opencode (`opencode run --format json`, NDJSON events), measured with opencode 1.18.33.

- The prompt goes on standard input (opencode reads it when no message is given), so a
  prompt of any size works and no file outside the project has to be read.
- Planner and reviewer: ``--agent plan`` *and* ``OPENCODE_PERMISSION`` denying ``edit``,
  ``bash`` and ``task`` — ``plan`` alone still runs its bash tool. Denied tools are not
  offered to the model at all; a call to one fails as "unavailable tool". The coder may
  edit and run any shell command but ``git push``.
- ``--title`` is given, so opencode sends no extra title request (its usage would be in no
  event); ``--print-logs --log-level ERROR`` puts its own error words on stderr (an unknown
  model is only "Unexpected server error" on stdout).
- Never installs, updates or phones home: no autoupdate, no models.dev fetch, no LSP
  download, npm offline (it installs its plugin package into each config folder otherwise),
  no share, no Claude Code prompts or skills from ``~/.claude``.
- The sandbox's private HOME gets only its login (``auth.json``), none of the person's
  opencode config.
- ``base_url`` / ``api_key_env``: a custom provider ``opus`` (``@ai-sdk/openai-compatible``,
  ``options.baseURL``, the key read from the named variable) in ``OPENCODE_CONFIG_CONTENT``;
  ``model`` is then that provider's model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ..errors import AgentCrashed, AgentError, AgentStalled, ConfigError
from ..models import Usage
from ..process_output import Counts, output_tail
from ..supervisor import ProcessResult
from .base import StageContext, StageResult
from .command import Reply, priced_usage
from .preset import PresetAgent, dict_of, int_of, lines_json

PROVIDER = "opus"
"""The id of the custom provider ``base_url`` becomes."""
READ_ONLY = {"edit": "deny", "bash": "deny", "task": "deny"}
CODER = {"edit": "allow", "bash": {"*": "allow", "git push": "deny", "git push *": "deny"}}
QUIET = {
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
    "OPENCODE_DISABLE_SHARE": "1",
    "OPENCODE_DISABLE_CLAUDE_CODE": "1",
    "OPENCODE_DISABLE_EXTERNAL_SKILLS": "1",
    "npm_config_offline": "true",
}
PERMANENT_STATUS = frozenset({400, 401, 403, 404, 422})
PERMANENT_ERRORS = ("ProviderModelNotFoundError", "ProviderInitError", "ConfigInvalidError")
_LOG_ERROR = re.compile(r'level=ERROR .*?\berror="(?P<error>(?:[^"\\]|\\.)*)"')


class OpencodeAgent(PresetAgent):
    """opencode: ``opencode run --format json`` with the prompt on standard input."""

    executable = "opencode"
    home_paths = (".local/share/opencode/auth.json",)
    """Its login only: the person's ``~/.config/opencode`` (MCP servers, plugins, agents,
    permissions) stays out of the sandbox's private HOME unless ``home = "real"``."""
    product = "opencode (npm i -g opencode-ai)"

    def endpoint(self, environ: Mapping[str, str]) -> dict[str, str]:
        self.config: dict[str, Any] = {"autoupdate": False, "share": "disabled"}
        if not self.section.base_url:
            if self.section.api_key_env:
                raise ConfigError(
                    "kind = 'opencode' takes api_key_env only with base_url (a key for the "
                    "provider opencode itself is configured for goes in its own auth)",
                    key=f"agents.{self.stage}",
                )
            return {}
        if not self.section.model:
            raise ConfigError(
                "kind = 'opencode' with base_url needs `model` (the model name at that endpoint)",
                key=f"agents.{self.stage}",
            )
        options: dict[str, str] = {"baseURL": self.section.base_url}
        env: dict[str, str] = {}
        key = self.api_key(environ)
        if key is not None and self.section.api_key_env:
            env[self.section.api_key_env] = key
            options["apiKey"] = "{env:" + self.section.api_key_env + "}"
        self.config["provider"] = {
            PROVIDER: {
                "npm": "@ai-sdk/openai-compatible",
                "name": "opus",
                "options": options,
                "models": {self.section.model: {"name": self.section.model}},
            }
        }
        self.config["model"] = f"{PROVIDER}/{self.section.model}"
        return env

    def cli_env(self, ctx: StageContext) -> dict[str, str]:
        permission = READ_ONLY if self.read_only else CODER
        return {
            **QUIET,
            "OPENCODE_PERMISSION": json.dumps(permission),
            "OPENCODE_CONFIG_CONTENT": json.dumps(self.config),
        }

    def build_argv(self, ctx: StageContext) -> list[str]:
        agent = ["--agent", "plan"] if self.read_only else []
        model = self.section.model
        if model and self.section.base_url:
            model = f"{PROVIDER}/{model}"
        return self.fill(
            [
                *self.head, "run", "--format", "json", *agent,
                "--title", "opus {job_id} {stage} {iteration}",
                "--print-logs", "--log-level", "ERROR",
                *(["--model", model] if model else []), *self.section.args,
            ],
            ctx,
        )  # fmt: skip

    def stdin_for(self, ctx: StageContext) -> bytes | None:
        return ctx.prompt.encode()

    def progress(self) -> Counts:
        """Only its JSON events are progress: the error log lines it prints while it retries
        an unreachable model are not."""
        return lambda tag, line: tag == "out" and line.startswith("{")

    async def run(self, ctx: StageContext) -> StageResult:
        try:
            return await super().run(ctx)
        except AgentStalled as e:  # it retries a dead endpoint silently: say what it saw
            said = _log_error(e.output)
            if not said:
                raise
            stalled = AgentStalled(f"opencode: {said} ({e})", output=e.output)
            stalled.usage = e.usage
            raise stalled from e

    def cli_error(self, ctx: StageContext, result: ProcessResult) -> AgentError | None:
        error: dict[str, Any] = {}
        for event in lines_json(result.stdout):
            if event.get("type") == "error":
                error = dict_of(event.get("error")) or dict_of(
                    dict_of(event.get("part")).get("error")
                )
        if not error:
            return None
        data = dict_of(error.get("data"))
        name = str(error.get("name") or "error")
        message = str(data.get("message") or error.get("message") or name)
        logged = _log_error(result.stderr)
        if name == "UnknownError" and logged:  # its stdout says only "Unexpected server error"
            message = logged
        status = int_of(data.get("statusCode")) or None
        retryable = data.get("isRetryable")
        if not isinstance(retryable, bool):
            retryable = status not in PERMANENT_STATUS
        if any(kind in message for kind in PERMANENT_ERRORS) or status in PERMANENT_STATUS:
            retryable = False
        where = f" (HTTP {status})" if status else ""
        failure = AgentCrashed(
            f"opencode: {message[:400]}{where}",
            retryable=retryable,
            output=output_tail(result.stdout, result.stderr),
        )
        failure.usage = self._usage(result.stdout)
        return failure

    def _usage(self, stdout: str) -> Usage | None:
        sent = received = 0
        cost: float | None = None
        seen = False
        for event in lines_json(stdout):
            if event.get("type") != "step_finish":
                continue
            part = dict_of(event.get("part"))
            tokens = dict_of(part.get("tokens"))
            cache = dict_of(tokens.get("cache"))
            sent += int_of(tokens.get("input")) + int_of(cache.get("read"))
            sent += int_of(cache.get("write"))
            received += int_of(tokens.get("output")) + int_of(tokens.get("reasoning"))
            if isinstance(part.get("cost"), int | float):
                cost = (cost or 0.0) + float(part["cost"])
            seen = True
        return priced_usage(self.section, sent, received, cost) if seen else None

    def reply(self, ctx: StageContext, result: ProcessResult) -> Reply:
        step: list[str] = []
        last: list[str] = []
        for event in lines_json(result.stdout):
            kind = event.get("type")
            part = dict_of(event.get("part"))
            if kind == "step_start":
                step = []
            elif kind == "text" and isinstance(part.get("text"), str):
                step.append(part["text"])
                last = step
        return self.answer("\n".join(last), self._usage(result.stdout), result)


def _log_error(text: str) -> str:
    """The last ``error="…"`` of opencode's ERROR log lines (``--print-logs``), unescaped."""
    found = [m["error"] for m in _LOG_ERROR.finditer(text)]
    if not found:
        return ""
    try:
        said = json.loads(f'"{found[-1]}"')
    except ValueError:
        said = found[-1]
    return str(said).splitlines()[0].strip()[:400]

"""Gemini CLI (`gemini -p`), measured against the real CLI 0.61.0 (README "Agent presets").

- Output: ``--output-format stream-json``, one event a line (``init``, ``message`` with
  ``delta`` parts of the answer, ``tool_use``, ``tool_result``, then ``result`` with
  ``status``, ``error`` and ``stats``: tokens per model). Every stdout event is progress;
  its stderr (warnings, "Attempt N failed. Retrying with backoff...") is not.
- Trust: ``--skip-trust`` (every worktree is a new folder: else exit 55 in every stage).
- Read-only stages: ``--approval-mode plan``: no ``run_shell_command`` at all, and
  ``write_file`` / ``replace`` refused but for plan notes in its own home (below: a temp folder).
- The coder: ``--approval-mode auto_edit`` (edits) plus a policy file (``--policy``) that
  allows ``run_shell_command`` in that mode only and denies ``git push``; ``auto_edit``
  alone offers the model no shell, so it could neither run the tests nor commit.
- A home of its own: ``GEMINI_CLI_HOME`` is a fresh folder per run in the CLI's own ``TMPDIR``
  (inside the sandbox: its private one; removed afterwards) whose
  ``.gemini/settings.json`` the preset writes (no usage statistics, telemetry, auto-update
  or hooks; two model attempts at most; no retry of fetch errors) and where the person's
  login files (``oauth_creds.json``, ``google_accounts.json``) are linked: their settings,
  hooks, MCP servers, extensions and GEMINI.md never load — unless ``home = "real"``. With
  ``base_url`` / ``api_key_env`` it selects ``security.auth.selectedType =
  "gemini-api-key"``: ``GOOGLE_GEMINI_BASE_URL`` alone selects the "gateway" auth type,
  which 0.61.0 refuses ("Invalid auth method selected", exit 41), and no variable selects
  another one headless (``GEMINI_DEFAULT_AUTH_TYPE`` is read interactively only). A system
  settings file (``GEMINI_CLI_SYSTEM_SETTINGS_PATH``) is no way: the CLI skips it unless
  every folder above it is writable by its owner only, which no temp folder is.
- Endpoint: ``base_url`` → ``GOOGLE_GEMINI_BASE_URL``, ``api_key_env`` → ``GEMINI_API_KEY``.
- Errors: the ``result`` event's error, else its stderr (exit 41 bad auth, 42 bad input,
  52 bad config, 55 untrusted folder: permanent); API errors with code 400/401/403/404
  are permanent, 429/5xx and fetch failures retryable.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from ..atomic import atomic_write
from ..errors import AgentCrashed, AgentError
from ..models import Usage
from ..process_output import Counts, output_tail
from ..supervisor import ProcessResult
from .base import StageContext
from .command import Reply, json_objects, priced_usage
from .preset import PresetAgent, dict_of, int_of, lines_json

__all__ = ("CODER_POLICY", "GeminiAgent")

PERMANENT_EXIT = frozenset({41, 42, 52, 55})
"""Its fatal exit codes: authentication, input, configuration, untrusted folder."""
PERMANENT_CODE = re.compile(r'"code"\s*:\s*(400|401|403|404)\b|\b(UNAUTHENTICATED|PERMISSION_DENIED'
                            r"|INVALID_ARGUMENT|NOT_FOUND)\b")  # fmt: skip
CREDENTIALS = ("oauth_creds.json", "google_accounts.json")
"""Its login files under ``~/.gemini``: all of the person's HOME it gets."""
CODER_POLICY = """\
# opus: the coder may run shell commands (tests, git) under auto_edit, never push.
[[rule]]
toolName = "run_shell_command"
decision = "allow"
priority = 100
modes = ["autoEdit"]

[[rule]]
toolName = "run_shell_command"
commandPrefix = "git push"
decision = "deny"
priority = 200
denyMessage = "opus: the coder may not push."
"""
_NOISE = ("Warning: 256-color", "Ripgrep is not available", "[STARTUP]", "at ", "status:")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class GeminiAgent(PresetAgent):
    """Gemini CLI: ``gemini -p PROMPT --output-format stream-json --approval-mode …``."""

    executable = "gemini"
    home_paths = tuple(f".gemini/{name}" for name in CREDENTIALS)
    product = "Gemini CLI (npm i -g @google/gemini-cli)"

    def endpoint(self, environ: Mapping[str, str]) -> dict[str, str]:
        env = {"GOOGLE_GEMINI_BASE_URL": self.section.base_url} if self.section.base_url else {}
        key = self.api_key(environ)
        if key is not None:
            env["GEMINI_API_KEY"] = key
        return env

    def settings(self, env: Mapping[str, str]) -> dict[str, Any]:
        """The settings the CLI runs with, in a home of its own (``GEMINI_CLI_HOME``)."""
        settings: dict[str, Any] = {
            "privacy": {"usageStatisticsEnabled": False},
            "telemetry": {"enabled": False},
            "general": {
                "enableAutoUpdate": False,
                "enableAutoUpdateNotification": False,
                "maxAttempts": 2,
                "retryFetchErrors": False,
            },
            "hooksConfig": {"enabled": False},
        }
        if self.section.base_url or self.section.api_key_env:
            settings["security"] = {"auth": {"selectedType": "gemini-api-key"}}
        elif (Path(env.get("HOME") or "~").expanduser() / ".gemini" / CREDENTIALS[0]).exists():
            settings["security"] = {"auth": {"selectedType": "oauth-personal"}}
        return settings

    def files(self, ctx: StageContext) -> Path:
        """The stage's folder for the settings and policy files (in the job's artifacts)."""
        folder = ctx.artifacts / f"gemini-{ctx.stage.value}"
        folder.mkdir(mode=0o700, exist_ok=True)  # (state folders 0700: SPEC §8)
        return folder

    def build_argv(self, ctx: StageContext) -> list[str]:
        if self.read_only:
            mode = ["--approval-mode", "plan"]
        else:
            policy = self.files(ctx) / "coder-policy.toml"
            atomic_write(policy, CODER_POLICY.encode(), sync=False)
            mode = ["--approval-mode", "auto_edit", "--policy", str(policy)]
        return [
            *self.fill(self.head, ctx),
            "-p",
            self.prompt_arg(ctx),
            *self.fill(
                [
                    "--output-format", "stream-json", "--skip-trust", *mode,
                    *self.model_flag(), *self.section.args,
                ],
                ctx,
            ),
        ]  # fmt: skip

    @asynccontextmanager
    async def _sandboxed(
        self, ctx: StageContext, argv: list[str], env: dict[str, str]
    ) -> AsyncIterator[tuple[list[str], dict[str, str]]]:
        """As it runs (in the sandbox, if any), with a home of its own in its ``TMPDIR``."""
        async with super()._sandboxed(ctx, argv, env) as (argv, env):
            if self.section.home == "real":
                yield argv, env
                return
            home = await anyio.to_thread.run_sync(self.own_home, env)
            try:
                yield argv, {**env, "GEMINI_CLI_HOME": str(home)}
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(shutil.rmtree, home, True)

    def own_home(self, env: Mapping[str, str]) -> Path:
        """A fresh ``GEMINI_CLI_HOME`` in the temp folder the CLI gets (writable there, in the
        sandbox too): opus's settings, and links to the person's login files."""
        home = Path(tempfile.mkdtemp(prefix="opus-gemini-", dir=env.get("TMPDIR") or None))
        config = home / ".gemini"
        config.mkdir()
        settings = json.dumps(self.settings(env), indent=2)
        (config / "settings.json").write_text(settings, encoding="utf-8")
        real = Path(env.get("HOME") or "~").expanduser() / ".gemini"
        for name in CREDENTIALS:  # a login (oauth) reaches the CLI, nothing else of HOME does
            if (real / name).exists():
                (config / name).symlink_to(real / name)
        return home

    def cli_env(self, ctx: StageContext) -> dict[str, str]:
        return {"GEMINI_CLI_NO_RELAUNCH": "true"}  # no second node process (bigger heap)

    def progress(self) -> Counts:
        return _counts

    def quiet(self) -> bool:
        """``args`` may choose ``--output-format json``: one object at the very end."""
        args = self.section.args
        return any(a in ("--output-format", "-o") and args[i + 1 : i + 2] == ["json"]
                   for i, a in enumerate(args))  # fmt: skip

    # -- results ----------------------------------------------------------------------

    def cli_error(self, ctx: StageContext, result: ProcessResult) -> AgentError | None:
        final = _result(result.stdout)
        said = ""
        if final is not None and final.get("status") == "error":
            said = str(dict_of(final.get("error")).get("message") or "error")
        elif final is None and (result.returncode != 0 or result.signal is not None):
            said = _stderr_error(result.stderr)
        if not said:
            return None
        permanent = result.returncode in PERMANENT_EXIT or bool(PERMANENT_CODE.search(said))
        error = AgentCrashed(
            f"gemini: {said[:500]}",
            retryable=not permanent,
            output=output_tail(result.stdout, result.stderr),
        )
        error.usage = self._usage(final) if final is not None else None
        return error

    def reply(self, ctx: StageContext, result: ProcessResult) -> Reply:
        final = _result(result.stdout)
        if final is None:  # `args` chose --output-format json: one object
            doc = next((o for o in json_objects(result.stdout) if "response" in o), None)
            if doc is None:
                return self.answer("", None, result)
            return self.answer(str(doc.get("response") or ""), self._json_usage(doc), result)
        parts = [
            str(e.get("content") or "")
            for e in lines_json(result.stdout)
            if e.get("type") == "message" and e.get("role") == "assistant"
        ]
        return self.answer(_last_turn(parts, result.stdout), self._usage(final), result)

    def _usage(self, final: dict[str, Any]) -> Usage | None:
        stats = dict_of(final.get("stats"))
        if not stats:
            return None
        return priced_usage(
            self.section, int_of(stats.get("input_tokens")), int_of(stats.get("output_tokens")),
            None,
        )  # fmt: skip

    def _json_usage(self, doc: dict[str, Any]) -> Usage | None:
        models = dict_of(dict_of(doc.get("stats")).get("models"))
        sent = received = 0
        for stats in models.values():
            tokens = dict_of(dict_of(stats).get("tokens"))
            sent += int_of(tokens.get("prompt"))
            received += int_of(tokens.get("candidates")) + int_of(tokens.get("thoughts"))
        return priced_usage(self.section, sent, received, None) if models else None


def _result(stdout: str) -> dict[str, Any] | None:
    found = [e for e in lines_json(stdout) if e.get("type") == "result"]
    return found[-1] if found else None


def _last_turn(parts: list[str], stdout: str) -> str:
    """The assistant's text after its last tool call (its answer, not its narration)."""
    last_tool = -1
    kinds = [e.get("type") for e in lines_json(stdout)]
    messages = [
        i for i, e in enumerate(lines_json(stdout))
        if e.get("type") == "message" and e.get("role") == "assistant"
    ]  # fmt: skip
    for i, kind in enumerate(kinds):
        if kind in ("tool_use", "tool_result"):
            last_tool = i
    after = [parts[n] for n, i in enumerate(messages) if i > last_tool]
    return "".join(after) if after else "".join(parts)


def _stderr_error(stderr: str) -> str:
    """Its error on stderr: the message of an error JSON, else its last line that says one."""
    for obj in json_objects(stderr):
        error = obj.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    lines = [_ANSI.sub("", ln).strip() for ln in stderr.splitlines()]
    said = [ln for ln in lines if ln and not ln.startswith(_NOISE) and ln not in ("{", "}")]
    return said[-1] if said else ""


def _counts(tag: str, line: str) -> bool:
    """Progress: its stdout events (stderr holds warnings and retry notices)."""
    return tag == "out" and line.startswith("{")

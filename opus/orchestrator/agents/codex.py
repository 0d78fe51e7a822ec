"""Codex (`codex exec`), measured against the real CLI 0.171.0 (README "Agent presets").

- Output: ``--json``, one event a line: ``item.completed`` (``agent_message`` is the answer),
  ``turn.completed`` (usage), ``turn.failed`` / ``error`` (its own error). The prompt is the
  last argument; standard input is /dev/null (a piped stdin is appended to the prompt).
- Read-only stages: ``--sandbox read-only`` — codex's own sandbox (bubblewrap + seccomp)
  runs every shell command on a read-only filesystem; codex offers a model it has no
  metadata for no other write tool than its shell.
- The coder: ``--sandbox workspace-write`` plus, as writable roots (``--add-dir``), only the
  parts of the repository's git directory a commit writes: the worktree's own git dir
  (index, HEAD), and the shared ``objects``, ``refs`` and ``logs`` — not ``hooks`` nor
  ``config``. codex keeps ``.git`` read-only otherwise, and ``git commit`` fails.
- Its sandbox must start: codex refuses its helper under the temp folder (``CODEX_HOME``
  under ``TMPDIR``: "bwrap: execvp codex-linux-sandbox") and a bubblewrap that may not map
  users cannot nest ("setting up uid map: Operation not permitted"). Either way every shell
  command fails while codex exits 0. So the preset gives codex a ``TMPDIR`` of its own when
  ``CODEX_HOME`` would be under it, and runs ``codex sandbox -- true`` once per agent:
  a sandbox that does not start is a permanent error in codex's words.
- Endpoint: ``base_url`` / ``api_key_env`` become a model provider of its own, ``-c
  model_providers.opus.{base_url, wire_api = "responses", env_key}`` (codex speaks only the
  Responses API), with codex's own retries off (it retries a 401 five times): opus decides.
- Errors: a 400/401/403/404 or a missing key is permanent; 5xx and connection errors are
  retryable. While its endpoint is unreachable codex prints "Reconnecting... waiting for
  network" forever: those lines are no progress, so the stall watch stops it.
- Nothing from the person's setup: ``--ignore-user-config --ignore-rules`` (no config.toml,
  MCP servers, hooks or exec rules), ``--ephemeral`` (no session files), no update check,
  analytics or feedback — unless ``home = "real"``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import AgentCrashed, AgentError, AgentStalled
from ..models import Usage
from ..process_output import Counts, output_tail
from ..sandbox import git_paths
from ..supervisor import ProcessResult
from .base import StageContext, StageResult
from .command import Reply, priced_usage
from .preset import VERSION_TIMEOUT, PresetAgent, dict_of, int_of, lines_json

__all__ = ("CodexAgent", "git_commit_dirs")

PROVIDER = "opus"
OPENAI_URL = "https://api.openai.com/v1"
FIXED_CONFIG = (
    "allow_login_shell=false",  # a login shell resets PATH (/etc/profile) and runs ~/.profile
    "check_for_update_on_startup=false",
    "analytics.enabled=false",
    "feedback.enabled=false",
)
PERMANENT = re.compile(
    r"unexpected status (400|401|403|404|422)\b|Missing environment variable"
    r"|model .*(not found|does not exist|not supported)",
    re.IGNORECASE,
)
"""codex's words for what another attempt cannot fix: bad request, auth, unknown model."""
RECONNECTING = "Reconnecting..."


class CodexAgent(PresetAgent):
    """Codex: ``codex exec --json --sandbox …``, the prompt as an argument, stdin /dev/null."""

    executable = "codex"
    home_paths = (".codex/auth.json",)
    product = "Codex (npm i -g @openai/codex)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sandbox_checked = False

    # -- how codex is invoked ---------------------------------------------------------

    def endpoint(self, environ: Mapping[str, str]) -> dict[str, str]:
        key = self.api_key(environ)
        name = self.section.api_key_env
        return {name: key} if name and key is not None else {}

    def provider_config(self) -> list[str]:
        """``-c`` overrides that make ``base_url`` / ``api_key_env`` codex's model provider."""
        if not (self.section.base_url or self.section.api_key_env):
            return []
        table = f"model_providers.{PROVIDER}"
        pairs = [
            ("model_provider", PROVIDER),
            (f"{table}.name", PROVIDER),
            (f"{table}.base_url", self.section.base_url or OPENAI_URL),
            (f"{table}.wire_api", "responses"),
            (f"{table}.request_max_retries", 0),
            (f"{table}.stream_max_retries", 0),
        ]
        if self.section.api_key_env:
            pairs.append((f"{table}.env_key", self.section.api_key_env))
        return [a for k, v in pairs for a in ("-c", f"{k}={json.dumps(v)}")]

    def writable_git(self, worktree: Path) -> list[str]:
        """``--add-dir`` for what ``git commit`` in ``worktree`` writes outside it."""
        dirs = [str(d) for d in git_commit_dirs(worktree)]
        return [a for d in dirs for a in ("--add-dir", d)]

    @staticmethod
    def nested(ctx: StageContext) -> list[str]:
        """Inside opus's sandbox the host's /tmp is read-only: codex's own (nested) sandbox
        must not take it as a writable root (it keeps ``TMPDIR``, a private one there)."""
        return (
            [] if ctx.sandbox is None else ["-c", "sandbox_workspace_write.exclude_slash_tmp=true"]
        )

    def build_argv(self, ctx: StageContext) -> list[str]:
        if self.read_only:
            sandbox = ["--sandbox", "read-only"]
        else:
            sandbox = ["--sandbox", "workspace-write", *self.writable_git(ctx.worktree)]
            sandbox += self.nested(ctx)
        private = [] if self.section.home == "real" else [
            "--ignore-user-config", "--ignore-rules", "--ephemeral",
        ]  # fmt: skip
        fixed = [a for setting in FIXED_CONFIG for a in ("-c", setting)]
        return [
            *self.fill(
                [
                    *self.head, "exec", "--json", "--color", "never", *sandbox, *private,
                    *fixed, *self.provider_config(), "-o", "{output_file}",
                    *self.model_flag("-m"), *self.section.args,
                ],
                ctx,
            ),
            self.prompt_arg(ctx),
        ]  # fmt: skip

    def cli_env(self, ctx: StageContext) -> dict[str, str]:
        return {}

    def build_env(self, ctx: StageContext) -> dict[str, str]:
        env = super().build_env(ctx)
        if ctx.sandbox is not None:  # it gives a private TMPDIR, apart from the private HOME
            return env
        home = Path(env.get("CODEX_HOME") or Path(env.get("HOME") or "~").expanduser() / ".codex")
        temp = Path(env.get("TMPDIR") or "/tmp")
        if home.absolute().is_relative_to(temp.absolute()):
            # codex will not put its sandbox helper under the temp folder
            own = ctx.artifacts / f"codex-tmp-{ctx.stage.value}"
            own.mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(own)
        return env

    def progress(self) -> Counts:
        return _counts

    # -- running ----------------------------------------------------------------------

    async def run(self, ctx: StageContext) -> StageResult:
        await self.check_sandbox(ctx)
        try:
            return await super().run(ctx)
        except AgentStalled as e:
            said = _last_error(e.output)
            if not said:
                raise
            error = AgentStalled(f"codex: {said} — {e}", output=e.output)
            error.usage = e.usage
            raise error from e

    async def check_sandbox(self, ctx: StageContext) -> None:
        """``codex sandbox -- true`` once: codex's own sandbox starts here, or a permanent
        error in its words (else every shell command fails while codex exits 0)."""
        if self.sandbox_checked:
            return
        mode = "read-only" if self.read_only else "workspace-write"
        argv = [*self.fill(self.head, ctx), "sandbox", "-c", f'sandbox_mode="{mode}"',
                *([] if self.read_only else self.nested(ctx)), "--", "true"]  # fmt: skip
        proc = await self.execute(ctx, argv, None, timeout=VERSION_TIMEOUT, watch=False)
        if proc.returncode != 0 or proc.signal is not None:
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
            said = next((ln for ln in reversed(lines) if "bwrap" in ln), lines[-1] if lines else "")
            raise AgentCrashed(
                f"codex's own sandbox cannot start here ({said or f'status {proc.returncode}'});"
                " a CODEX_HOME under TMPDIR or a bubblewrap that cannot nest breaks it",
                retryable=False,
                output=output_tail(proc.stdout, proc.stderr),
            )
        self.sandbox_checked = True

    # -- results ----------------------------------------------------------------------

    def cli_error(self, ctx: StageContext, result: ProcessResult) -> AgentError | None:
        events = list(lines_json(result.stdout))
        failed = [e for e in events if e.get("type") == "turn.failed"]
        said = ""
        if failed:
            said = str(dict_of(failed[-1].get("error")).get("message") or "")
        if not said:
            errors = [str(e.get("message") or "") for e in events if e.get("type") == "error"]
            final = [m for m in errors if m and not m.startswith(RECONNECTING)]
            said = final[-1] if final and result.returncode != 0 else ""
        if not said and result.returncode != 0 and result.signal is None:
            lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
            flagged = [ln for ln in lines if ln.lower().startswith("error")]
            if flagged:  # bad flags or config: codex (clap) says so and exits 2
                return AgentCrashed(f"codex: {flagged[-1][:500]}", retryable=False,
                                    output=output_tail(result.stdout, result.stderr))  # fmt: skip
        if not said:
            return None
        error = AgentCrashed(
            f"codex: {said[:500]}",
            retryable=PERMANENT.search(said) is None,
            output=output_tail(result.stdout, result.stderr),
        )
        error.usage = _usage(self, events)
        return error

    def reply(self, ctx: StageContext, result: ProcessResult) -> Reply:
        events = list(lines_json(result.stdout))
        message = ""
        for event in events:
            item = dict_of(event.get("item"))
            if event.get("type") == "item.completed" and item.get("type") == "agent_message":
                message = str(item.get("text") or "")
        return self.answer(message, _usage(self, events), result)


def git_commit_dirs(worktree: Path) -> list[Path]:
    """The folders outside ``worktree`` that ``git commit`` there writes: its own git dir
    (index, HEAD, its reflog), the shared ``objects`` and the folders of its branch's ref and
    reflog — the same as opus's sandbox leaves writable (``sandbox.git_paths``), not the other
    branches' refs, ``hooks`` nor ``config``."""
    found = git_paths(worktree)
    if found is None:
        return []
    dirs = [] if found.own is None else [found.own]
    return dirs + [d for d in (found.common / "objects", *found.ref_dirs) if d.is_dir()]


def _usage(agent: PresetAgent, events: list[dict[str, Any]]) -> Usage | None:
    sent = received = 0
    seen = False
    for event in events:
        if event.get("type") == "turn.completed":
            counts = dict_of(event.get("usage"))
            sent += int_of(counts.get("input_tokens"))
            received += int_of(counts.get("output_tokens"))
            seen = True
    return priced_usage(agent.section, sent, received, None) if seen else None


def _counts(tag: str, line: str) -> bool:
    """Progress: codex's events but its "Reconnecting..." notices (and stderr chatter)."""
    if tag != "out" or not line.startswith("{"):
        return False
    try:
        event = json.loads(line)
    except ValueError:
        return True
    if not isinstance(event, dict):
        return True
    said = str(event.get("message", ""))
    return not (event.get("type") == "error" and said.startswith(RECONNECTING))


def _last_error(output: str) -> str:
    """codex's last ``error`` event message in ``output`` (its words while it waits)."""
    found = ""
    for event in lines_json(output):
        if event.get("type") == "error" and event.get("message"):
            found = str(event["message"])
    return found[:300]

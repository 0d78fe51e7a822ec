"""The environment an agent process gets (SPEC §5.1): an allowlist, never opus's secrets."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .base import StageContext

__all__ = ("ALLOWED", "REMOVED", "agent_env", "opus_vars")

ALLOWED = ("PATH", "HOME", "LANG", "TERM", "TMPDIR", "USER")
"""Copied from opus's environment (plus every ``LC_*`` and the agent's ``env_passthrough``)."""
REMOVED = ("NOTIFY_SOCKET", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "GITHUB_TOKEN", "GH_TOKEN")
"""Never given to an agent, whatever the configuration says (also ``WATCHDOG_*``, ``LISTEN_*``)."""
_REMOVED_PREFIXES = ("WATCHDOG_", "LISTEN_")
FIXED = {"GIT_TERMINAL_PROMPT": "0", "NO_COLOR": "1"}
"""Always set: git never prompts for credentials, CLIs print no colour codes."""


def _removed(name: str) -> bool:
    return name in REMOVED or name.startswith(_REMOVED_PREFIXES)


def agent_env(
    *,
    passthrough: Sequence[str],
    extra: Mapping[str, str],
    opus_vars: Mapping[str, str],
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The scrubbed environment of an agent process.

    The allowlist and ``passthrough`` names from ``environ`` (default ``os.environ``), then
    ``extra`` (the agent's ``env`` table), then ``opus_vars``; the names in ``REMOVED`` are
    dropped from all of them, and ``GIT_TERMINAL_PROMPT=0`` and ``NO_COLOR=1`` are set.
    """
    source = os.environ if environ is None else environ
    wanted = set(ALLOWED) | set(passthrough)
    env = {k: v for k, v in source.items() if k in wanted or k.startswith("LC_")}
    env.update(extra)
    env.update(opus_vars)
    env = {k: v for k, v in env.items() if not _removed(k)}
    env.update(FIXED)
    return env


def opus_vars(ctx: StageContext, fr_file: Path) -> dict[str, str]:
    """Every ``OPUS_*`` variable of SPEC §5.1 for one run (``OPUS_FEEDBACK_FILE`` when given)."""
    env = {
        "OPUS_STAGE": ctx.stage.value,
        "OPUS_ITERATION": str(ctx.iteration),
        "OPUS_ROUND": str(ctx.round),
        "OPUS_JOB_ID": ctx.job_id,
        "OPUS_FR_ID": ctx.fr.id,
        "OPUS_FR_FILE": str(fr_file.absolute()),
        "OPUS_WORKTREE": str(ctx.worktree),
        "OPUS_PROMPT_FILE": str(ctx.prompt_file),
        "OPUS_OUTPUT_FILE": str(ctx.output_file),
        "OPUS_ARTIFACTS": str(ctx.artifacts),
    }
    if ctx.feedback_file is not None:
        env["OPUS_FEEDBACK_FILE"] = str(ctx.feedback_file)
    return env

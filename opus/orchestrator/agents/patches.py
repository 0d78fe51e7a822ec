"""Diffs between a model and a worktree: the one in an answer, applying it, the change so far.

``extract_diff`` finds the unified diff in a model's answer; ``apply_diff`` applies it with
``git apply`` (3-way first); ``diff_against`` is what a reviewer is shown. Git runs as a
subprocess with a timeout (sync: callers run these in a thread).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from ..errors import AgentError, AgentTimeout

_FENCED = re.compile(r"^(`{3,})[ \t]*([\w+-]*)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
_DIFF_START = re.compile(r"^(?:diff --git |--- )", re.M)
_HUNK = re.compile(r"^(?:\+\+\+ |@@ )", re.M)


def extract_diff(text: str) -> str | None:
    """The unified diff in an answer: ```diff blocks (joined), else any diff-like block or text."""
    blocks = [(m.group(2).lower(), m.group(3)) for m in _FENCED.finditer(text)]
    diffs = [body for lang, body in blocks if lang in ("diff", "patch", "udiff")]
    if not diffs:
        diffs = [body for _, body in blocks if _DIFF_START.search(body) and _HUNK.search(body)]
    if not diffs:
        start = _DIFF_START.search(text)
        if start is None or not _HUNK.search(text, start.start()):
            return None
        diffs = [text[start.start() :]]
    diff = "\n".join(d.strip("\n") for d in diffs if d.strip())
    return diff + "\n" if diff else None


def run_git(
    worktree: Path, args: list[str], *, timeout: float, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``git`` in ``worktree`` (no prompt, C locale); AgentTimeout past ``timeout``."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    try:
        return subprocess.run(
            ["git", "-c", "core.quotepath=off", *args],
            cwd=worktree,
            input=input,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise AgentTimeout(f"git {args[0]} took longer than {timeout:g} s") from e
    except OSError as e:
        raise AgentError(f"cannot run git in {worktree}: {e}", retryable=False) from e


def apply_diff(worktree: Path, diff: str, timeout: float) -> str | None:
    """Apply ``diff`` in ``worktree``: ``git apply --3way``, then plain; the error or None.

    Each is tried as written, then with ``--recount`` (models miscount hunk lines). The
    3-way attempts run only on a clean worktree, so conflict markers they leave can be
    undone; plain ``git apply`` is all-or-nothing. The error reported is plain git apply's.
    """
    clean = run_git(worktree, ["status", "--porcelain"], timeout=timeout)
    attempts: list[list[str]] = [[], ["--recount"]]
    if clean.returncode == 0 and not clean.stdout.strip():
        attempts = [["--3way"], ["--3way", "--recount"], *attempts]
    error = ""
    for extra in attempts:
        cmd = ["apply", "--whitespace=nowarn", *extra, "-"]
        result = run_git(worktree, cmd, input=diff, timeout=timeout)
        if result.returncode == 0:
            return None
        if "--3way" in extra:
            if run_git(worktree, ["status", "--porcelain"], timeout=timeout).stdout.strip():
                run_git(worktree, ["reset", "-q", "--hard", "HEAD"], timeout=timeout)
                run_git(worktree, ["clean", "-fdq"], timeout=timeout)
        elif not extra:
            error = (result.stderr or result.stdout).strip()
            error = error or f"git apply exited {result.returncode}"
    return error


def diff_against(worktree: Path, base: str, budget: int, timeout: float) -> str:
    """``git diff <base>`` of the worktree, cut to ``budget`` bytes (with the stat if cut)."""
    result = run_git(worktree, ["diff", base], timeout=timeout)
    if result.returncode != 0:
        raise AgentError(f"git diff {base} failed: {result.stderr.strip()}", retryable=False)
    diff = result.stdout
    if not diff.strip():
        return "(no changes)"
    if len(diff.encode()) <= budget:
        return diff
    stat_out = run_git(worktree, ["diff", "--stat", base], timeout=timeout).stdout
    cut = diff.encode()[:budget].decode("utf-8", errors="ignore")
    return f"{stat_out}\n{cut}\n… (diff truncated to {budget} bytes)"

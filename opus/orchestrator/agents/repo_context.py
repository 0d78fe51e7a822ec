"""What a model is shown about a job: the FR, the plan, the feedback and the repository.

Text only; the ``openai`` agent puts these parts into its chat messages. Repository files are
chosen within a byte budget, files the FR, plan or feedback name first.
"""

from __future__ import annotations

import logging
import re
import stat
from pathlib import Path, PurePosixPath

from .base import StageContext
from .patches import run_git

logger = logging.getLogger(__name__)


def fr_text(ctx: StageContext) -> str:
    fr = ctx.fr
    return f"# Feature request {fr.id}: {fr.title}\n\n{fr.body.strip()}"


def plan_text(ctx: StageContext) -> str:
    return f"## Plan\n\n{ctx.plan.strip()}" if ctx.plan else ""


def feedback_text(ctx: StageContext) -> str:
    fb = ctx.feedback
    if fb is None:
        return ""
    lines = [f"## Feedback from iteration {fb.iteration} ({fb.reason.replace('_', ' ')})"]
    lines += ["", fb.message.strip()]
    if fb.test_output:
        fence = _fence(fb.test_output)
        lines += ["", "Test output (tail):", fence, fb.test_output.strip()[-8000:], fence]
    for issue in fb.issues:
        where = f" {issue.file}{f':{issue.line}' if issue.line else ''}" if issue.file else ""
        lines.append(f"- [{issue.severity}]{where} {issue.message}")
    return "\n".join(lines)


def hint_text(ctx: StageContext) -> str:
    """The text whose file names mark files as relevant: FR, plan, feedback."""
    parts = [ctx.fr.title, ctx.fr.body, ctx.plan or ""]
    if ctx.feedback is not None:
        parts += [ctx.feedback.message, ctx.feedback.test_output]
        parts += [f"{i.file or ''} {i.message}" for i in ctx.feedback.issues]
    return "\n".join(parts)


def repo_files(worktree: Path, hints: str, budget: int) -> str:
    """The tracked files' list and contents within ``budget`` bytes.

    Files named in ``hints`` (by path, then by file name) come first, then the smallest text
    files; binaries, symlinks and files that do not fit are left out.
    """
    listed = run_git(worktree, ["ls-files", "-z"], timeout=60)
    if listed.returncode != 0:
        logger.debug("no repository context: git ls-files: %s", listed.stderr.strip())
        return ""
    paths = [p for p in listed.stdout.split("\0") if p]
    listing = "\n".join(paths)
    if len(listing) > budget // 4:
        listing = listing[: budget // 4].rsplit("\n", 1)[0] + "\n… (more files not listed)"
    used = len(listing.encode())
    tokens = {t.strip(".,:;`'\"") for t in re.findall(r"[\w./-]+", hints)}
    names = {PurePosixPath(t).name for t in tokens if t}
    candidates: list[tuple[int, int, str]] = []
    for path in paths:
        try:
            info = (worktree / path).lstat()
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        rank = 0 if path in tokens else 1 if PurePosixPath(path).name in names else 2
        candidates.append((rank, info.st_size if rank == 2 else 0, path))
    candidates.sort()
    blocks: list[str] = []
    for rank, _, path in candidates:
        remaining = budget - used - len(path) - 40
        if remaining < (2048 if rank < 2 else 1):
            if rank == 2:
                break
            continue
        text = _read_text(worktree / path, remaining, whole=rank == 2)
        if text is None:
            continue
        fence = _fence(text)
        block = f"### {path}\n{fence}\n{text}\n{fence}\n"
        used += len(block.encode())
        blocks.append(block)
    out = f"## Repository files (tracked)\n\n{listing}\n"
    if blocks:
        out += "\n## File contents\n\n" + "\n".join(blocks)
    return out


def _read_text(path: Path, limit: int, *, whole: bool) -> str | None:
    """The file as text, cut at a line end within ``limit`` bytes; None for binaries."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return None
    if b"\0" in data[:8192]:
        return None
    cut = len(data) > limit
    if cut:
        if whole:
            return None
        data = data[: data.rfind(b"\n", 0, limit) + 1]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text + "… (truncated)\n" if cut else text


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`{3,}", text)), default=2)
    return "`" * (longest + 1)

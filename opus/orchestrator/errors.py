"""The one error tree of opus.

    OpusError
     ├── ConfigError            bad opus.toml: names the key and the file
     ├── NoteError              a note opus cannot read or rewrite (input error)
     │    └── NoteValueError    the note parses but a key has a bad value
     ├── LockHeld               another opus serves this vault
     ├── RegistryError          the job registry cannot be read or written
     ├── WorkspaceError         git: repo unusable, worktree, commit, push
     │    ├── MergeConflict     merging the branch into the base conflicts
     │    └── ConflictMarkers   a commit refused: files still hold conflict markers
     ├── DeliveryError          pushing or opening the pull request failed
     ├── IllegalTransition      a status change the lifecycle forbids
     └── AgentError             a stage's agent failed (``retryable`` decides)
          ├── AgentNotFound     the program does not exist (permanent)
          ├── AgentTimeout      ran past its timeout (retryable)
          ├── AgentStalled      no output and no worktree change (retryable)
          ├── AgentCrashed      died by a signal (retryable) or exited non-zero
          ├── AgentOutputError  its answer could not be parsed (retryable)
          └── BackendError      an HTTP backend failed (retryable on 408/409/429/5xx)

Retry decisions read ``retryable``, never the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class OpusError(Exception):
    """Root of every error opus raises on purpose."""


class ConfigError(OpusError):
    """``problems`` holds every problem found (``[key] message``), the first one included;
    the message names the file and lists them all, one per line."""

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        file: Path | None = None,
        problems: list[str] | None = None,
    ) -> None:
        self.key = key
        self.file = file
        what = f"[{key}] " if key else ""
        self.problems = problems or [f"{what}{message}"]
        where = f"{file}: " if file else ""
        if len(self.problems) == 1:
            text = f"{where}{self.problems[0]}"
        else:
            text = f"{where}{len(self.problems)} problems:\n" + "\n".join(
                f"  {p}" for p in self.problems
            )
        super().__init__(text)


class NoteError(OpusError):
    """A note that cannot be parsed or rewritten; the file is left untouched."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class NoteValueError(NoteError):
    """The frontmatter parses, but ``key`` holds a value opus cannot accept."""

    def __init__(self, path: Path | str, key: str, problem: str) -> None:
        self.key = key
        super().__init__(path, problem)


class LockHeld(OpusError):
    def __init__(self, lock_file: Path, pid: int | None) -> None:
        self.lock_file = lock_file
        self.pid = pid
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"another opus ({holder}) already serves this vault (lock {lock_file})")


class RegistryError(OpusError):
    pass


class WorkspaceError(OpusError):
    pass


class MergeConflict(WorkspaceError):
    def __init__(self, branch: str, base: str, paths: list[str]) -> None:
        self.branch = branch
        self.base = base
        self.paths = paths
        super().__init__(f"merging {branch} into {base} conflicts in: {', '.join(paths) or '?'}")


class ConflictMarkers(WorkspaceError):
    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        super().__init__(f"conflict markers left in: {', '.join(paths)}")


class DeliveryError(OpusError):
    pass


class IllegalTransition(OpusError):
    pass


class AgentError(OpusError):
    """A stage's agent failed. ``retryable`` says whether another attempt may help."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None, output: str = "") -> None:
        if retryable is not None:
            self.retryable = retryable
        self.output = output
        self.usage: Any = None
        """A ``models.Usage`` when the failed attempt reported what it spent."""
        super().__init__(message)


class AgentNotFound(AgentError):
    retryable = False


class AgentTimeout(AgentError):
    retryable = True


class AgentStalled(AgentError):
    retryable = True


class AgentCrashed(AgentError):
    retryable = False


class AgentOutputError(AgentError):
    retryable = True


class BackendError(AgentError):
    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        if retryable is None:
            retryable = status is None or status in (408, 409, 429) or status >= 500
        super().__init__(message, retryable=retryable)

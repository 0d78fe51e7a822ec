"""How a worktree travels to a cluster node and back: git bundles (SPEC §18).

Out: the stage's start commit, minus what the node's cache already holds (the node says
which commits it has). Back (the coder): the agent's commits plus one commit of whatever it
left uncommitted, which the head verifies (``git bundle verify``), fetches, and spreads back
over its worktree — the agent's own commits as commits, the rest as uncommitted changes — so
opus commits exactly as it does for a local coder.

Plain ``git`` children, no GitPython: both sides (the head and a worker node) use this.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import WorkspaceError

__all__ = ("NodeCache", "apply_bundle", "bundle_changes", "bundle_commit", "git")

_IDENTITY = {
    "GIT_AUTHOR_NAME": "opus",
    "GIT_AUTHOR_EMAIL": "opus@localhost",
    "GIT_COMMITTER_NAME": "opus",
    "GIT_COMMITTER_EMAIL": "opus@localhost",
    "GIT_TERMINAL_PROMPT": "0",
}
_QUIET = ("-c", "maintenance.auto=false", "-c", "gc.auto=0", "-c", "commit.gpgsign=false")
KEEP_REFS = 64
"""Start commits a node's cache keeps as refs (older ones are pruned)."""


def git(cwd: Path, *args: str, ok: Sequence[int] = (0,)) -> str:
    """Run git in ``cwd``; a failure is a WorkspaceError with git's first error line."""
    env = {**os.environ, **_IDENTITY}
    done = subprocess.run(
        ["git", "-C", os.fspath(cwd), *_QUIET, *args],
        capture_output=True,
        env=env,
        check=False,
    )
    if done.returncode not in ok:
        err = done.stderr.decode("utf-8", "replace").strip().splitlines()
        line = next((ln for ln in err if ln.startswith(("fatal", "error"))), err[0] if err else "")
        raise WorkspaceError(f"git {' '.join(args[:3])} (in {cwd}): {line or done.returncode}")
    return done.stdout.decode("utf-8", "replace").strip()


def _code(cwd: Path, *args: str) -> int:
    """A git command's exit status: 0 or 1 (a yes or a no); anything else raises."""
    done = subprocess.run(
        ["git", "-C", os.fspath(cwd), *_QUIET, *args],
        capture_output=True,
        env={**os.environ, **_IDENTITY},
        check=False,
    )
    if done.returncode not in (0, 1):
        err = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise WorkspaceError(f"git {' '.join(args[:3])} (in {cwd}): {err[0] if err else ''}")
    return done.returncode


def _has(repo: Path, commit: str) -> bool:
    if not commit:
        return False
    done = subprocess.run(
        ["git", "-C", os.fspath(repo), "cat-file", "-e", f"{commit}^{{commit}}"],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def _present(repo: Path, commits: Iterable[str]) -> list[str]:
    """Those of ``commits`` that ``repo`` holds (one ``git cat-file --batch-check``)."""
    wanted = [c for c in dict.fromkeys(commits) if c]
    if not wanted:
        return []
    done = subprocess.run(
        ["git", "-C", os.fspath(repo), "cat-file", "--batch-check=%(objectname) %(objecttype)"],
        input="".join(f"{c}\n" for c in wanted).encode(),
        capture_output=True,
        check=False,
    )
    found = {
        parts[0]
        for line in done.stdout.decode().splitlines()
        if len(parts := line.split()) == 2 and parts[1] == "commit"
    }
    return [c for c in wanted if c in found]


def _bundle(repo: Path, ref: str, exclude: Sequence[str]) -> bytes:
    with tempfile.TemporaryDirectory(prefix="opus-bundle-") as tmp:
        path = Path(tmp) / "b.bundle"
        git(repo, "bundle", "create", "-q", str(path), ref, *(f"^{c}" for c in exclude))
        return path.read_bytes()


def bundle_commit(repo: Path, commit: str, have: Iterable[str]) -> bytes | None:
    """A bundle of ``commit`` — which must be the worktree ``repo``'s HEAD — without what the
    receiver ``have`` s; None if it has it."""
    known = _present(repo, have)
    if commit in known:
        return None
    return _bundle(repo, "HEAD", known)  # HEAD is the worktree's own: no shared ref to race


def bundle_changes(worktree: Path, start: str) -> tuple[bytes, str, bool] | None:
    """The agent's work since ``start`` (committed or not) as ``(bundle, tip, wip)``;
    ``wip`` says the tip is opus's commit of what the agent left uncommitted. None: no change."""
    git(worktree, "add", "-A")
    # commit exits 1 when nothing is staged: then the agent left nothing uncommitted
    wip = _code(worktree, "commit", "-q", "--no-verify", "-m", "opus: uncommitted changes") == 0
    tip = git(worktree, "rev-parse", "--verify", "HEAD^{commit}")
    if tip == start:
        return None
    return _bundle(worktree, "HEAD", [start]), tip, wip


def apply_bundle(worktree: Path, data: bytes, tip: str, *, wip: bool) -> None:
    """Verify a worker's bundle against ``worktree`` and spread it back over the worktree."""
    with tempfile.TemporaryDirectory(prefix="opus-bundle-") as tmp:
        path = Path(tmp) / "back.bundle"
        path.write_bytes(data)
        git(worktree, "bundle", "verify", "-q", str(path))
        git(worktree, "fetch", "-q", "--no-tags", "--no-write-fetch-head", str(path), "HEAD")
    git(worktree, "reset", "-q", "--hard", tip)  # fails if the bundle did not bring the tip
    if wip:
        git(worktree, "reset", "-q", f"{tip}~1")  # the uncommitted part becomes that again


class NodeCache:
    """A node's bare repository per head repository: the commits earlier stages brought."""

    def __init__(self, root: Path, key: str) -> None:
        self.repo = root / f"{key}.git"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.repo.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.repo.parent / f"{self.repo.name}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                if not (self.repo / "HEAD").exists():
                    git(self.repo.parent, "init", "-q", "--bare", self.repo.name)
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def have(self) -> list[str]:
        """The commits this cache holds a ref for, newest first."""
        if not (self.repo / "HEAD").exists():
            return []
        out = git(
            self.repo,
            "for-each-ref",
            "--sort=-committerdate",
            "--format=%(objectname)",
            "refs/opus/",
        )
        return out.split()

    def holds(self, commit: str) -> bool:
        """Whether the cache keeps a ref to ``commit`` (a file: refs here are never packed)."""
        return (self.repo / "refs" / "opus" / commit).is_file()

    def count(self) -> int:
        try:
            return sum(1 for _ in (self.repo / "refs" / "opus").iterdir())
        except OSError:
            return 0

    def receive(self, data: bytes | None, commit: str) -> None:
        """Take a bundle of ``commit`` (the head's HEAD when it bundled it; None: the cache
        has it already) and keep a ref to it. A bundle whose prerequisites the cache lacks
        is refused (WorkspaceError) and changes nothing."""
        with self._locked():
            if data is not None:
                with tempfile.TemporaryDirectory(prefix="opus-bundle-") as tmp:
                    path = Path(tmp) / "in.bundle"
                    path.write_bytes(data)
                    git(self.repo, "fetch", "-q", "--no-tags", "--no-write-fetch-head", str(path),
                        f"+HEAD:refs/opus/{commit}")  # fmt: skip
            elif not _has(self.repo, commit):
                raise WorkspaceError(f"the node's cache lost commit {commit[:12]}")
            else:
                git(self.repo, "update-ref", f"refs/opus/{commit}", commit)

    def prune(self, have: list[str]) -> None:
        """Drop the refs of all but the newest KEEP_REFS start commits (``have``: newest first)."""
        if len(have) > KEEP_REFS:
            with self._locked():
                for old in have[KEEP_REFS:]:
                    git(self.repo, "update-ref", "-d", f"refs/opus/{old}")

    def keep(self, commit: str) -> None:
        """Remember a commit made here (the coder's), so the next stage sends only its child."""
        with self._locked():
            git(self.repo, "update-ref", f"refs/opus/{commit}", commit)

    def checkout(self, commit: str, path: Path) -> None:
        with self._locked():
            git(self.repo, "worktree", "add", "-q", "--detach", str(path), commit)

    def drop(self, path: Path) -> None:
        with self._locked():
            git(self.repo, "worktree", "remove", "--force", str(path), ok=(0, 128))

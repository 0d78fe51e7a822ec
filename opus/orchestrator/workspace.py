"""One target repository: job worktrees, commits, diffs, merges into the base, push.

Every method blocks (GitPython runs ``git`` children); the caller runs them in threads.
Every git failure is a ``WorkspaceError`` with one line — the command and git's first
error line — chained to GitPython's error. Commits use the workspace's own identity and
never a person's global git config; repository hooks are skipped (``--no-verify``): the
pipeline's tester and reviewer are opus's gate. No token and no URL credentials ever
reach a log line or an error message.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import secrets
import threading
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # GitPython runs `git version` when imported: import it on first use
    from git.exc import CommandError

from .errors import ConflictMarkers, MergeConflict, WorkspaceError
from .redact import Redactor

__all__ = ("PUSH_TIMEOUT", "Created", "Workspace", "worktree_fingerprint")

log = logging.getLogger(__name__)

PUSH_TIMEOUT = 300.0
"""Seconds a ``git push`` may take before it is killed."""

# Spare a maintenance child per command; keep a person's signing setup out of opus's commits.
_QUIET = ("-c", "maintenance.auto=false", "-c", "gc.auto=0")
_COMMIT = (*_QUIET, "-c", "commit.gpgsign=false")
_MARK_START = re.compile(rb"^<{7}(?: |\r?$)", re.MULTILINE)
_MARK_END = re.compile(rb"^>{7}(?: |\r?$)", re.MULTILINE)
_ERROR_LINE = re.compile(r"^(fatal|error|CONFLICT|!)[: ]")
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


class Created(NamedTuple):
    """A job's worktree: where it is, its branch, and the base commit it started from."""

    path: Path
    branch: str
    base_commit: str


class _Entry(NamedTuple):
    path: str
    branch: str | None  # "refs/heads/x"; None when detached or bare
    bare: bool


class Workspace:
    """One target repository (bare or not) and its base branch. Constructing does no I/O."""

    def __init__(
        self,
        repo_path: Path,
        *,
        base: str,
        worktrees_dir: Path,
        author: tuple[str, str] = ("opus", "opus@localhost"),
    ) -> None:
        self.repo_path = repo_path
        self.base = base
        self.worktrees_dir = worktrees_dir
        self.author = author

    # -- the repository ---------------------------------------------------------------------

    def check(self) -> None:
        """Raise ``WorkspaceError`` unless the repository exists and has the base branch."""
        import git
        from git.exc import InvalidGitRepositoryError, NoSuchPathError

        try:
            with git.Repo(self.repo_path):
                pass
        except (InvalidGitRepositoryError, NoSuchPathError) as e:
            raise WorkspaceError(f"repository {self.repo_path}: not a git repository") from e
        if not self._ok(
            self.repo_path, "rev-parse", "-q", "--verify", f"{self._base_ref}^{{commit}}"
        ):
            raise WorkspaceError(f"base branch '{self.base}' not found in {self.repo_path}")

    def base_commit(self, ref: str | None = None) -> str:
        """The commit the base branch (or ``ref``, e.g. ``fetch_base``'s) points at."""
        ref = ref or self._base_ref
        return self._git(self.repo_path, "rev-parse", "--verify", f"{ref}^{{commit}}")

    def fetch_base(self, remote: str, token: str | None) -> str:
        """Fetch the base branch from ``remote`` into ``refs/remotes/REMOTE/BASE`` (where a
        PR merges: its base as the remote has it; the local base branch is not moved), and
        return that ref."""
        ref = f"refs/remotes/{remote}/{self.base}"
        env, hidden = _auth(token)
        self._call(
            self.repo_path,
            ["fetch", "--no-tags", "--no-recurse-submodules", remote,
             f"+refs/heads/{self.base}:{ref}"],
            opts=_QUIET,
            env=env,
            hidden=hidden,
            timeout=PUSH_TIMEOUT,
        )  # fmt: skip
        return ref

    def is_merged(self, branch: str) -> bool:
        """Whether ``branch`` is an ancestor of the base (a branch equal to the base is)."""
        ref = f"refs/heads/{branch}"
        return self._ok(self.repo_path, "merge-base", "--is-ancestor", ref, self._base_ref)

    def has_branch(self, branch: str) -> bool:
        """Whether the repository has ``branch`` (loose, packed or in a reftable)."""
        status, _ = self._call(
            self.repo_path, ["rev-parse", "--verify", "-q", f"refs/heads/{branch}"], ok=(0, 1)
        )
        return status == 0

    def in_base(self, commit: str) -> bool:
        """Whether ``commit`` is in the base's history (a branch merged, then deleted)."""
        status, _ = self._call(
            self.repo_path, ["merge-base", "--is-ancestor", commit, self._base_ref], ok=(0, 1, 128)
        )
        return status == 0

    def merged_branches(self) -> frozenset[str]:
        """Every local branch that is an ancestor of the base (``is_merged`` of them all, in
        one git process: a poll asks it of every FR in review)."""
        out = self._git(
            self.repo_path,
            "for-each-ref", f"--merged={self._base_ref}", "--format=%(refname:lstrip=2)",
            "refs/heads/",
        )  # fmt: skip
        return frozenset(line for line in out.splitlines() if line)

    def remote_url(self, remote: str) -> str | None:
        """The URL of ``remote`` (may hold credentials: never log it), or None if there is none."""
        status, out = self._call(self.repo_path, ["remote", "get-url", remote], ok=(0, 2))
        url = _text(out).strip() if status == 0 else ""
        return url or None

    # -- worktrees --------------------------------------------------------------------------

    def create(self, job_id: str, branch: str, *, reusable: Collection[str] = ()) -> Created:
        """Add ``<worktrees_dir>/<job_id>`` on a new branch from the base.

        A taken branch name is reused, reset to the base, when it is checked out nowhere
        and holds nothing to keep: its tip is in ``reusable`` (commits of the FR's earlier,
        finished jobs) or already in the base. Otherwise it gets the first free ``-2``,
        ``-3``, … suffix. A path that is already this repository's worktree on ``branch``
        (or a suffixed one) is returned unchanged, with the branch's merge base as its base
        commit (a resumed job).
        """
        if not job_id or job_id in (".", "..") or "/" in job_id or os.sep in job_id:
            raise WorkspaceError(f"invalid job id {job_id!r} for a worktree folder")
        path = self.worktrees_dir.absolute() / job_id
        with self._lock():
            if path.exists() or path.is_symlink():
                return self._existing(path, branch)
            base = self.base_commit()
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            chosen = branch
            try:  # the usual case: one git process
                self._git(self.repo_path, "worktree", "add", "-q", "-b", chosen, str(path), base)
            except WorkspaceError:  # a taken branch name, or a stale worktree entry
                self._git(self.repo_path, "worktree", "prune")
                if self._disposable(branch, reusable):
                    self._git(
                        self.repo_path, "worktree", "add", "-q", "-B", branch, str(path), base
                    )
                else:
                    chosen = self._free_branch(branch)
                    self._git(
                        self.repo_path, "worktree", "add", "-q", "-b", chosen, str(path), base
                    )
        path.chmod(0o700)  # a state folder (SPEC §8), whatever the umask gave git
        log.debug("worktree %s on branch %s from %s", path, chosen, base[:12])
        return Created(path, chosen, base)

    def attach(self, job_id: str, branch: str) -> Created:
        """A resumed job's worktree: the one it has, or — when that was removed (a job
        resting in review may wait long) — a new one on its existing ``branch``."""
        path = self.worktrees_dir.absolute() / job_id
        with self._lock():
            if path.exists() or path.is_symlink():
                return self._existing(path, branch)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._git(self.repo_path, "worktree", "prune")
            self._git(self.repo_path, "worktree", "add", "-q", str(path), branch)
            base = self._git(path, "merge-base", self._base_ref, "HEAD")
        path.chmod(0o700)
        log.info("worktree %s re-created on branch %s", path, branch)
        return Created(path, branch, base)

    def detached(self, name: str) -> Path:
        """Add ``<worktrees_dir>/<name>`` at the base's commit, on no branch (for reading)."""
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise WorkspaceError(f"invalid worktree name {name!r}")
        path = self.worktrees_dir.absolute() / name
        with self._lock():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._git(
                self.repo_path, "worktree", "add", "-q", "--detach", str(path), self.base_commit()
            )
        path.chmod(0o700)
        return path

    def remove(self, path: Path) -> None:
        """Remove a job's worktree (uncommitted work included); its branch stays."""
        with self._lock():
            if path.exists():
                self._git(self.repo_path, "worktree", "remove", "--force", str(path.absolute()))
            self._git(self.repo_path, "worktree", "prune")
        log.debug("removed worktree %s", path)

    # -- inside a worktree ------------------------------------------------------------------

    def head(self, path: Path) -> str:
        """The worktree's HEAD commit (read from git's files; ``rev-parse`` when they are
        anything but plain loose or packed refs)."""
        found = read_head(path)
        return found or self._git(path, "rev-parse", "--verify", "HEAD^{commit}")

    def commit_all(
        self, path: Path, message: str, *, since: str, branch: str | None = None
    ) -> str | None:
        """Stage everything and commit it if anything is staged (a merge in progress is
        concluded by it).

        Returns HEAD when it differs from ``since`` (opus's commit or the agent's own),
        else None: nothing changed. Raises ``ConflictMarkers`` (and commits nothing) when a
        changed file still holds git's conflict markers. ``branch``: the job's branch; an
        agent that switched to another branch (or detached HEAD) has its work moved onto
        it, and the worktree back on it — what is delivered is what was judged.
        """
        if branch is not None and self._head_ref(path) != f"refs/heads/{branch}":
            # the agent left the branch: the job's branch takes what HEAD is at, and HEAD goes
            # back onto it before anything is committed (a branch it switched to is not ours)
            log.warning("%s: the agent left branch %s; its work is moved onto it", path, branch)
            self._git(path, "update-ref", f"refs/heads/{branch}", "HEAD")
            self._git(path, "symbolic-ref", "HEAD", f"refs/heads/{branch}")
        self._git(path, "add", "-A")
        # one diff for both questions: the index against ``since`` holds what is staged and
        # what the agent committed itself (the files to search for conflict markers)
        _, out = self._call(path, ["diff", "--cached", "--name-only", "-z", "--no-renames", since])
        changed = sorted(p for p in _text(out).split("\0") if p)
        marked = _marked(path, changed)
        if marked:
            self._git(path, "reset", "-q")  # unstage: the worktree stays as the agent left it
            raise ConflictMarkers(marked)
        before = self.head(path)
        if before == since:
            staged = bool(changed)  # HEAD is ``since``: the index's changes are staged ones
        else:  # the agent committed: is anything left staged on top?
            staged = not self._ok(path, "diff", "--cached", "--quiet")
        if staged or _merging(path):
            self._git(path, "commit", "-q", "--no-verify", "-m", message, opts=_COMMIT)
            head = self.head(path)
        else:
            head = before
        return head if head != since else None

    def _head_ref(self, path: Path) -> str | None:
        """The branch ref the worktree's HEAD is on (None: detached)."""
        found = read_head_ref(path)
        if found is not None:
            return found or None
        _, out = self._call(path, ["symbolic-ref", "-q", "HEAD"], ok=(0, 1))
        return _text(out).strip() or None

    def reset(self, path: Path, commit: str) -> None:
        """Discard work after ``commit``: ``reset --hard``, ``clean -fd`` (ignored files stay)."""
        self._git(path, "reset", "-q", "--hard", commit)
        self._git(path, "clean", "-q", "-fd")

    def diff(self, path: Path, base_commit: str) -> str:
        """Unified diff of the worktree's HEAD against ``base_commit``."""
        _, out = self._call(path, ["diff", "--no-color", "--no-ext-diff", base_commit, "HEAD"])
        return _text(out)

    def diff_stat(self, path: Path, base_commit: str) -> str:
        """``git diff --stat`` of HEAD against ``base_commit``."""
        return self._git(path, "diff", "--no-color", "--stat", base_commit, "HEAD")

    def changed_files(self, path: Path, base_commit: str) -> list[str]:
        """Paths added, modified or deleted between ``base_commit`` and HEAD, sorted."""
        _, out = self._call(
            path, ["diff", "--name-only", "-z", "--no-renames", base_commit, "HEAD"]
        )
        return sorted(p for p in _text(out).split("\0") if p)

    def contains(self, commit: str, ancestor: str) -> bool:
        """Whether ``ancestor`` is reachable from ``commit``."""
        return self._ok(self.repo_path, "merge-base", "--is-ancestor", ancestor, commit)

    def conflicts_with_base(
        self, branch: str, *, forked_from: str | None = None, base_ref: str | None = None
    ) -> list[str]:
        """The paths that conflict when ``branch`` is merged into the base (or ``base_ref``)
        now ([] = clean). A base still at ``forked_from`` (where the branch began) cannot
        conflict: no merge is tried then."""
        base_ref = base_ref or self._base_ref
        if forked_from is not None and read_ref(self.repo_path, base_ref) == forked_from:
            return []
        import subprocess

        args = ["merge-tree", "--write-tree", "--name-only", "--no-messages", "-z"]
        command = ["git", "-C", os.fspath(self.repo_path), *_QUIET, *args,
                   base_ref, f"refs/heads/{branch}"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, env={**os.environ, **self._env({})})
        if done.returncode == 0:
            return []
        if done.returncode != 1:
            line = _text(done.stderr).strip().splitlines()[:1] or [f"exit {done.returncode}"]
            raise WorkspaceError(f"git merge-tree (in {self.repo_path}): {line[0]}")
        return sorted({p for p in _text(done.stdout).split("\0")[1:] if p.strip()})

    def bring_base_in(self, path: Path, target: str, *, since: str, mode: str) -> list[str]:
        """Bring the base commit ``target`` into the worktree at ``since``, uncommitted.

        ``merge``: ``git merge --no-commit target`` (the next commit concludes the merge).
        ``rebase``: the branch's whole change since its merge base is replayed onto
        ``target`` (``git apply --3way``), so the next commit is one commit on the base.
        Conflicts stay in the files, with markers; returns the conflicting paths.
        """
        self.reset(path, since)
        if mode == "rebase":
            old_base = self._git(path, "merge-base", since, target)
            _, patch = self._call(path, ["diff", "--binary", "--no-color", old_base, since])
            self._git(path, "reset", "-q", "--hard", target)
            if patch.strip():
                gitdir = Path(self._git(path, "rev-parse", "--absolute-git-dir"))
                patch_file = gitdir / "opus-rebase.patch"
                patch_file.write_bytes(patch)
                try:
                    self._call(path, ["apply", "--3way", str(patch_file)], ok=(0, 1))
                finally:
                    patch_file.unlink(missing_ok=True)
        else:
            args = ["merge", "-q", "--no-commit", "--no-ff", "--no-verify", target]
            self._call(path, args, opts=_COMMIT, ok=(0, 1))
        _, out = self._call(path, ["diff", "--name-only", "--diff-filter=U", "-z"])
        return sorted({p for p in _text(out).split("\0") if p})

    # -- delivery ---------------------------------------------------------------------------

    def merge(self, branch: str, message: str) -> str:
        """Merge ``branch`` into the base (fast-forward, else a merge commit); return the new base.

        Where the base is checked out, the merge runs there and that tree must be clean;
        otherwise (or in a bare repository) it runs in a temporary detached worktree and
        the base ref moves with a compare-and-swap ``update-ref``. A conflict aborts the
        merge, leaves the base untouched and raises ``MergeConflict``.
        """
        with self._lock():
            if not self._ok(self.repo_path, "rev-parse", "-q", "--verify", f"refs/heads/{branch}"):
                raise WorkspaceError(f"branch '{branch}' not found in {self.repo_path}")
            old = self.base_commit()
            if self.is_merged(branch):
                log.info("%s is already merged into %s", branch, self.base)
                return old
            checkout = self._checkout_of_base()
            if checkout is not None:
                new = self._merge_in_checkout(checkout, branch, message)
            else:
                new = self._merge_detached(old, branch, message)
        log.info("merged %s into %s: %s → %s", branch, self.base, old[:12], new[:12])
        return new

    def push(
        self,
        path: Path,
        branch: str,
        remote: str,
        token: str | None,
        *,
        force: bool = False,
        replaces: str | None = None,
    ) -> None:
        """Push ``branch`` to ``remote``; a token travels in git's environment config only.
        ``force``: the branch was rewritten (``--force-with-lease``). ``replaces``: the commit
        the remote branch must be at to be replaced (an earlier job's, the branch reset for
        a retry), and nothing else."""
        env, hidden = _auth(token)
        ref = f"refs/heads/{branch}"
        lease = (
            [f"--force-with-lease={ref}:{replaces}"]
            if replaces
            else ["--force-with-lease"]
            if force
            else []
        )
        self._call(
            path,
            ["push", "--no-verify", *lease, remote, f"{ref}:{ref}"],
            env=env,
            hidden=hidden,
            timeout=PUSH_TIMEOUT,
        )
        log.info("pushed %s to %s", branch, remote)

    def remote_head(self, branch: str, remote: str, token: str | None) -> str | None:
        """The commit ``branch`` is at on ``remote`` (None: the remote has no such branch)."""
        env, hidden = _auth(token)
        ref = f"refs/heads/{branch}"
        _, out = self._call(
            self.repo_path, ["ls-remote", remote, ref], env=env, hidden=hidden, timeout=PUSH_TIMEOUT
        )
        for line in _text(out).splitlines():
            sha, _, name = line.partition("\t")
            if name == ref:
                return sha
        return None

    # -- internals --------------------------------------------------------------------------

    @property
    def _base_ref(self) -> str:
        return f"refs/heads/{self.base}"

    def _lock(self) -> threading.Lock:
        key = str(self.repo_path.absolute())
        with _LOCKS_GUARD:
            return _LOCKS.setdefault(key, threading.Lock())

    def _existing(self, path: Path, branch: str) -> Created:
        real = os.path.realpath(path)
        entry = next((w for w in self._worktrees() if os.path.realpath(w.path) == real), None)
        if entry is None:
            raise WorkspaceError(f"{path} exists and is not a worktree of {self.repo_path}")
        name = (entry.branch or "").removeprefix("refs/heads/")
        if name != branch and not re.fullmatch(re.escape(branch) + r"-\d+", name):
            raise WorkspaceError(f"worktree {path} is on {name or 'a detached HEAD'}, not {branch}")
        base = self._git(path, "merge-base", self._base_ref, "HEAD")
        log.debug("reusing worktree %s on branch %s", path, name)
        return Created(path, name, base)

    def _disposable(self, branch: str, reusable: Collection[str]) -> bool:
        """Whether ``branch`` may be reset: checked out nowhere, its tip opus's own work of
        an earlier job (``reusable``) or already merged into the base."""
        ref = f"refs/heads/{branch}"
        status, out = self._call(self.repo_path, ["rev-parse", "-q", "--verify", ref], ok=(0, 1))
        tip = _text(out).strip()
        if status != 0 or not tip:
            return False
        if any(w.branch == ref for w in self._worktrees()):
            return False
        return tip in reusable or self._ok(
            self.repo_path, "merge-base", "--is-ancestor", ref, self._base_ref
        )

    def _free_branch(self, branch: str) -> str:
        taken = set(
            self._git(self.repo_path, "for-each-ref", "--format=%(refname)", "refs/heads/").split()
        )
        name, n = branch, 1
        while f"refs/heads/{name}" in taken:
            n += 1
            name = f"{branch}-{n}"
        return name

    def _worktrees(self) -> list[_Entry]:
        entries: list[_Entry] = []
        out = self._git(self.repo_path, "worktree", "list", "--porcelain")
        for block in out.split("\n\n"):
            fields: dict[str, str] = {}
            for line in block.splitlines():
                key, _, value = line.partition(" ")
                fields[key] = value
            if "worktree" in fields:
                entries.append(_Entry(fields["worktree"], fields.get("branch"), "bare" in fields))
        return entries

    def _checkout_of_base(self) -> Path | None:
        for entry in self._worktrees():
            if entry.branch == self._base_ref and not entry.bare and Path(entry.path).is_dir():
                return Path(entry.path)
        return None

    def _merge_in_checkout(self, tree: Path, branch: str, message: str) -> str:
        if self._ok(tree, "rev-parse", "-q", "--verify", "MERGE_HEAD"):
            raise WorkspaceError(f"cannot merge {branch}: a merge is in progress in {tree}")
        if self._git(tree, "status", "--porcelain", "--untracked-files=no"):
            raise WorkspaceError(
                f"cannot merge {branch} into {self.base}: {tree} has uncommitted changes"
            )
        self._merge_here(tree, branch, message)
        return self.head(tree)

    def _merge_detached(self, old: str, branch: str, message: str) -> str:
        tmp = self.worktrees_dir.absolute() / f".merge-{secrets.token_hex(4)}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        self._git(self.repo_path, "worktree", "add", "-q", "--detach", str(tmp), old)
        try:
            self._merge_here(tmp, branch, message)
            new = self.head(tmp)
        finally:
            self._drop(tmp)
        reason = f"opus: merge {branch}"
        self._git(self.repo_path, "update-ref", "-m", reason, self._base_ref, new, old, opts=_QUIET)
        return new

    def _drop(self, tmp: Path) -> None:
        """Remove a temporary worktree; a failure is logged, never raised over the real one."""
        try:
            self._git(self.repo_path, "worktree", "remove", "--force", str(tmp))
        except WorkspaceError as e:
            log.warning("could not remove temporary worktree %s: %s", tmp, e)

    def _merge_here(self, tree: Path, branch: str, message: str) -> None:
        args = ["merge", "-q", "--no-edit", "--no-verify", "--ff", "-m", message]
        try:
            self._git(tree, *args, f"refs/heads/{branch}", opts=_COMMIT)
        except WorkspaceError as e:
            if not self._ok(tree, "rev-parse", "-q", "--verify", "MERGE_HEAD"):
                raise
            _, out = self._call(tree, ["diff", "--name-only", "--diff-filter=U", "-z"])
            paths = sorted(p for p in _text(out).split("\0") if p)
            self._git(tree, "merge", "--abort")
            raise MergeConflict(branch, self.base, paths) from e

    def _env(self, extra: Mapping[str, str]) -> dict[str, str]:
        name, email = self.author
        return {
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_AUTHOR_NAME": name,
            "GIT_AUTHOR_EMAIL": email,
            "GIT_COMMITTER_NAME": name,
            "GIT_COMMITTER_EMAIL": email,
            **extra,
        }

    def _git(self, cwd: Path, *args: str, opts: Sequence[str] = ()) -> str:
        _, out = self._call(cwd, list(args), opts=opts)
        return _text(out).rstrip("\n")

    def _ok(self, cwd: Path, *args: str) -> bool:
        """Run a yes/no command: exit 0 → True, 1 → False, anything else raises."""
        status, _ = self._call(cwd, list(args), ok=(0, 1))
        return status == 0

    def _call(
        self,
        cwd: Path,
        args: list[str],
        *,
        opts: Sequence[str] = (),
        ok: Sequence[int] = (0,),
        env: Mapping[str, str] | None = None,
        hidden: Sequence[str] = (),
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        import git
        from git.exc import CommandError

        command = ["git", "-C", os.fspath(cwd), *opts, *args]
        try:
            out = git.Git().execute(
                command,
                env=self._env(env or {}),
                stdout_as_string=False,
                strip_newline_in_stdout=False,
                kill_after_timeout=timeout,
            )
        except CommandError as e:
            if isinstance(e.status, int) and e.status in ok:
                return e.status, b""
            line = _first_error_line(e)
            scrub = Redactor(hidden)
            message = scrub(f"git {' '.join(args)} (in {cwd}): {line}")
            message = _URL_CREDENTIALS.sub("***@", re.sub(r"\s+", " ", message))
            raise WorkspaceError(message) from e
        return 0, out


def _auth(token: str | None) -> tuple[dict[str, str], list[str]]:
    """git's environment for a remote that takes ``token`` (in config, never in a URL or an
    argument), and what to scrub from errors."""
    if not token:
        return {}, []
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode("ascii")
    env = {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "http.extraheader",
        "GIT_CONFIG_VALUE_0": f"AUTHORIZATION: basic {basic}",
    }
    return env, [token, basic]


def read_head(worktree: Path) -> str | None:
    """The commit a worktree's (or checkout's) HEAD names, from git's files; None when that
    takes more than plain files (``git rev-parse`` answers then)."""
    found = _head_file(worktree)
    if found is None:
        return None
    gitdir, head = found
    if _SHA.fullmatch(head):
        return head
    if not head.startswith("ref: refs/"):
        return None
    return _resolve(gitdir, head.removeprefix("ref: "))


def read_head_ref(worktree: Path) -> str | None:
    """The ref a worktree's HEAD is on, from git's files: ``refs/heads/…``, "" when HEAD is
    detached, None when the files do not say (``git symbolic-ref`` answers then)."""
    found = _head_file(worktree)
    if found is None:
        return None
    head = found[1]
    if _SHA.fullmatch(head):
        return ""
    return head.removeprefix("ref: ") if head.startswith("ref: refs/") else None


def _head_file(worktree: Path) -> tuple[Path, str] | None:
    """The worktree's git folder and what its ``HEAD`` file says, or None."""
    gitdir = _gitdir(worktree)
    if gitdir is None:
        return None
    try:
        return gitdir, (gitdir / "HEAD").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def read_ref(repo: Path, ref: str) -> str | None:
    """The commit ``ref`` (``refs/heads/…``) names in ``repo``, from its files, or None."""
    gitdir = _gitdir(repo)
    return _resolve(gitdir, ref) if gitdir is not None else None


def _gitdir(path: Path) -> Path | None:
    """``path/.git``, the folder a ``.git`` file names (a worktree), or a bare ``path``."""
    dot = path / ".git"
    try:
        if dot.is_dir():
            return dot
        if not dot.exists() and (path / "HEAD").is_file() and (path / "refs").is_dir():
            return path
        text = dot.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("gitdir: "):
        return None
    gitdir = Path(text.removeprefix("gitdir: "))
    return gitdir if gitdir.is_absolute() else (path / gitdir)


def _resolve(gitdir: Path, ref: str) -> str | None:
    """A loose or packed ref of ``gitdir``'s common folder (worktrees share refs)."""
    if "/../" in ref or not ref.startswith("refs/"):
        return None
    common = gitdir
    try:
        common = gitdir / (gitdir / "commondir").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError):
        return None
    if (common / "reftable").exists():
        return None  # not files git keeps refs in any more
    try:
        value = (common / ref).read_text(encoding="ascii").strip()
        return value if _SHA.fullmatch(value) else None
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError, IsADirectoryError):
        return None
    try:
        packed = (common / "packed-refs").read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    for line in packed.splitlines():
        sha, _, name = line.partition(" ")
        if name == ref and _SHA.fullmatch(sha):
            return sha
    return None


def _merging(worktree: Path) -> bool:
    """A merge in progress (``MERGE_HEAD`` in the worktree's git folder)."""
    gitdir = _gitdir(worktree)
    return gitdir is not None and (gitdir / "MERGE_HEAD").exists()


_SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")


def _marked(root: Path, paths: Sequence[str]) -> list[str]:
    """Of ``paths``, the text files that hold both a ``<<<<<<<`` and a ``>>>>>>>`` line."""
    found = []
    for rel in paths:
        file = root / rel
        try:
            if file.is_symlink() or not file.is_file():
                continue
            data = file.read_bytes()
        except OSError:
            continue
        if b"\0" not in data[:8000] and _MARK_START.search(data) and _MARK_END.search(data):
            found.append(rel)
    return found


def _text(out: bytes) -> str:
    return out.decode("utf-8", errors="replace")


def _first_error_line(e: CommandError) -> str:
    """git's first error line (``fatal:``, ``error:``, ``! [rejected]``…), else its first line."""
    if isinstance(e.status, Exception):
        return f"{type(e.status).__name__}: {e.status}"
    stderr = e.stderr.removeprefix("\n  stderr: '").removesuffix("'")
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    first = next((line for line in lines if _ERROR_LINE.match(line)), None)
    return first or (lines[0] if lines else f"exit status {e.status}")


def worktree_fingerprint(root: Path) -> str:
    """A digest of every path, size and mtime under ``root`` (``.git`` skipped)."""
    digest = hashlib.blake2b(digest_size=16)
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name == ".git":
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            digest.update(
                f"{entry.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(errors="replace")
            )
            if is_dir:
                stack.append(entry.path)
    return digest.hexdigest()

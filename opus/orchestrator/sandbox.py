"""The sandbox around every agent process (SPEC §17): the one place that knows bubblewrap.

:func:`open_sandbox` runs once at start-up: it finds ``bwrap``, probes it once and finds a
delegated cgroup for ``memory_max``. For each agent process, :meth:`Sandbox.wrap` turns a
:class:`Policy` (what that stage may see and write) into the argv prefix that runs it:

- the host read-only (``--ro-bind / /``), a fresh ``/dev`` and ``/proc``;
- hidden behind empty read-only tmpfs: the vault, the state folder, the real HOME;
- bound back: the worktree (writable for the coder and the tester), the repository's git
  directory (read-only; for the coder its objects, the worktree's own git folder and its
  branch's ref and reflog folders writable), the FR's note read-only, the job's artifact
  folder writable (``$OPUS_ARTIFACTS``: an agent may leave files there) with every file
  opus wrote there before the stage read-only over it (events, prompts, logs, plan,
  reviews), the output file writable, a private TMPDIR, a
  private HOME per job holding only the preset's ``home_paths`` and ``[sandbox] home_binds``
  (folders bound, files copied in), ``[sandbox] paths`` writable, and where the program
  itself lives when that is hidden (its install prefix, its ``#!`` interpreter's, the files
  its arguments name);
- its own PID namespace that dies with it (``--unshare-pid --die-with-parent``), and with
  ``network = false`` its own network namespace (loopback only).

Mounts are applied from the shallowest path to the deepest, so whatever lies inside a folder
is bound after (over) the folder, and paths are resolved (symlinks) before they are bound.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio

from .cgroups import Delegated, StageCgroup, find_delegated
from .config import Config
from .errors import AgentNotFound, ConfigError
from .lifecycle import Stage

if TYPE_CHECKING:
    from .agents.base import StageContext
    from .doctor import Check

__all__ = (
    "GitPaths",
    "Policy",
    "Sandbox",
    "bwrap_args",
    "doctor_checks",
    "exit_signal",
    "git_paths",
    "memory_problem",
    "open_sandbox",
    "probe",
    "sandbox_problems",
)

log = logging.getLogger(__name__)

INSTALL = "install bubblewrap (Debian/Ubuntu: apt install bubblewrap)"
WRITABLE_WORKTREE = frozenset({Stage.CODER, Stage.TESTER})


@dataclass(frozen=True)
class GitPaths:
    """Where a worktree's git data lives."""

    common: Path
    """The repository's git directory (objects, refs, config)."""
    own: Path | None
    """The worktree's own folder, ``<common>/worktrees/<name>`` (HEAD, index, logs)."""
    ref_dirs: tuple[Path, ...]
    """The folders of its branch's ref and reflog (a commit replaces files in them)."""


def git_paths(worktree: Path) -> GitPaths | None:
    """The git folders of ``worktree`` (a linked worktree or a checkout), read from disk."""
    dotgit = worktree / ".git"
    try:
        if dotgit.is_dir():
            common, own, head = dotgit, None, dotgit / "HEAD"
        else:
            text = dotgit.read_text(encoding="utf-8").strip()
            if not text.startswith("gitdir:"):
                return None
            own = (worktree / text[len("gitdir:") :].strip()).resolve()
            common = (own / (own / "commondir").read_text(encoding="utf-8").strip()).resolve()
            head = own / "HEAD"
        ref = head.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    refs: tuple[Path, ...] = ()
    if ref.startswith("ref: refs/"):
        name = ref[len("ref: ") :]
        refs = ((common / name).parent, (common / "logs" / name).parent)
    return GitPaths(common, own, refs)


@dataclass(frozen=True)
class Policy:
    """What one agent process may see and write (paths absolute)."""

    worktree: Path
    worktree_writable: bool
    git: GitPaths | None
    git_writable: bool
    fr_file: Path
    artifacts: Path
    """The job's artifact folder: writable, but for ``artifact_files``."""
    prompt_file: Path
    output_file: Path
    tmp: Path
    home: Path
    """The HOME path the agent is told (the real HOME's)."""
    private_home: Path | None
    """Bound at ``home``; None: the real HOME, read-only."""
    artifact_files: tuple[Path, ...] = ()
    """The files in ``artifacts`` as the stage starts (opus's: events, prompts, logs, plan,
    reviews): read-only over the writable folder, so an agent adds files but changes none."""
    home_dirs: tuple[str, ...] = ()
    """Folders of the real HOME (relative) bound writable at the same place."""
    hidden: tuple[Path, ...] = ()
    writable: tuple[Path, ...] = ()
    readable: tuple[Path, ...] = ()
    network: bool = True


@dataclass(frozen=True)
class _Mount:
    op: str
    dest: str
    source: str | None = None

    def args(self) -> list[str]:
        return [self.op, self.dest] if self.source is None else [self.op, self.source, self.dest]


def bwrap_args(policy: Policy) -> list[str]:
    """The bubblewrap options for ``policy`` (everything before ``--``)."""
    mounts: list[_Mount] = []

    def bind(path: Path, writable: bool, *, source: Path | None = None, must: bool = True) -> None:
        op = ("--bind" if writable else "--ro-bind") + ("" if must else "-try")
        src = os.path.realpath(source or path)
        dests = dict.fromkeys([os.path.realpath(path), os.path.normpath(path)])
        for dest in dests:  # also where the agent is told it is, if a symlink differs
            mounts.append(_Mount(op, dest, src))

    for path in policy.readable:
        bind(path, False, must=False)
    for path in policy.writable:
        bind(path, True, must=False)
    hidden = list(dict.fromkeys(os.path.realpath(p) for p in policy.hidden))
    mounts += [_Mount("--tmpfs", p) for p in hidden]
    if policy.git is not None:
        bind(policy.git.common, False)
        if policy.git.own is not None:
            bind(policy.git.own, policy.git_writable)
        if policy.git_writable:
            bind(policy.git.common / "objects", True)
            for folder in policy.git.ref_dirs:
                bind(folder, True)
    bind(policy.worktree, policy.worktree_writable)
    bind(policy.artifacts, True)
    for file in policy.artifact_files:
        bind(file, False)
    bind(policy.prompt_file, False)
    bind(policy.output_file, True)
    bind(policy.fr_file, False)
    bind(policy.tmp, True)
    if policy.private_home is not None:
        bind(policy.home, True, source=policy.private_home)
    for rel in policy.home_dirs:
        bind(policy.home / rel, True, must=False)
    mounts.sort(key=lambda m: len(Path(m.dest).parts))  # stable: order kept within a depth
    args = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for mount in mounts:
        args += mount.args()
    for hidden_path in hidden:  # after everything inside them got its mount point
        args += ["--remount-ro", hidden_path]
    args += ["--unshare-pid", "--unshare-ipc", "--die-with-parent"]
    if not policy.network:
        args.append("--unshare-net")
    args += ["--chdir", os.path.realpath(policy.worktree)]
    return args


def exit_signal(returncode: int) -> int | None:
    """The signal that ended a sandboxed process: bubblewrap reports it as 128 + N."""
    return returncode - 128 if 128 < returncode < 128 + 65 else None


# -- where the program lives ----------------------------------------------------------------


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _prefix(path: str, roots: Sequence[str]) -> str:
    """The install prefix of an executable: the folder holding its ``bin``, else its folder —
    but never a hidden root or a folder holding one (then the narrower one, or the file)."""
    p = Path(path)
    bins = [a for a in p.parents if a.name == "bin"]
    for candidate in ([str(bins[0].parent), str(bins[0])] if bins else []) + [str(p.parent)]:
        if not any(r == candidate or _under(r, [candidate]) for r in roots):
            return candidate
    return path


def _locate(exe: str, path_var: str | None, cwd: Path) -> str | None:
    if os.sep in exe:
        full = cwd / exe  # (an absolute exe stays itself)
        return str(full) if full.is_file() and os.access(full, os.X_OK) else None
    return shutil.which(exe, path=path_var)


def _interpreter(exe: str, path_var: str | None) -> str | None:
    try:
        with open(exe, "rb") as f:
            line = f.readline(256)
    except OSError:
        return None
    if not line.startswith(b"#!"):
        return None
    words = line[2:].decode("utf-8", "replace").split()
    if words and Path(words[0]).name == "env":
        words = [w for w in words[1:] if not w.startswith("-")]
        return shutil.which(words[0], path=path_var) if words else None
    return words[0] if words else None


def program_paths(
    argv: Sequence[str], env: Mapping[str, str], cwd: Path, hidden: Sequence[Path], state: Path
) -> list[Path]:
    """What must stay readable for ``argv`` to run when it lives in a hidden folder.

    AgentNotFound (from FileNotFoundError) when ``argv[0]`` does not exist: inside, bwrap
    could only say so with an exit status a tester would take for failing tests.
    """
    path_var = env.get("PATH")
    exe = _locate(argv[0], path_var, cwd)
    if exe is None:
        raise AgentNotFound(f"`{argv[0]}` not found") from FileNotFoundError(2, "", argv[0])
    roots = [os.path.realpath(h) for h in hidden]
    found: list[str] = []
    interp = _interpreter(exe, path_var)
    for program in filter(None, (exe, interp)):
        for each in dict.fromkeys([os.path.normpath(program), os.path.realpath(program)]):
            if _under(each, roots):
                found.append(_prefix(each, roots))
    real_state = os.path.realpath(state)
    for arg in argv[1:]:
        if Path(arg).is_absolute() and Path(arg).is_file():
            real = os.path.realpath(arg)
            if _under(real, roots) and not _under(real, [real_state]):
                found.append(arg)
    return [Path(p) for p in dict.fromkeys(found)]


# -- start-up -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def probe(bwrap: str) -> str | None:
    """Run bubblewrap once with the options opus uses; None if it works, else why not."""
    argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-pid",
            "--unshare-ipc", "--unshare-net", "--die-with-parent", "true"]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{bwrap}` cannot run: {e}"
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return f"`{bwrap}` does not work here ({said[0]}; are user namespaces allowed?)"
    return None


def _bwrap_problem(environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(path of a working bwrap, None) or (None, why there is none)."""
    found = shutil.which("bwrap", path=environ.get("PATH", os.defpath))
    if found is None:
        return None, f"`bwrap` not found on PATH; {INSTALL}"
    problem = probe(found)
    return (None, problem) if problem else (found, None)


bwrap_problem = _bwrap_problem
"""(a working bwrap, None) or (None, why not): for a cluster node's own check (SPEC §18)."""


def memory_problem(config: Config, *, prepare: bool = False) -> Delegated | str | None:
    """None when no ``memory_max`` is set; else the cgroup that enforces it, or why none does."""
    if config.sandbox.memory_max is None:
        return None
    found = find_delegated(prepare=prepare)
    if isinstance(found, str):
        return f"[sandbox] memory_max = {config.sandbox.memory_max!r} is not enforced: {found}"
    return found


def sandbox_problems(config: Config, environ: Mapping[str, str] | None = None) -> list[str]:
    """What ``opus validate`` and ``opus doctor`` say about the sandbox, one line each."""
    env = os.environ if environ is None else environ
    kind = config.sandbox.kind
    problems: list[str] = []
    if kind == "none":
        return []
    _, problem = _bwrap_problem(env)
    if problem is not None:
        tail = "opus will not start" if kind == "bwrap" else "agents run unsandboxed"
        problems.append(f'{config.source}: [sandbox] kind = "{kind}": {problem}; {tail}')
    memory = memory_problem(config)
    if isinstance(memory, str):
        problems.append(f"{config.source}: {memory}")
    for raw in config.sandbox.paths:
        if not config.resolve(raw).is_dir():
            problems.append(f"{config.source}: [sandbox] paths: {raw} is not a folder")
    return problems


def doctor_checks(config: Config, environ: Mapping[str, str]) -> Iterator[Check]:
    """``opus doctor``'s sandbox lines (``doctor.check_sandbox`` calls this): bubblewrap found
    and working, and whether ``memory_max`` is enforced."""
    from .doctor import Check

    kind = config.sandbox.kind
    if kind == "none":
        yield Check("sandbox", True, 'off ([sandbox] kind = "none")')
        return
    bwrap, problem = _bwrap_problem(environ)
    if bwrap is not None:
        yield Check("sandbox", True, f"bubblewrap {bwrap} works (PID and network namespaces)")
    else:
        tail = "agents run unsandboxed" if kind == "auto" else "opus will not start"
        yield Check("sandbox", kind == "auto", f'kind = "{kind}": {problem}; {tail}')
    memory = memory_problem(config)
    if isinstance(memory, str):
        yield Check("sandbox memory_max", False, memory)
    elif memory is not None:
        limit = config.sandbox.memory_max
        yield Check("sandbox memory_max", True, f"{limit} per agent process (cgroup {memory.path})")


def open_sandbox(config: Config, environ: Mapping[str, str] | None = None) -> Sandbox | None:
    """The sandbox of this run, or None (off, or ``auto`` without a working bwrap: warned).

    ConfigError when ``kind = "bwrap"`` and bubblewrap is missing or does not work.
    """
    env = os.environ if environ is None else environ
    kind = config.sandbox.kind
    if kind == "none":
        log.info('sandbox: off ([sandbox] kind = "none")')
        return None
    bwrap, problem = _bwrap_problem(env)
    if bwrap is None:
        if kind == "bwrap":
            raise ConfigError(f'[sandbox] kind = "bwrap" in {config.source}: {problem}')
        log.warning("sandbox: agents run UNSANDBOXED: %s (or set [sandbox] kind)", problem)
        return None
    memory = memory_problem(config, prepare=True)
    if isinstance(memory, str):
        log.warning("sandbox: %s", memory)
    home = Path(env.get("HOME") or Path.home())
    log.info("sandbox: bubblewrap %s", bwrap)
    return Sandbox(
        bwrap=bwrap,
        vault=config.root.absolute(),
        state=config.state_dir.absolute(),
        home=home,
        paths=tuple(config.resolve(p) for p in config.sandbox.paths),
        home_binds=tuple(_home_relative(p, home) for p in config.sandbox.home_binds),
        memory_max=config.sandbox.memory_max,
        cgroup=memory if isinstance(memory, Delegated) else None,
    )


def _home_relative(raw: str, home: Path) -> str:
    path = Path(raw).expanduser()
    if path.is_absolute():
        try:
            return str(path.relative_to(home))
        except ValueError:
            raise ConfigError(f"[sandbox] home_binds: {raw} is not inside HOME ({home})") from None
    return raw


# -- one process ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sandbox:
    """bubblewrap, and what every policy of this run shares."""

    bwrap: str
    vault: Path
    state: Path
    home: Path
    paths: tuple[Path, ...] = ()
    home_binds: tuple[str, ...] = ()
    memory_max: str | None = None
    cgroup: Delegated | None = None

    @asynccontextmanager
    async def wrap(
        self,
        ctx: StageContext,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        network: bool = True,
        home: Literal["private", "real"] = "private",
        home_paths: Sequence[str] = (),
    ) -> AsyncIterator[tuple[list[str], dict[str, str]]]:
        """The sandboxed argv and environment of one agent process; cleans up after it."""
        policy, cgroup = await anyio.to_thread.run_sync(
            lambda: self._prepare(ctx, argv, env, network, home, home_paths)
        )
        try:
            head = [self.bwrap, *bwrap_args(policy), "--"]
            if cgroup is not None:  # the pid goes into the cgroup, then sh becomes bwrap
                head = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup.procs), *head]
            yield [*head, *argv], {**env, "TMPDIR": str(policy.tmp), "HOME": str(self.home)}
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._cleanup, policy, cgroup)

    def _prepare(
        self,
        ctx: StageContext,
        argv: Sequence[str],
        env: Mapping[str, str],
        network: bool,
        home: str,
        home_paths: Sequence[str],
    ) -> tuple[Policy, StageCgroup | None]:
        hidden = [self.vault, self.state]  # (a private HOME covers the real one)
        covered = [*hidden, self.home] if home == "private" else hidden
        readable = program_paths(argv, env, ctx.worktree, covered, self.state)
        folder = self.state / "sandbox" / ctx.job_id
        folder.parent.mkdir(mode=0o700, exist_ok=True)  # (state folders 0700: SPEC §8)
        folder.mkdir(mode=0o700, exist_ok=True)
        tmp = folder / f"tmp-{ctx.stage}-{ctx.iteration}-{secrets.token_hex(3)}"
        tmp.mkdir(mode=0o700)
        private = folder / "home" if home == "private" else None
        if private is not None:
            private.mkdir(mode=0o700, exist_ok=True)
        ctx.output_file.touch(mode=0o600)  # bound writable: it must exist (empty = no answer)
        git = git_paths(ctx.worktree)
        coder = ctx.stage is Stage.CODER
        if git is not None and coder:
            for ref_dir in git.ref_dirs:
                ref_dir.mkdir(parents=True, exist_ok=True)
        dirs: list[str] = []
        for rel in dict.fromkeys([*home_paths, *self.home_binds]):
            source = self.home / rel
            if source.is_dir():
                dirs.append(rel)
            elif source.is_file() and private is not None:  # copied: CLIs replace their files
                (private / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, private / rel)
        own = {ctx.prompt_file, ctx.output_file}  # (bound on their own)
        files = tuple(
            p
            for p in sorted(ctx.artifacts.iterdir())
            if p not in own and not p.is_symlink() and p.is_file()
        )
        policy = Policy(
            artifact_files=files,
            worktree=ctx.worktree,
            worktree_writable=ctx.stage in WRITABLE_WORKTREE,
            git=git,
            git_writable=coder,
            fr_file=ctx.fr.path.absolute(),
            artifacts=ctx.artifacts,
            prompt_file=ctx.prompt_file,
            output_file=ctx.output_file,
            tmp=tmp,
            home=self.home,
            private_home=private,
            home_dirs=tuple(dirs),
            hidden=(*hidden, *_runtime_dirs()),
            writable=self.paths,
            readable=tuple(readable),
            network=network,
        )
        cgroup = None
        if self.cgroup is not None and self.memory_max is not None:
            cgroup = self.cgroup.child(f"{ctx.job_id}-{ctx.stage}", self.memory_max)
        return policy, cgroup

    def discard(self, job_id: str) -> None:
        """Remove a finished job's private HOME and temp folders."""
        shutil.rmtree(self.state / "sandbox" / job_id, ignore_errors=True)

    @staticmethod
    def _cleanup(policy: Policy, cgroup: StageCgroup | None) -> None:
        shutil.rmtree(policy.tmp, ignore_errors=True)
        if cgroup is not None:
            cgroup.close()


def _runtime_dirs() -> list[Path]:
    """The user's runtime folder (agent sockets: ssh, gpg, D-Bus), hidden too."""
    run = Path(f"/run/user/{os.getuid()}")
    return [run] if run.is_dir() else []

"""A cluster node's side of a remote stage (SPEC §18): ``run_stage``.

It takes the start commit as a bundle into the node's cache, checks it out in a private
folder, builds the stage's agent from the same config section the head would use, and runs it
under the same supervision. It yields the stage log while it grows and then a
``RemoteOutcome``: the result or the agent's own error, the coder's changes as a bundle, the
output file and the artifacts the agent wrote.

Nothing here imports Ray: ``remote`` runs ``run_stage`` as a Ray task (a warm worker process
of the node's pool, not a process per stage).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from ... import __version__
from ..config import AgentSection, SandboxSection
from ..errors import AgentCrashed, AgentError, AgentNotFound, WorkspaceError
from ..lifecycle import Stage
from ..models import FeatureRequest, Feedback
from ..redact import Redactor
from ..sandbox import Sandbox, bwrap_problem
from ..supervisor import run_process
from .base import Agent, StageContext, StageResult
from .bundles import KEEP_REFS, NodeCache, bundle_changes
from .environment import agent_env, opus_vars

__all__ = ("Hello", "RemoteOutcome", "RemoteStage", "cache_root", "run_stage", "versions")

MAX_ARTIFACTS = 8 * 2**20
"""Bytes of new artifacts a stage brings back at most."""
LOG_POLL = 0.1
"""Seconds between two looks at the stage log's growth."""


def versions() -> str:
    """What must match between the head and a node: Python's minor version and opus's."""
    return f"Python {sys.version_info.major}.{sys.version_info.minor}, opus {__version__}"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "opus" / "remote"


@dataclass
class RemoteStage:
    """One stage attempt as the head hands it over (a task argument: memory only)."""

    section: AgentSection
    stage: Stage
    iteration: int
    job_id: str
    fr: FeatureRequest
    note: str
    prompt: str
    plan: str | None
    feedback: Feedback | None
    base_commit: str
    start: str
    repo_key: str
    timeout: float
    stall_timeout: float
    retries: int
    setup: str
    env: dict[str, str] = field(default_factory=dict)
    redact: list[str] = field(default_factory=list)
    sandbox: SandboxSection | None = None
    """The head's ``[sandbox]``: the node sandboxes the agent the same way (SPEC §17)."""
    vault: str = ""
    """The head's vault folder: hidden from the agent where it exists on the node too."""


@dataclass
class RemoteOutcome:
    node: str
    host: str
    result: StageResult | None = None
    error: AgentError | None = None
    changes: tuple[bytes, str, bool] | None = None
    output: bytes | None = None
    artifacts: dict[str, bytes] = field(default_factory=dict)
    received: int = 0
    """Bytes of bundle this stage pulled (0: the node's cache had the start commit)."""
    have: list[str] = field(default_factory=list)
    """Commits the node's cache holds since this stage (the head's guide for thin bundles)."""


def _restore_sigchld() -> None:
    """Ray's subreaper option ignores SIGCHLD in workers, which makes every child's exit
    status read 0 (or 255): put the default back so agents' exit codes mean something."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.signal(int(signal.SIGCHLD), None)  # SIG_DFL


@dataclass
class Hello:
    """A stage's first word from its node: it was placed there, and what it runs."""

    node: str
    host: str
    versions: str


def run_stage(
    job: RemoteStage, fetch: Callable[[int], bytes | None], node: str
) -> Iterator[Hello | bytes | RemoteOutcome]:
    """One stage attempt on this node: ``Hello`` first, then chunks of the stage log as it
    grows, then the ``RemoteOutcome``. ``fetch(0)`` is the thin bundle of the start commit
    (against what the head believes the nodes hold; None when it knows nothing), ``fetch(1)``
    the whole one: only the one needed travels."""
    _restore_sigchld()
    before = _children()
    yield Hello(node=node, host=socket.gethostname(), versions=versions())
    stage = _Stage(job, node)
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["outcome"] = anyio.run(stage.run, fetch)
        except BaseException as e:  # handed to the head below, with its traceback
            box["error"] = e

    runner = threading.Thread(target=work, name=f"opus-{job.job_id}", daemon=True)
    runner.start()
    offset = 0
    while runner.is_alive():
        runner.join(LOG_POLL)
        while chunk := stage.read_log(offset):
            offset += len(chunk)
            yield chunk
    while chunk := stage.read_log(offset):
        offset += len(chunk)
        yield chunk
    stage.close()
    _kill_strays(before)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    outcome = box["outcome"]
    assert isinstance(outcome, RemoteOutcome)
    yield outcome


def stage_root() -> Path:
    """The folder (0700) every stage folder of this node's user lives in: the sandbox hides
    it whole, and gives each agent back only its own stage's parts (SPEC §17: other jobs'
    checkouts are not visible)."""
    root = Path(tempfile.gettempdir()) / f"opus-stages-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    info = root.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise AgentCrashed(f"{root} is not a folder of this user's: stages cannot run here")
    root.chmod(0o700)
    return root


class _Stage:
    """The stage's private folder on this node, its agent and what it brings back."""

    def __init__(self, job: RemoteStage, node: str) -> None:
        self.job = job
        self.node = node
        root = stage_root()
        guard = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:  # one stage at a time sweeps, or makes its folder and locks it
            fcntl.flock(guard, fcntl.LOCK_EX)
            _sweep(root)
            self.tmp = Path(tempfile.mkdtemp(prefix=f"opus-{job.job_id}-", dir=root))
            # held while the stage lives: a folder whose lock is free was left by a worker
            # that was killed (a cancelled stage), and the next stage here removes it
            self._lock = os.open(self.tmp, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(guard)
        self.log: Path | None = None

    def read_log(self, offset: int) -> bytes:
        return _read_from(self.log, offset) if self.log is not None else b""

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(self.tmp.parent / "sandbox" / self.job.job_id, ignore_errors=True)
        os.close(self._lock)

    def _receive(self, cache: NodeCache, fetch: Callable[[int], bytes | None]) -> int:
        """Bring the start commit into the node's cache; the bundle bytes that took."""
        start = self.job.start
        if cache.holds(start):
            return 0  # its ref is there: nothing to fetch
        thin = fetch(0)
        if thin is not None:
            try:
                cache.receive(thin, start)
                return len(thin)
            except WorkspaceError:  # the cache lacks what the thin bundle builds on
                pass
        full = fetch(1)
        cache.receive(full, start)
        return len(full or b"")

    async def run(self, fetch: Callable[[int], bytes | None]) -> RemoteOutcome:
        job = self.job
        outcome = RemoteOutcome(node=self.node, host=socket.gethostname())
        cache = NodeCache(cache_root(), job.repo_key)
        outcome.received = await anyio.to_thread.run_sync(self._receive, cache, fetch)
        worktree, artifacts = self.tmp / "worktree", self.tmp / "artifacts"
        artifacts.mkdir(mode=0o700)
        await anyio.to_thread.run_sync(cache.checkout, job.start, worktree)
        try:
            try:
                ctx = self._context(worktree, artifacts)
            except AgentError as e:
                outcome.error = e
                return outcome
            given = {p.name for p in artifacts.iterdir()}
            try:
                if job.setup:
                    await _setup(job, ctx)
                outcome.result = await _agent(job).run(ctx)
            except AgentError as e:
                outcome.error = e
            if outcome.error is None and job.stage is Stage.CODER:
                outcome.changes = await anyio.to_thread.run_sync(
                    bundle_changes, worktree, job.start
                )
                if outcome.changes is not None:
                    await anyio.to_thread.run_sync(cache.keep, outcome.changes[1])
            if ctx.output_file.exists():
                outcome.output = ctx.output_file.read_bytes()[:MAX_ARTIFACTS]
            skip = {*given, ctx.output_file.name, ctx.log_file.name}
            outcome.artifacts = _new_files(artifacts, skip)
        finally:
            await anyio.to_thread.run_sync(cache.drop, worktree)
        tip = [outcome.changes[1]] if outcome.changes else []
        outcome.have = [*tip, job.start]  # what this stage added; the head keeps the rest
        if cache.count() > KEEP_REFS + 16:
            await anyio.to_thread.run_sync(lambda: cache.prune(cache.have()))
        return outcome

    def _context(self, worktree: Path, artifacts: Path) -> StageContext:
        job = self.job
        note = self.tmp / "note.md"
        note.write_text(job.note, encoding="utf-8")
        note.chmod(0o444)
        stage, it = job.stage, job.iteration
        prompt_file = artifacts / f"prompt-{stage}-{it}.md"
        prompt_file.write_text(job.prompt, encoding="utf-8")
        feedback_file = None
        if job.feedback is not None:
            feedback_file = artifacts / f"feedback-{it}.json"
            feedback_file.write_text(job.feedback.model_dump_json(indent=2), encoding="utf-8")
        log_file = artifacts / f"{stage}-{it}.log"
        log_file.touch(mode=0o600)
        self.log = log_file
        return StageContext(
            stage=stage,
            iteration=it,
            job_id=job.job_id,
            fr=job.fr.model_copy(update={"path": note}),
            worktree=worktree,
            artifacts=artifacts,
            prompt=job.prompt,
            prompt_file=prompt_file,
            output_file=artifacts / f"output-{stage}-{it}",
            log_file=log_file,
            base_commit=job.base_commit,
            timeout=job.timeout,
            stall_timeout=job.stall_timeout,
            plan=job.plan,
            feedback=job.feedback,
            feedback_file=feedback_file,
            redactor=Redactor(job.redact),
            sandbox=self._sandbox(),
        )

    def _sandbox(self) -> Sandbox | None:
        """The head's ``[sandbox]`` policy with this node's bwrap, HOME and folders: the
        stage's private folder stands for the state folder (its private HOME lives there)."""
        section = self.job.sandbox
        if section is None or section.kind == "none":
            return None
        bwrap, problem = _node_bwrap(os.environ.get("PATH", ""))
        if bwrap is None:
            if section.kind == "bwrap":
                raise AgentNotFound(f'[sandbox] kind = "bwrap" but this node cannot: {problem}')
            return None
        state = self.tmp.parent  # hidden whole: every stage folder of this node
        vault = Path(self.job.vault) if self.job.vault and Path(self.job.vault).is_dir() else state
        home = Path.home()
        return Sandbox(
            bwrap=bwrap,
            vault=vault,
            state=state,
            home=home,
            paths=tuple(Path(p) for p in section.paths if Path(p).is_dir()),
            home_binds=tuple(p[2:] if p.startswith("~/") else p for p in section.home_binds),
            memory_max=section.memory_max,
        )


def _sweep(root: Path) -> None:
    """Remove the stage folders no live stage holds (left by a worker that was killed), and
    the private HOMEs of jobs with no live stage here."""
    live, stale = set(), []
    for folder in root.glob("opus-*"):
        job_id = folder.name.removeprefix("opus-").rsplit("-", 1)[0]
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stale.append((folder, job_id))
        except OSError:
            live.add(job_id)  # a running stage holds it
        finally:
            os.close(fd)
    for folder, job_id in stale:
        shutil.rmtree(folder, ignore_errors=True)
        if job_id not in live:
            shutil.rmtree(root / "sandbox" / job_id, ignore_errors=True)


@functools.cache
def _node_bwrap(path: str) -> tuple[str | None, str | None]:
    """This node's bubblewrap, probed once per worker process (a stage need not re-probe)."""
    return bwrap_problem({"PATH": path})


def _agent(job: RemoteStage) -> Agent:
    from . import build_agent

    environ = {**os.environ, **job.env}
    return build_agent(job.section, job.stage, environ=environ, retries=job.retries)


async def _setup(job: RemoteStage, ctx: StageContext) -> None:
    """``[executor] setup`` in the worktree before the agent, logged in the stage log."""
    env = agent_env(
        passthrough=job.section.env_passthrough,
        extra=job.section.env,
        opus_vars=opus_vars(ctx, ctx.fr.path),
        environ={**os.environ, **job.env},
    )
    done = await run_process(
        ["sh", "-c", job.setup],
        cwd=ctx.worktree,
        env=env,
        stdin=None,
        timeout=ctx.timeout,
        stall_timeout=ctx.stall_timeout,
        log_file=ctx.log_file,
        redactor=ctx.redactor,
        what="setup",
    )
    if done.signal is not None or done.returncode != 0:
        how = f"signal {done.signal}" if done.signal is not None else f"status {done.returncode}"
        raise AgentCrashed(f"[executor] setup failed ({how}) before {job.stage}", retryable=True)


def _children() -> set[int]:
    """This process's child processes (with the subreaper option on, whatever an agent
    daemonized lands here)."""
    found: set[int] = set()
    for children in Path("/proc/self/task").glob("*/children"):  # every thread's children
        try:
            found.update(int(pid) for pid in children.read_text().split())
        except (OSError, ValueError):
            continue
    return found


def _kill_strays(before: set[int]) -> None:
    """Kill what the stage left behind (daemonized grandchildren): its groups, then it."""
    for pid in _children() - before:
        for kill, target in ((os.killpg, pid), (os.kill, pid)):
            try:
                kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _new_files(folder: Path, skip: set[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    budget = MAX_ARTIFACTS
    for path in sorted(folder.iterdir()):
        if path.name in skip or not path.is_file():
            continue
        data = path.read_bytes()[:budget]
        budget -= len(data)
        found[path.name] = data
        if budget <= 0:
            break
    return found


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(2**20)
    except FileNotFoundError:
        return b""

"""Run agent processes under supervision (SPEC §3.2).

Every child gets its own session (process group id = its pid). A timeout, a stall (no
output and no change of ``activity()``) or the caller's cancellation kills the whole group
with a ladder run in a shielded ``finally``: SIGTERM, ``grace`` seconds, SIGKILL. Whatever
is left in the group after a normal exit (``sleep 1000 &``) is killed the same way, and
the pipes are drained for a bounded time only, so a grandchild holding them cannot hang us.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
from anyio.abc import ByteSendStream, Process

from .errors import AgentError, AgentNotFound, AgentStalled, AgentTimeout, BackendError
from .process_output import MAX_KEPT_ERR, Capture, Counts, LogSink, Progress, output_tail
from .redact import Redactor

__all__ = (
    "ProcessResult",
    "group_alive",
    "kill_group",
    "kill_now",
    "retry_delay",
    "run_process",
    "with_retries",
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DRAIN_TIMEOUT = 2.0
"""Seconds to read what is left in the pipes once the group is gone."""
KILL_TIMEOUT = 5.0
"""Seconds to wait for SIGKILL to take effect."""
REAP_TIMEOUT = 5.0
"""Seconds to wait until the kernel forgets a dead group (its zombies reaped by init)."""
EXIT_POLL = 0.2
"""Seconds between checks whether the child exited while the stall watch sleeps."""


@dataclass(frozen=True)
class ProcessResult:
    """How a supervised process ended; output decoded as UTF-8 (errors replaced), redacted.

    ``stdout`` is the output a preset parses: its last ``MAX_KEPT`` (8 MiB) bytes, behind
    a ``[… N bytes cut …]`` line when more was printed; ``stderr`` its last MiB. The stage
    log has all of both."""

    returncode: int
    stdout: str
    stderr: str
    signal: int | None
    """The signal that ended the process, if one did."""


async def run_process(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    stdin: bytes | None,
    timeout: float,  # noqa: ASYNC109 (a child's deadline, not ours)
    stall_timeout: float,
    log_file: Path,
    redactor: Redactor,
    activity: Callable[[], object] | None = None,
    on_spawn: Callable[[int], None] | None = None,
    on_exit: Callable[[int], None] | None = None,
    grace: float = 5.0,
    what: str | None = None,
    counts: Counts | None = None,
    program: str | None = None,
) -> ProcessResult:
    """Run ``argv`` in its own process group and supervise it until the group is gone.

    ``stdin`` is written then closed (None: ``/dev/null``). Output is kept and appended,
    redacted, to ``log_file``; with ``counts`` only the output lines it accepts are
    progress for the stall watch. Raises AgentTimeout, AgentStalled, or AgentNotFound when
    the program cannot be started; ``what`` (the stage) words that message, ``program``
    names the agent in messages when ``argv`` starts with a wrapper (the sandbox).
    """
    args = [os.fspath(a) for a in argv]
    if not args:
        raise ValueError("run_process needs a non-empty argv")
    sink = await LogSink.open(log_file, redactor)
    try:
        await sink.note("$ " + " ".join(_shown(a) for a in args))
        try:
            proc = await anyio.open_process(
                args,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
            )
        except OSError as e:
            await sink.note(f"cannot start: {e}")
            raise _cannot_start(args[0], cwd, e, what) from e
        shown = Path(program or args[0]).name
        name = f"{what} agent `{shown}`" if what else f"`{shown}`"
        return await _supervise(
            proc, name, sink, redactor, stdin, timeout, stall_timeout, activity,
            on_spawn, on_exit, grace, counts, _Strays.of(env, proc.pid),
        )  # fmt: skip
    finally:
        with anyio.CancelScope(shield=True):
            await sink.aclose()


async def _supervise(
    proc: Process,
    name: str,
    sink: LogSink,
    redactor: Redactor,
    stdin: bytes | None,
    timeout: float,  # noqa: ASYNC109 (a child's deadline, not ours)
    stall_timeout: float,
    activity: Callable[[], object] | None,
    on_spawn: Callable[[int], None] | None,
    on_exit: Callable[[int], None] | None,
    grace: float,
    counts: Counts | None,
    strays: _Strays | None = None,
) -> ProcessResult:
    pgid = proc.pid
    quiet = "no progress in its output" if counts is not None else "no output"
    stalled = f"{quiet} and no worktree change for {stall_timeout:g} s"
    progress = Progress(anyio.current_time())
    out = Capture("out", sink, progress, counts)
    err = Capture("err", sink, progress, counts, keep=MAX_KEPT_ERR)
    reason: str | None = None
    stopped: bool | None = None
    log.info("%s started (process group %d)", name, pgid)
    try:
        if on_spawn is not None:
            on_spawn(pgid)
        async with anyio.create_task_group() as tg:
            assert proc.stdout is not None and proc.stderr is not None
            tg.start_soon(out.pump, proc.stdout)
            tg.start_soon(err.pump, proc.stderr)
            if stdin is not None and proc.stdin is not None:
                tg.start_soon(_feed, proc.stdin, stdin)
            reason = await _watch(proc, progress, timeout, stall_timeout, activity)
            with anyio.CancelScope(shield=True):
                why = {
                    None: "exited; stopping what is left of its group",
                    "timeout": f"ran past its timeout of {timeout:g} s",
                    "stall": stalled,
                }[reason]
                stopped = await _stop_group(proc, pgid, grace, name, why, sink)
                if strays is not None:
                    await strays.stop(name, sink)
                with anyio.move_on_after(DRAIN_TIMEOUT):
                    await out.done.wait()
                    await err.done.wait()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if stopped is None:
                stopped = await _stop_group(proc, pgid, grace, name, "interrupted", sink)
                if strays is not None:
                    await strays.stop(name, sink)
            with anyio.move_on_after(KILL_TIMEOUT):
                await proc.aclose()
            if stopped and on_exit is not None:
                on_exit(pgid)
    rc = proc.returncode if proc.returncode is not None else -signal.SIGKILL
    await sink.note(f"exit status {rc}")
    result = ProcessResult(rc, out.text(redactor), err.text(redactor), -rc if rc < 0 else None)
    if reason == "timeout":
        raise AgentTimeout(
            f"{name} ran past its timeout of {timeout:g} s and was killed",
            output=output_tail(result.stdout, result.stderr),
        )
    if reason == "stall":
        tail = output_tail(result.stdout, result.stderr)
        last = next((ln.strip() for ln in reversed(tail.splitlines()) if ln.strip()), "")
        said = f" (its last words: {last[:200]})" if last and counts is not None else ""
        raise AgentStalled(f"{name} stalled: {stalled}{said}", output=tail)
    return result


async def _watch(
    proc: Process,
    progress: Progress,
    timeout: float,  # noqa: ASYNC109 (a child's deadline, not ours)
    stall_timeout: float,
    activity: Callable[[], object] | None,
) -> str | None:
    """Wait for the child to exit; return None, or "timeout" / "stall" when it must die."""
    deadline = anyio.current_time() + timeout
    step = max(0.01, min(stall_timeout / 4, 5.0))
    mark = await anyio.to_thread.run_sync(_probe, activity) if activity is not None else None
    checked = anyio.current_time()
    while proc.returncode is None:
        now = anyio.current_time()
        if now >= deadline:
            return "timeout"
        with anyio.move_on_after(min(step, EXIT_POLL, deadline - now)):
            await proc.wait()
        now = anyio.current_time()
        if proc.returncode is not None:
            break
        if activity is not None and now - checked >= step:
            fresh = await anyio.to_thread.run_sync(_probe, activity)
            checked = now
            if fresh != mark:
                mark = fresh
                progress.touch(now)
        if now - progress.last >= stall_timeout:
            return "stall"
    return None


def _probe(activity: Callable[[], object] | None) -> object:
    if activity is None:
        return None
    try:
        return activity()
    except Exception as e:  # a vanished worktree must not kill the supervision
        log.debug("activity probe failed: %s", e)
        return None


async def _feed(stream: ByteSendStream, data: bytes) -> None:
    try:
        if data:
            await stream.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass  # the child exited or closed its stdin without reading everything
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await stream.aclose()
            except (anyio.BrokenResourceError, OSError):
                pass


async def _stop_group(
    proc: Process, pgid: int, grace: float, name: str, why: str, sink: LogSink
) -> bool:
    """The kill ladder; True once nothing of the group is alive."""
    if group_alive(pgid):
        level = logging.INFO if why.startswith("exited") else logging.WARNING
        log.log(level, "%s %s: SIGTERM to process group %d", name, why, pgid)
        await sink.note(f"{why}: SIGTERM to process group {pgid}")
        _signal(pgid, signal.SIGTERM)
        if not await _wait_dead(proc, pgid, grace):
            log.warning("%s: process group %d alive after %g s: SIGKILL", name, pgid, grace)
            await sink.note(f"process group {pgid} alive after {grace:g} s: SIGKILL")
            _signal(pgid, signal.SIGKILL)
            if not await _wait_dead(proc, pgid, KILL_TIMEOUT):
                log.error("%s: process group %d survived SIGKILL", name, pgid)
                return False
        log.info("%s: process group %d is gone", name, pgid)
    if proc.returncode is None:  # the leader left the group; it goes too
        proc.kill()
        with anyio.move_on_after(KILL_TIMEOUT):
            await proc.wait()
    deadline = anyio.current_time() + REAP_TIMEOUT
    while _unreaped(pgid, proc.pid) and anyio.current_time() < deadline:  # noqa: ASYNC110
        await anyio.sleep(0.05)
    return True


@dataclass(frozen=True)
class _Strays:
    """What an agent started outside its process group and session (``setsid``, a
    double-forked daemon): found by the environment it inherited — its stage's
    ``OPUS_JOB_ID``, ``OPUS_STAGE`` and ``OPUS_ITERATION`` — among processes started since
    the agent, and killed when its stage ends."""

    marks: frozenset[bytes]
    since: int
    """The agent's start, in clock ticks since boot (/proc/PID/stat)."""

    @classmethod
    def of(cls, env: Mapping[str, str], pid: int) -> _Strays | None:
        keys = ("OPUS_JOB_ID", "OPUS_STAGE", "OPUS_ITERATION")
        if not all(env.get(k) for k in keys):
            return None  # not an agent (a notifier's command, a test's process)
        since = _start_ticks(pid)
        marks = frozenset(f"{k}={env[k]}".encode() for k in keys)
        return cls(marks, since) if since is not None else None

    def find(self) -> list[int]:
        me, found = os.getpid(), []
        try:
            names = os.listdir("/proc")  # noqa: PTH208 (fast)
        except OSError:
            return []
        for name in names:
            if not name.isdigit() or int(name) == me:
                continue
            started = _start_ticks(int(name))
            if started is None or started < self.since:
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    env = set(f.read().split(b"\0"))
            except OSError:
                continue
            if self.marks <= env:
                found.append(int(name))
        return found

    async def stop(self, name: str, sink: LogSink) -> None:
        pids = await anyio.to_thread.run_sync(self.find)
        if not pids:
            return
        log.warning("%s left %d process(es) outside its group: SIGKILL to %s",
                    name, len(pids), ", ".join(map(str, pids)))  # fmt: skip
        await sink.note(f"left outside its process group: SIGKILL to {pids}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def _unreaped(pgid: int, tracked: int | None = None) -> bool:
    """True while group ``pgid`` exists but for orphaned zombies: those wait for init, which
    takes seconds on some machines (a sandbox's own init is one when its bwrap exits).

    Orphans this process adopted (it is a subreaper: a cluster node's worker) are reaped
    here, each by its pid; ``tracked``, the supervised child, is left to whoever waits for
    it (its exit status is the stage's)."""
    if not _exists(pgid):
        return False
    members = _members(pgid)
    if members is None:
        return True
    me = os.getpid()
    reaped = {
        pid
        for pid, state, _, ppid in members
        if state == "Z" and ppid == me and pid != tracked and _reap(pid)
    }
    return any(
        state not in ("Z", "X") or (ppid == me and pid not in reaped)
        for pid, state, _, ppid in members
    )


def _reap(pid: int) -> bool:
    """Collect the exit status of our zombie child ``pid``; True once it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # someone else collected it: gone all the same
        return True
    return done == pid


async def _wait_dead(proc: Process, pgid: int, limit: float) -> bool:
    deadline = anyio.current_time() + limit
    pause = 0.001  # a sandbox's init follows its bwrap within a millisecond or two
    while group_alive(pgid):
        left = deadline - anyio.current_time()
        if left <= 0:
            return False
        with anyio.move_on_after(min(pause, left)):
            if proc.returncode is None:
                await proc.wait()
            else:
                await anyio.sleep(pause)
        pause = min(pause * 2, 0.1)
    return True


def _cannot_start(exe: str, cwd: Path, e: OSError, what: str | None) -> AgentError:
    if isinstance(e, FileNotFoundError) and e.filename is not None and Path(e.filename) == cwd:
        return AgentError(f"cannot start `{exe}`: working directory {cwd} does not exist")
    fix = f"; install it or change [agents.{what}] kind/command" if what else ""
    if isinstance(e, FileNotFoundError):
        where = "" if os.sep in exe else " on PATH"
        return AgentNotFound(f"`{exe}` not found{where}{fix}")
    if isinstance(e, PermissionError):
        return AgentNotFound(f"`{exe}` cannot be executed (permission denied){fix}")
    return AgentError(f"cannot start `{exe}`: {e}")


def _shown(arg: str, limit: int = 200) -> str:
    return arg if len(arg) <= limit else f"{arg[:limit]}…[{len(arg)} chars]"


# -- process groups ------------------------------------------------------------------


def _members(pgid: int) -> list[tuple[int, str, int, int]] | None:
    """``(pid, state, session, parent pid)`` of each process in group ``pgid`` — or in the
    agent's session ``pgid``, which a grandchild keeps when it moves to a group of its own —
    per /proc; None when /proc cannot be read."""
    found: list[tuple[int, str, int, int]] = []
    try:
        names = os.listdir("/proc")  # noqa: PTH208 (fast; polled)
    except OSError:
        return None
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()
        if len(fields) > 3 and pgid in (int(fields[2]), int(fields[3])):
            found.append((int(name), fields[0].decode(), int(fields[3]), int(fields[1])))
    return found


def _exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: int) -> bool:
    """True while a process of group (or session) ``pgid`` runs (zombies do not count)."""
    members = _members(pgid)
    if not members:  # none, or no /proc / another pid namespace: trust the kernel's answer
        return _exists(pgid)
    return any(state not in ("Z", "X") for _, state, _, _ in members)


def _signal(pgid: int, sig: signal.Signals) -> None:
    """Signal the group, and every process of the session that left it for a group of its
    own (``set -m`` shells, ``process_group=0`` children)."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as e:
        log.warning("cannot signal process group %d: %s", pgid, e)
    for pid, _, session, _ in _members(pgid) or []:
        if session == pgid and pid != pgid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def kill_now(pgid: int) -> None:
    """SIGKILL an agent's process group (and its session's strays) at once: the emergency
    stop. The supervisor watching it then finds it gone and checkpoints."""
    if pgid <= 1 or pgid == os.getpgrp():
        return
    log.warning("emergency stop: SIGKILL to process group %d", pgid)
    _signal(pgid, signal.SIGKILL)


def kill_group(pgid: int, grace: float = 5.0) -> bool:
    """Kill an agent process group a dead predecessor left; True if something was killed.

    SIGTERM, poll up to ``grace`` s, SIGKILL. A gone group, our own group, and a group
    that is not a session of its own (the id was reused by something else) are left alone.
    """
    if pgid <= 1 or pgid == os.getpgrp():
        log.warning("refusing to kill process group %d (not an agent's)", pgid)
        return False
    if not group_alive(pgid):
        return False
    members = _members(pgid) or []
    if members and not any(session == pgid for _, _, session, _ in members):
        log.warning("process group %d is not an agent session (id reused?); left alone", pgid)
        return False
    log.warning("killing process group %d left running by a previous opus: SIGTERM", pgid)
    _signal(pgid, signal.SIGTERM)
    if not _poll(lambda: not group_alive(pgid), grace):
        log.warning("process group %d alive after %g s: SIGKILL", pgid, grace)
        _signal(pgid, signal.SIGKILL)
        if not _poll(lambda: not group_alive(pgid), KILL_TIMEOUT):
            log.error("process group %d survived SIGKILL", pgid)
            return True
    _poll(lambda: not _unreaped(pgid), REAP_TIMEOUT)
    return True


def _poll(done: Callable[[], bool], limit: float) -> bool:
    deadline = time.monotonic() + limit
    pause = 0.01
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
    return True


# -- retries -------------------------------------------------------------------------


def retry_delay(error: AgentError, attempt: int, base_delay: float, max_delay: float,
                rand: Callable[[], float]) -> float:  # fmt: skip
    """Seconds to wait after failed ``attempt``: the backend's ``retry_after``, else backoff."""
    if isinstance(error, BackendError) and error.retry_after is not None:
        return max(0.0, error.retry_after)
    return min(max_delay, base_delay * 2.0 ** (attempt - 1)) * (0.5 + rand())


async def with_retries(
    attempt: Callable[[int], Awaitable[T]],
    *,
    retries: int,
    base_delay: float = 2.0,
    max_delay: float = 60.0,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    rand: Callable[[], float] = random.random,
    on_retry: Callable[[int, AgentError, float], None] | None = None,
) -> tuple[T, int]:
    """Call ``attempt(n)`` for n = 1..retries+1 until it succeeds; return (result, attempts).

    Only AgentErrors with ``retryable`` True are retried. The error that propagates carries
    ``attempts`` (how many calls were made).
    """
    n = 1
    while True:
        try:
            result = await attempt(n)
        except AgentError as e:
            e.attempts = n  # type: ignore[attr-defined]
            if not e.retryable or n > retries:
                raise
            delay = retry_delay(e, n, base_delay, max_delay, rand)
            log.log(
                logging.DEBUG if on_retry is not None else logging.WARNING,
                "attempt %d of %d failed: %s; retrying in %.1f s", n, retries + 1, e, delay,
            )  # fmt: skip
            if on_retry is not None:
                on_retry(n, e, delay)
            await sleep(delay)
            n += 1
        else:
            return result, n

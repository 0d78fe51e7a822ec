"""The Orchestrator: one vault served — recovery, the main loop, shutdown (SPEC §4, §10, §11).

async with Orchestrator(config) as orch:   # takes the lock, opens the registry, recovers
    await orch.run()                        # serve until cancelled or ``stop()``
    # or: await orch.run_once()             # everything to a resting status, then return
    # or: job = await orch.process("FR-101")
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType

import anyio
import httpx
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from .agents import AgentLike, build_agents
from .atomic import TEMP_PREFIX
from .checks import notifier_problems, repo_problems
from .config import Config
from .control import STOP_NOW
from .dashboard import write_dashboard
from .errors import ConfigError, OpusError
from .health import write_health
from .ideation import IdeaRun, Ideation, dashboard_lines
from .lifecycle import Status
from .lock import InstanceLock, cleanup_temp_files
from .models import Job
from .notify import Notifier
from .redact import RedactingFilter, Redactor
from .registry import Registry
from .runtime import Runtime, local_now
from .sandbox import open_sandbox
from .scheduler import Scheduler
from .supervisor import kill_now
from .systemd import SystemdNotifier
from .vault import Scan, Vault
from .watcher import AdaptivePoll, Watcher
from .workspace import Workspace

log = logging.getLogger(__name__)

STATE_EVERY = 1.0
"""Seconds between two state writes (registry.json, health.json, the dashboard) at most."""


def _opus_loggers() -> list[logging.Logger]:
    """Every logger of the package (a filter applies only to its own logger's records)."""
    names = [n for n in logging.root.manager.loggerDict if n == "opus" or n.startswith("opus.")]
    return [logging.getLogger(n) for n in ["opus", *names]]


@dataclass
class Summary:
    """What a ``run_once`` left behind: FR id → status."""

    statuses: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class Orchestrator:
    """Serves one vault. Constructing does no I/O; entering takes the lock and recovers."""

    def __init__(
        self,
        config: Config,
        *,
        agents: Mapping[str, AgentLike] | None = None,
        environ: Mapping[str, str] | None = None,
        now: Callable[[], datetime] = local_now,
        http_transport: httpx.AsyncBaseTransport | None = None,
        on_change: Callable[[Job], None] | None = None,
    ) -> None:
        self.config = config
        self._agent_overrides = dict(agents or {})
        self._environ = dict(os.environ if environ is None else environ)
        self._now = now
        self._http_transport = http_transport
        self._on_change = on_change
        self._lock = InstanceLock(config.state_dir / "opus.lock")
        self._stop = anyio.Event()
        self._state_due = anyio.Event()
        self._rewatch = anyio.Event()
        self._watching: anyio.Event | None = None  # set once the watcher is on the new folder
        self._poll = _adaptive_poll(config)
        self._started_at = now()
        self._last_scan: Scan | None = None
        self._log_filter: RedactingFilter | None = None
        self._wake: MemoryObjectSendStream[str] | None = None
        self._changed_paths: set[Path] = set()
        self._rescan = False
        self.systemd = SystemdNotifier(self._environ)
        self.rt: Runtime
        self.scheduler: Scheduler
        self.ideation: Ideation

    # -- lifetime ------------------------------------------------------------------------------

    async def __aenter__(self) -> Orchestrator:
        config = self.config
        state = config.state_dir
        await anyio.to_thread.run_sync(lambda: state.mkdir(mode=0o700, parents=True, exist_ok=True))
        self._lock.acquire()
        try:
            # a note write killed half-way leaves its temp file next to the note
            await anyio.to_thread.run_sync(cleanup_temp_files, config.planned_dir, TEMP_PREFIX)
            redactor = Redactor(config.secrets(self._environ))
            self._log_filter = RedactingFilter(redactor)
            for logger in _opus_loggers():
                logger.addFilter(self._log_filter)
            # checkpoints only append; registry.json is rewritten by each tick and heartbeat
            agents = build_agents(config, self._agent_overrides, environ=self._environ)
            executor = None
            if config.executor.kind == "ray":  # Ray is imported only then
                from .agents.remote import remote_agents

                agents, executor = await remote_agents(
                    config, agents, set(self._agent_overrides), self._environ
                )
            registry = Registry(
                state, keep_days=config.state.keep_days, now=self._now, flush_interval=30.0
            )
            await anyio.to_thread.run_sync(registry.open)
            sandbox = await anyio.to_thread.run_sync(open_sandbox, config, self._environ)
            self.rt = Runtime(
                config=config,
                vault=Vault(config),
                registry=registry,
                agents=agents,
                workspaces={
                    name: Workspace(
                        config.repo_path(name), base=repo.base, worktrees_dir=state / "worktrees"
                    )
                    for name, repo in config.repos.items()
                },
                notifier=Notifier(
                    config.notify, redactor, transport=self._http_transport, environ=self._environ
                ),
                redactor=redactor,
                now=self._now,
                environ=self._environ,
                http_transport=self._http_transport,
                on_change=self._changed,
                executor=executor,
                sandbox=sandbox,
            )
            if executor is not None:
                executor.on_event = self._remote_event
            self.scheduler = Scheduler(self.rt)
            self.ideation = Ideation(self.rt, on_written=self._ideas_changed)
            await anyio.to_thread.run_sync(self.ideation.load)
            await self.scheduler.recover()
        except BaseException:
            self._release()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            if self._last_scan is not None:  # registry.json, health.json, the dashboard
                await self._save_state(self._last_scan, force=True)
            else:
                await anyio.to_thread.run_sync(self.rt.registry.flush)
            self.systemd.stopping()
            if self.rt.executor is not None:
                await anyio.to_thread.run_sync(self.rt.executor.close)
        self._release()

    def _release(self) -> None:
        if self._log_filter is not None:
            for logger in _opus_loggers():
                logger.removeFilter(self._log_filter)
        self.systemd.close()
        self._lock.release()

    def _remote_event(self, job_id: str, event: str, data: dict[str, str]) -> None:
        job = self.rt.registry.get(job_id)
        if job is not None:
            self.rt.registry.save(job, event, sync=False, **data)

    def _changed(self, job: Job) -> None:
        self._dirty = True
        if self._on_change is not None:
            self._on_change(job)

    def _ideas_changed(self) -> None:
        self._dirty = True

    _dirty = True
    _state_written = -1e9
    _started = 0
    """How many jobs the last tick started."""

    # -- one step --------------------------------------------------------------------------------

    async def tick(
        self, tg: TaskGroup, *, settle_reviews: bool = True, changed: set[Path] | None = None
    ) -> Scan:
        """Scan the vault (only ``changed`` notes, when given), act on it, start what may."""
        scan = await anyio.to_thread.run_sync(self.rt.vault.scan, changed)
        self._last_scan = scan
        await self.scheduler.reconcile(scan, settle_reviews=settle_reviews)
        self._started = await self.scheduler.start_ready(tg, scan)
        idle = not self.scheduler.running and self.scheduler.accepting and not self.stopping
        idle = idle and self.scheduler.only is None  # not while `process` runs one FR
        await self.ideation.tick(tg, self.rt.registry.jobs(), busy=not idle)
        await self._save_state(scan)
        return scan

    async def ideate(self, category: str | None = None) -> IdeaRun:
        """One ideation now, whatever the queue (``opus ideate``; SPEC §19)."""
        return await self.ideation.run(category)

    async def _save_state(self, scan: Scan, *, force: bool = False) -> None:
        """End of a tick: registry.json, health.json, STATUS=, the dashboard — at most once
        a second (ticks come as often as pipelines finish; no hand-off between), always
        when ``force``."""
        now = time.monotonic()
        if not force and now - self._state_written < STATE_EVERY:
            self._state_due.set()  # written by ``_write_late`` once the second is up
            return
        self._state_written = now
        await anyio.to_thread.run_sync(self._write_state, scan)

    async def _write_late(self) -> None:
        """A state write a tick skipped (another was under a second ago) happens once the
        second is up, so registry.json and the dashboard never wait for the next beat."""
        while True:
            await self._state_due.wait()
            self._state_due = anyio.Event()
            await anyio.sleep(max(0.0, self._state_written + STATE_EVERY - time.monotonic()))
            if self._last_scan is not None:
                await self._save_state(self._last_scan)

    def _write_state(self, scan: Scan) -> None:
        self._heartbeat()
        if self._dirty and self.config.dashboard_path is not None:
            self._dirty = False
            ideas = dashboard_lines(self.config) if self.config.ideation.enabled else []
            write_dashboard(
                self.config.dashboard_path,
                self.rt.registry.jobs(),
                scan,
                now=self._now(),
                extra=ideas,
                other_spend=self.rt.other_spend,
            )

    def _heartbeat(self) -> None:
        """registry.json (if changed), health.json, STATUS= — every tick and every beat."""
        self.rt.registry.flush()
        running = [
            {
                "job_id": r.job.id,
                "fr_id": r.job.fr_id,
                "stage": r.job.stage,
                "iteration": r.job.iteration,
            }
            for r in list(self.scheduler.running.values())
        ]
        queued = sum(1 for j in self.rt.registry.jobs() if j.status is Status.QUEUED)
        write_health(
            self.config.state_dir / "health.json",
            pid=os.getpid(),
            started_at=self._started_at,
            last_tick=self._now(),
            running=running,
            queued=queued,
            executor=self.rt.executor.problem if self.rt.executor is not None else None,
        )
        self.systemd.status(f"{len(running)} running, {queued} queued")

    # -- serving -----------------------------------------------------------------------------------

    async def reload(self, config: Config) -> None:
        """Take a new config (SIGHUP): everything in the file, repositories included.

        Refused (OpusError, the old config kept) when it moves the vault or the state
        folder, names a repository that is not usable, or asks for a sandbox that does not
        work. Running stages finish with what they started with; what starts next uses the
        new values. A new planned folder is watched from now on. ``[executor]`` alone waits
        for a restart (running remote stages hold on to the cluster): a warning says so.
        """
        old = self.config
        if config.state_dir != old.state_dir or config.root != old.root:
            raise OpusError("a reload cannot move the vault or the state folder; restart opus")
        problems = await anyio.to_thread.run_sync(repo_problems, config)
        if problems:
            raise ConfigError(problems[0], file=None, problems=problems)
        sandbox = self.rt.sandbox
        if config.sandbox != old.sandbox:
            sandbox = await anyio.to_thread.run_sync(open_sandbox, config, self._environ)
        agents = build_agents(config, self._agent_overrides, environ=self._environ)
        executor = self.rt.executor
        if executor is not None:
            from .agents.remote import Executor

            assert isinstance(executor, Executor)
            built = {s for s in agents if s.value not in self._agent_overrides}
            agents = executor.wrap(agents, config, built)
        if config.executor != old.executor:
            # (a process holds one Ray connection, and running remote stages hold on to it)
            log.warning("[executor] changed: it takes effect when opus restarts")
        self.config = config
        self.rt.config = config
        self.rt.agents = agents
        self.rt.sandbox = sandbox
        self.rt.redactor.update(config.secrets(self._environ))
        self.rt.notifier = Notifier(
            config.notify, self.rt.redactor, transport=self._http_transport, environ=self._environ
        )
        workspaces = {}
        for name, repo in config.repos.items():
            kept = self.rt.workspaces.get(name)
            same = name in old.repos and (
                old.repo_path(name) == config.repo_path(name) and old.repos[name].base == repo.base
            )
            workspaces[name] = (
                kept
                if kept is not None and same
                else Workspace(
                    config.repo_path(name),
                    base=repo.base,
                    worktrees_dir=config.state_dir / "worktrees",
                )
            )
        # a job already running in a repository that left the file keeps its workspace
        for job in self.rt.registry.jobs():
            if job.repo not in workspaces and job.repo in self.rt.workspaces:
                workspaces[job.repo] = self.rt.workspaces[job.repo]
        self.rt.workspaces = workspaces
        self.rt.registry.keep_days = config.state.keep_days
        self.rt.vault.reconfigure(config)
        if config.polling != old.polling:
            self._poll = _adaptive_poll(config)
        self._rescan, self._dirty = True, True
        if self._wake is not None:
            try:
                self._wake.send_nowait("reload")
            except anyio.WouldBlock:
                pass
        if config.planned_dir != old.planned_dir or config.polling != old.polling:
            await self._restart_watcher()
        for problem in notifier_problems(config, self._environ):
            log.warning("%s", problem)
        log.info(
            "configuration reloaded from %s (repositories: %s)",
            config.source,
            ", ".join(config.repos),
        )

    async def _restart_watcher(self) -> None:
        """Start the watcher again on the (new) planned folder and wait until it watches:
        a note moved in once ``reload`` has returned is seen at once, not at the next poll."""
        if self._watching is None:
            return  # not serving: ``run`` starts the watcher on the new folder
        watching = self._watching = anyio.Event()
        self._rewatch.set()
        with anyio.move_on_after(10):
            await watching.wait()

    _grace: float | None = None

    @property
    def grace(self) -> float:
        """Seconds running stages get to finish once stopping (0 after an emergency stop)."""
        return self.config.service.shutdown_grace if self._grace is None else self._grace

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self, *, now: bool = False) -> None:
        """Ask ``run`` to shut down gracefully (what SIGTERM does); ``now``: the emergency
        stop — every agent's process group killed at once, each job checkpointed where it
        was (it resumes at that stage on the next start), no grace."""
        self._stop.set()
        if now:
            self._grace = 0.0
            self.scheduler.accepting = False
            for run in list(self.scheduler.running.values()):
                run.control.request("shutdown")
                for pgid in run.job.pgids:
                    kill_now(pgid)
                if run.control.scope is not None:
                    run.control.scope.cancel()
        if self._wake is not None:
            try:
                self._wake.send_nowait("stop")
            except anyio.WouldBlock:
                pass

    async def run(self) -> None:
        """Serve the vault until ``stop()`` (or cancellation): watch, poll, run pipelines."""
        self._poll = _adaptive_poll(self.config)
        wake_send, wake_recv = anyio.create_memory_object_stream[str](100)
        self._wake = wake_send
        async with anyio.create_task_group() as tg:
            await tg.start(self._watch, wake_send)
            tg.start_soon(self._forward_finished, wake_send)
            tg.start_soon(self._beat)
            tg.start_soon(self._write_late)
            settle, first = True, True
            changed: set[Path] | None = None
            while not self._stop.is_set():
                scan = await self.tick(tg, settle_reviews=settle, changed=changed)
                if first:
                    first = False
                    self.systemd.ready()
                    log.info(
                        "serving %s: %d FR note(s), %d problem(s)",
                        self.config.root,
                        len(scan.frs),
                        len(scan.problems),
                    )
                busy = bool(self.scheduler.running) or bool(self.scheduler.waiting(scan))
                settle, changed = True, None
                with anyio.move_on_after(self._poll.interval(busy)):
                    await wake_recv.receive()
                    settle = False  # merges are looked for on the poll only
                    # whatever woke us, the notes the watcher reported are looked at
                    changed = None if self._rescan else self._changed_paths
                    self._changed_paths, self._rescan = set(), False
            log.info(
                "stopping: %d running job(s) get %.0f s to finish their stage",
                len(self.scheduler.running),
                self.grace,
            )
            self.systemd.stopping()
            await self.scheduler.drain(self.grace)
            if self._last_scan is not None:
                await self._save_state(self._last_scan, force=True)
            tg.cancel_scope.cancel()

    async def _watch(
        self,
        wake: MemoryObjectSendStream[str],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """The watcher over the planned folder; started again when a reload moves the folder
        or changes ``[polling]`` (a rescan once it watches covers the moment between)."""
        self._watching, restart = anyio.Event(), False
        try:
            while True:
                polling, vault = self.config.polling, self.rt.vault
                self._rewatch = anyio.Event()
                watcher = Watcher(
                    vault.planned_dir,
                    is_candidate=vault.is_candidate,
                    debounce=polling.debounce_ms / 1000,
                    enabled=polling.watch,
                )
                async with watcher, anyio.create_task_group() as tg:
                    tg.start_soon(self._forward_changes, watcher, wake)
                    if restart:  # what arrived while no watcher ran is found by a rescan
                        self._rescan = True
                        try:
                            wake.send_nowait("rewatch")
                        except anyio.WouldBlock:
                            pass
                    self._watching.set()
                    task_status.started()
                    task_status, restart = anyio.TASK_STATUS_IGNORED, True
                    await self._rewatch.wait()
                    tg.cancel_scope.cancel()
        finally:
            self._watching = None

    async def _forward_changes(self, watcher: Watcher, wake: MemoryObjectSendStream[str]) -> None:
        """Watcher batches (minus opus's own writes) wake the loop with the paths to look at."""
        vault = self.rt.vault
        while True:
            batch = await watcher.next_batch(3600)
            paths = {p for p in batch.paths if not vault.is_own_write(p)}
            if not (batch.rescan or paths):
                continue
            self._changed_paths |= paths
            self._rescan = self._rescan or batch.rescan
            try:
                wake.send_nowait("change")
            except anyio.WouldBlock:
                pass

    async def _forward_finished(self, wake: MemoryObjectSendStream[str]) -> None:
        while True:
            await self.scheduler.finished.wait()
            try:
                wake.send_nowait("finished")
            except anyio.WouldBlock:
                pass

    async def _beat(self) -> None:
        """Liveness between ticks: WATCHDOG=1, health.json, and the daily archive."""
        interval = self.systemd.watchdog_interval() or 30.0
        archived_on = self._now().date()
        while True:
            await anyio.sleep(min(interval, 30.0))
            self.systemd.watchdog()
            await anyio.to_thread.run_sync(self._heartbeat)
            if self._now().date() != archived_on:
                archived_on = self._now().date()
                await anyio.to_thread.run_sync(self.rt.registry.archive)

    async def run_once(self, only: set[str] | None = None) -> Summary:
        """Settle what waits on a person, then run every eligible FR to a resting status."""
        self.scheduler.only = only
        settle = True  # merges are looked for once, not after every pipeline
        async with anyio.create_task_group() as tg:
            changed: set[Path] | None = None  # a full scan first; then the cache will do
            while True:
                scan = await self.tick(tg, settle_reviews=settle, changed=changed)
                settle, changed = False, set()
                if not self.scheduler.running:
                    if self._started:  # what it started finished within the tick: look again
                        continue
                    break
                if self._stop.is_set():
                    await self.scheduler.drain(self.grace)
                    break
                await _first_of(self.scheduler.finished, self._stop)
        self.scheduler.only = None
        scan = await anyio.to_thread.run_sync(self.rt.vault.scan)
        summary = Summary(problems=[f"{p.path}: {p.message}" for p in scan.problems])
        for fr_id in sorted(scan.frs):
            job = self.rt.registry.latest_for(fr_id)
            fr = scan.frs[fr_id]
            summary.statuses[fr_id] = job.status.value if job else (fr.status or "planned")
        await self._save_state(scan)  # (and always on leaving: __aexit__)
        return summary

    async def process(self, ref: str) -> Job:
        """Run one FR (an id or a note's path) to a resting status and return its job."""
        vault = self.rt.vault
        fr = await anyio.to_thread.run_sync(lambda: vault.read(vault.find(ref)))
        await self.run_once(only={fr.id})
        job = self.rt.registry.latest_for(fr.id)
        if job is None:  # the note says why: a bad value, a status opus does not act on
            now = await anyio.to_thread.run_sync(lambda: vault.read(fr.path))
            why = f": {now.error}" if now.error else ""
            raise OpusError(f"{fr.id}: no job was started; its note says {now.status}{why}")
        return job


async def _first_of(*events: anyio.Event) -> None:
    """Wait until any of ``events`` is set."""
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)


async def serve(
    config: Config, *, once: bool = False, config_path: str | Path | None = None
) -> Summary | None:
    """``opus run``: the Orchestrator under signals. SIGTERM/SIGINT let running stages
    finish (``shutdown_grace``); a second SIGINT stops at once; SIGQUIT (``opus stop
    --now``) is the emergency stop; SIGHUP re-reads the config (an invalid one is rejected,
    the old one kept).

    Raises ConfigError listing every repository that is not a git repository or lacks its
    base branch, before anything is touched; logs the problems it can serve with."""
    problems = await anyio.to_thread.run_sync(repo_problems, config)
    if problems:
        raise ConfigError(problems[0], problems=problems)
    for problem in notifier_problems(config):
        log.warning("%s", problem)
    async with Orchestrator(config) as orch, anyio.create_task_group() as tg:
        tg.start_soon(_signals, orch, tg.cancel_scope, config_path or config.source)
        summary = None
        if once:
            summary = await orch.run_once()
        else:
            await orch.run()
        tg.cancel_scope.cancel()
    return summary


async def _signals(orch: Orchestrator, scope: anyio.CancelScope, config_path: str | Path) -> None:
    from .config import load_config

    wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, STOP_NOW)
    with anyio.open_signal_receiver(*wanted) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                orch.systemd.reloading()
                try:
                    new = await anyio.to_thread.run_sync(load_config, config_path)
                    await orch.reload(new)
                except OpusError as e:
                    log.error("reload rejected, keeping the old config: %s", e)
                orch.systemd.ready()
            elif signum == STOP_NOW:
                log.warning("emergency stop: killing every agent now")
                orch.stop(now=True)
            elif orch.stopping and signum == signal.SIGINT:
                log.warning("second interrupt: stopping now")
                scope.cancel()
            else:
                log.info("%s: finishing running stages", signal.Signals(signum).name)
                orch.stop()


def _adaptive_poll(config: Config) -> AdaptivePoll:
    polling = config.polling
    return AdaptivePoll(polling.active, polling.idle_max, polling.backoff)

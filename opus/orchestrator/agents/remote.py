"""The Ray executor (SPEC §18): the stages in ``[executor] stages`` run on cluster nodes.

It sits at the agent seam. ``RemoteAgent`` wraps a stage's configured agent; on a node
offering the stage's resources a Ray task (named after the job and stage, submitted in the
vault's own namespace, no Ray retries) runs ``worker.run_stage``, which builds the same agent
from the same section and runs it under the same supervision. Tasks, not an actor per stage:
a node's worker processes stay warm between stages (measured here: ~15 ms to start a task on
a warm worker, 3–4 s to create an actor, which needs a process of its own). The worktree
travels as git bundles (``bundles``), the stage log streams back while the stage runs, the
agent's artifacts and changes come back at the end. The pipeline, the registry, the notes
and delivery never leave the head.

Failures map onto the agent errors the pipeline already knows: an agent's own error keeps its
type and ``retryable``; a lost node, a crashed worker or a lost object is a retryable crash of
the attempt, as is no free slot within ``schedule_timeout``. A cluster that cannot be reached
(or that rejects the token) fails nothing: ``Executor.problem`` says why, and jobs whose next
stage is remote wait ``queued`` until it clears. A dead opus's tasks are ended by Ray (they
belong to its driver); on joining, opus also kills any named actor its namespace still holds.

Ray is imported here only, and only when ``kind = "ray"``.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio

from ..config import AgentSection, Config, ExecutorSection, SandboxSection
from ..errors import AgentCrashed, AgentError, AgentNotFound, WorkspaceError
from ..lifecycle import Stage
from ..models import FeatureRequest
from .base import Agent, StageContext, StageResult
from .bundles import KEEP_REFS, apply_bundle, bundle_commit, git
from .worker import Hello, RemoteOutcome, RemoteStage, run_stage, versions

EventHook = Callable[[str, str, dict[str, str]], None]

__all__ = (
    "Executor",
    "RemoteAgent",
    "check_cluster",
    "doctor_checks",
    "namespace_for",
    "remote_agents",
)

log = logging.getLogger(__name__)

RECONNECT_EVERY = 10.0
"""Seconds between attempts to join a cluster that could not be joined."""
LOG_POLL = 0.2
"""Seconds between two reads of a remote stage's log."""
ANSWER_MARGIN = 120.0
"""Seconds past the stage timeout the head waits for a worker's answer before giving up."""
_WAIT_NOTICE = 2.0


def namespace_for(config: Config) -> str:
    """The Ray namespace of one vault: its actors are opus's alone (the lock holds the vault)."""
    digest = hashlib.sha256(str(config.root.resolve()).encode()).hexdigest()[:12]
    return f"opus-{digest}"


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the install
        raise AgentNotFound(
            "[executor] kind = 'ray' needs Ray: pip install 'opus-orchestrator[ray]'"
        ) from e
    return ray


_TASKS: dict[str, Any] = {}


def _stage_task(job: RemoteStage, refs: list[Any]) -> Iterator[Hello | bytes | RemoteOutcome]:
    """The Ray task of one stage attempt (runs on the node; ``refs`` stay unresolved until
    the node asks for the bundle it needs)."""
    ray = _ray()

    def fetch(i: int) -> bytes | None:
        return None if refs[i] is None else bytes(ray.get(refs[i]))

    yield from run_stage(job, fetch, str(ray.get_runtime_context().get_node_id()))


def _node_versions() -> str:
    return versions()


def _task(name: str) -> Any:
    if not _TASKS:
        ray = _ray()
        _TASKS["stage"] = ray.remote(max_retries=0, num_returns="streaming")(_stage_task)
        _TASKS["versions"] = ray.remote(max_retries=0)(_node_versions)
    return _TASKS[name]


def _crash(stage: Stage, e: BaseException, node: str) -> AgentError:
    """A Ray failure as the agent error the pipeline retries (or not)."""
    ray = _ray()
    where = f" on node {node[:12]}" if node else ""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    if isinstance(e, ray.exceptions.RayTaskError):  # opus's worker code itself broke
        return AgentCrashed(f"{stage} failed{where}: {type(e).__name__}: {first}", retryable=False)
    return AgentCrashed(f"{stage} lost{where}: {type(e).__name__}: {first}", retryable=True)


class Executor:
    """The head's membership in a Ray cluster (a driver), and which stages it runs remote."""

    def __init__(
        self,
        section: ExecutorSection,
        *,
        namespace: str,
        environ: Mapping[str, str],
    ) -> None:
        self.section = section
        self.namespace = namespace
        self.environ = environ
        self.problem: str | None = "not connected to the Ray cluster yet"
        """Why remote stages cannot start now; None when connected."""
        self._tried = -1e9
        self._lock = threading.Lock()
        self._connecting: threading.Thread | None = None
        self._have: dict[str, list[str]] = {}
        self.on_event: EventHook | None = None
        """``(job_id, event, data)``: how a remote stage logs ``waiting`` in its job's events."""

    @property
    def address(self) -> str:
        return self.section.address or "auto"

    def remote(self, stage: Stage) -> bool:
        return self.section.kind == "ray" and stage.value in self.section.stages

    # -- joining the cluster ----------------------------------------------------------------

    def connect(self) -> str | None:
        """Join the cluster (blocking); kill what a dead predecessor left. The problem or None."""
        with self._lock:
            self._tried = time.monotonic()
            self.problem = self._connect()
            if self.problem:
                log.warning("executor: %s; remote stages wait", self.problem)
            return self.problem

    def _connect(self) -> str | None:
        name = self.section.token_env or ""
        token = self.environ.get(name)
        if not token:
            return f"${name} is not set: the Ray cluster needs its token"
        reachable = _probe(self.address)
        if reachable:
            return f"Ray cluster unreachable at {self.address}: {reachable}"
        ray = _ray()
        if ray.is_initialized():
            return None
        _use_token(token)
        try:
            ray.init(
                address=self.address,
                namespace=self.namespace,
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
        except Exception as e:
            ray.shutdown()
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return f"cannot join the Ray cluster at {self.address} (token rejected?): {first}"
        killed = self._kill_leftovers()
        more = f"; killed {killed} leftover stage(s)" if killed else ""
        log.info(
            "executor: joined the Ray cluster at %s (namespace %s%s)",
            self.address,
            self.namespace,
            more,
        )
        return None

    def _kill_leftovers(self) -> int:
        """Every actor in this vault's namespace belongs to a dead predecessor: kill it."""
        ray = _ray()
        killed = 0
        for name in ray.util.list_named_actors():
            try:
                ray.kill(ray.get_actor(name), no_restart=True)
                killed += 1
                log.warning("executor: killed remote stage %s left by a dead opus", name)
            except ValueError:
                continue
        return killed

    async def start(self) -> None:
        """The first attempt to join, awaited (``opus run`` starts once it knows)."""
        await anyio.to_thread.run_sync(self.connect)

    def ready(self) -> str | None:
        """None when remote stages may start; else why not (and a retry in the background)."""
        if self.problem is None:
            return None
        due = time.monotonic() - self._tried >= RECONNECT_EVERY
        if due and (self._connecting is None or not self._connecting.is_alive()):
            self._connecting = threading.Thread(target=self.connect, daemon=True)
            self._connecting.start()
        return self.problem

    def close(self) -> None:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        self.problem = "disconnected"

    # -- placing one stage --------------------------------------------------------------------

    def submit(self, stage: Stage, job: RemoteStage, bundles: list[bytes | None]) -> Any:
        """Start one stage attempt on a node offering the stage's resources (no Ray retries):
        a generator of the stage's ``Hello``, log chunks and ``RemoteOutcome``."""
        ray = _ray()
        refs = [None if b is None else ray.put(b) for b in bundles]
        wanted = self.resources(stage)
        options: dict[str, Any] = {
            "name": f"opus:{job.job_id}:{stage}-{job.iteration}",
            "num_cpus": wanted.pop("CPU", 0),
        }
        if "GPU" in wanted:
            options["num_gpus"] = wanted.pop("GPU")
        if "memory" in wanted:
            options["memory"] = wanted.pop("memory")
        return _task("stage").options(resources=wanted, **options).remote(job, refs)

    def cancel(self, running: Any) -> None:
        """Kill a stage attempt's worker process (its agents die with it: the subreaper)."""
        try:
            _ray().cancel(running, force=True)
        except Exception as e:  # finished already, or the cluster is gone
            log.debug("executor: cancelling a stage: %s", e)

    def learn(self, node: str, have: list[str]) -> None:
        """What a node's cache gained in a stage (the next thin bundle builds on it)."""
        self._have[node] = list(dict.fromkeys([*have, *self._have.get(node, [])]))[:KEEP_REFS]

    def known(self) -> list[str]:
        """The start commits some node's cache holds, newest first."""
        return list(dict.fromkeys(c for have in self._have.values() for c in have))

    def resources(self, stage: Stage) -> dict[str, float]:
        """The Ray resources one attempt of ``stage`` asks for (default one ``agent``)."""
        given = {str(k): v for k, v in self.section.resources.items()}
        return dict(given.get(stage.value) or {"agent": 1.0})

    def wrap(
        self, agents: Mapping[Stage, Agent], config: Config, built: set[Stage]
    ) -> dict[Stage, Agent]:
        """The agents with each remote stage's (one built from config) run on the cluster."""
        wrapped = dict(agents)
        secrets = config.secrets(self.environ)
        for stage in list(wrapped):
            if not self.remote(stage):
                continue
            if stage not in built:
                log.warning("executor: the %s agent was passed in code; it runs locally", stage)
                continue
            section = config.agents.for_stage(stage)
            wrapped[stage] = RemoteAgent(
                self,
                section,
                stage,
                retries=config.pipeline.retries,
                env={n: self.environ[n] for n in _needed(section) if self.environ.get(n)},
                redact=secrets,
                sandbox=config.sandbox.model_copy(
                    update={"paths": [str(config.resolve(p)) for p in config.sandbox.paths]}
                ),
                vault=str(config.root.absolute()),
            )
        return wrapped


async def remote_agents(
    config: Config,
    agents: Mapping[Stage, Agent],
    overrides: set[str],
    environ: Mapping[str, str],
) -> tuple[dict[Stage, Agent], Executor]:
    """The service's seam: join the cluster (first attempt awaited) and wrap the agents."""
    executor = Executor(config.executor, namespace=namespace_for(config), environ=environ)
    built = {stage for stage in agents if stage.value not in overrides}
    wrapped = executor.wrap(agents, config, built)
    await executor.start()
    return wrapped, executor


def _needed(section: AgentSection) -> list[str]:
    """The head's variables the agent's backend reads (e.g. its API key)."""
    return [section.api_key_env] if section.api_key_env else []


def _use_token(token: str) -> None:
    """Token auth for this driver; Ray reads both variables (and caches them: refresh)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = token
    try:
        raylet: Any = importlib.import_module("ray._raylet")
        raylet.Config.initialize("")
        raylet.AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):  # another Ray 2.x: read at import, as it was
        log.debug("executor: Ray's token cache could not be refreshed")


def _probe(address: str) -> str | None:
    """None if something listens at ``host:port`` (``auto``: not checked), else why not."""
    if address == "auto" or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
            return None
    except (OSError, ValueError) as e:
        return str(e) or type(e).__name__


@dataclass
class RemoteAgent:
    """Runs one stage's configured agent on a cluster node (SPEC §18)."""

    executor: Executor
    section: AgentSection
    stage: Stage
    retries: int = 2
    env: dict[str, str] = field(default_factory=dict)
    """The head's values of the variables the agent needs (task arguments, in memory only)."""
    redact: list[str] = field(default_factory=list)
    sandbox: SandboxSection | None = None
    vault: str = ""

    async def run(self, ctx: StageContext) -> StageResult:
        problem = self.executor.ready()
        if problem:
            raise AgentCrashed(f"{self.stage} cannot run remote: {problem}", retryable=True)
        began = time.perf_counter()
        start = await anyio.to_thread.run_sync(git, ctx.worktree, "rev-parse", "HEAD")
        note = await anyio.to_thread.run_sync(_read_note, ctx.fr.path)
        known = self.executor.known()
        full = await anyio.to_thread.run_sync(bundle_commit, ctx.worktree, start, [])
        thin = None
        if known:
            thin = await anyio.to_thread.run_sync(bundle_commit, ctx.worktree, start, known)
        job = RemoteStage(
            section=self.section,
            stage=self.stage,
            iteration=ctx.iteration,
            job_id=ctx.job_id,
            fr=ctx.fr,
            note=note,
            prompt=ctx.prompt,
            plan=ctx.plan,
            feedback=ctx.feedback,
            base_commit=ctx.base_commit,
            start=start,
            repo_key=_repo_key(self.executor.namespace, ctx.fr),
            timeout=ctx.timeout,
            stall_timeout=ctx.stall_timeout,
            retries=self.retries,
            setup=self.executor.section.setup,
            env=self.env,
            redact=self.redact,
            sandbox=self.sandbox,
            vault=self.vault,
        )
        running = await anyio.to_thread.run_sync(self.executor.submit, self.stage, job,
                                                 [thin, full])  # fmt: skip
        times = [time.perf_counter()]
        node, done = "", False
        try:
            hello = await self._placed(running, ctx)
            times.append(time.perf_counter())
            node = hello.node
            if hello.versions != versions():
                raise AgentNotFound(
                    f"node {node[:12]} ({hello.host}) runs {hello.versions}, the head "
                    f"{versions()}: install the same Python minor and opus version"
                )
            log.info("%s: %s runs on node %s (%s)", ctx.fr.id, self.stage, node[:12], hello.host)
            outcome = await self._follow(running, ctx)
            times.append(time.perf_counter())
            done = True
        except AgentError:
            raise
        except Exception as e:
            if isinstance(e, _ray().exceptions.RayError):
                raise _crash(self.stage, e, node) from e
            raise
        finally:
            if not done:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.executor.cancel, running)
        self.executor.learn(outcome.node, outcome.have)
        if self.executor.on_event is not None:
            back = len(outcome.changes[0]) if outcome.changes else 0
            data = {"stage": self.stage.value, "node": node, "host": outcome.host,
                    "bundle_bytes": str(outcome.received), "back_bytes": str(back)}  # fmt: skip
            self.executor.on_event(ctx.job_id, "remote", data)
        result = await anyio.to_thread.run_sync(self._land, ctx, outcome)
        sent, placed, ran = times
        log.debug("%s: remote %s: %.0f ms to send, %.0f to start, %.0f to run, %.0f to land",
                  ctx.fr.id, self.stage, (sent - began) * 1e3, (placed - sent) * 1e3,
                  (ran - placed) * 1e3, (time.perf_counter() - ran) * 1e3)  # fmt: skip
        return result

    async def _placed(self, running: Any, ctx: StageContext) -> Hello:
        """Wait for the attempt to start on a node with a free slot (``schedule_timeout``)."""
        limit = self.executor.section.schedule_timeout
        got: list[Hello] = []
        arrived = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def first() -> None:
                item = await (await running.__anext__())
                got.append(item)
                arrived.set()

            tg.start_soon(first)
            with anyio.move_on_after(min(_WAIT_NOTICE, limit)):
                await arrived.wait()
            if not got:
                log.info("%s: %s waits for an agent node", ctx.fr.id, self.stage)
                if self.executor.on_event is not None:
                    reason = {"reason": "waiting for an agent node", "stage": self.stage.value}
                    self.executor.on_event(ctx.job_id, "waiting", reason)
                with anyio.move_on_after(max(limit - _WAIT_NOTICE, 0)):
                    await arrived.wait()
            tg.cancel_scope.cancel()
        if not got:
            raise AgentCrashed(
                f"{self.stage}: no agent node with a free slot within {limit:g} s "
                f"(resources {self.executor.resources(self.stage)})",
                retryable=True,
            )
        return got[0]

    async def _follow(self, running: Any, ctx: StageContext) -> RemoteOutcome:
        """Read the stage's items until its outcome, appending log chunks to the head's log."""
        outcome: RemoteOutcome | None = None
        out = await anyio.to_thread.run_sync(_open_private, ctx.log_file)
        with out, anyio.fail_after(ctx.timeout + ANSWER_MARGIN):
            while True:
                try:
                    ref = await running.__anext__()
                except StopAsyncIteration:
                    break
                item = await ref
                if isinstance(item, bytes):
                    out.write(item)
                    out.flush()
                elif isinstance(item, RemoteOutcome):
                    outcome = item
        if outcome is None:
            raise AgentCrashed(f"{self.stage}: the node ended without an answer", retryable=True)
        return outcome

    def _land(self, ctx: StageContext, outcome: RemoteOutcome) -> StageResult:
        """Bring the stage home: artifacts, output file, the coder's changes; or its error."""
        land_artifacts(ctx, outcome.artifacts)
        if outcome.output is not None:
            with _open_private(ctx.output_file) as f:
                f.write(outcome.output)
        if outcome.error is not None:
            raise outcome.error
        if outcome.changes is not None:
            data, tip, wip = outcome.changes
            try:
                apply_bundle(ctx.worktree, data, tip, wip=wip)
            except WorkspaceError as e:
                raise AgentCrashed(f"{self.stage}: the node's changes: {e}", retryable=True) from e
        assert outcome.result is not None
        meta = {**outcome.result.meta, "node": outcome.node, "host": outcome.host}
        return replace(outcome.result, meta=meta)


def land_artifacts(ctx: StageContext, files: Mapping[str, bytes]) -> list[str]:
    """Write the files a remote agent left in its ``$OPUS_ARTIFACTS`` into the job's
    folder, private (SPEC §8), and return their names. A name the job's folder already has
    (its events, plan, prompts, another stage's log) is never overwritten — on the node
    those files were not there to protect (SPEC §17) — nor is a name that is not a plain
    file name."""
    landed = []
    for name, data in files.items():
        target = ctx.artifacts / name
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            log.warning("%s: %s left %r: not a file name, not kept", ctx.fr.id, ctx.stage, name)
            continue
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            log.warning(
                "%s: %s left %s, which the job already has: not taken", ctx.fr.id, ctx.stage, name
            )
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        landed.append(name)
    return landed


def _open_private(path: Path) -> Any:
    """``path`` opened for writing from its start, mode 0600 whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


def _read_note(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _repo_key(namespace: str, fr: FeatureRequest) -> str:
    return f"{namespace}-{fr.repo or 'default'}"


def check_cluster(
    config: Config, environ: Mapping[str, str] | None = None
) -> list[tuple[bool, str]]:
    """``opus doctor``'s executor checks: reachable, token accepted, versions match, at least
    one node with an ``agent`` resource. One ``(ok, line)`` per check; joins and leaves."""
    section = config.executor
    if section.kind != "ray":
        return [(True, "local")]
    executor = Executor(section, namespace=namespace_for(config), environ=environ or os.environ)
    problem = executor.connect()
    if problem:
        return [(False, problem)]
    checks = [(True, f"joined the Ray cluster at {executor.address} (token accepted)")]
    try:
        ray = _ray()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        agents = [n for n in nodes if n.get("Resources", {}).get("agent", 0) > 0]
        checks.append((bool(agents), f"{len(agents)} of {len(nodes)} node(s) offer "
                       f"an `agent` resource"))  # fmt: skip
        if agents:
            theirs = ray.get(
                _task("versions").options(resources={"agent": 0.001}, num_cpus=0).remote(),
                timeout=section.schedule_timeout,
            )
            same = theirs == versions()
            checks.append((same, f"a worker node runs {theirs}, "
                           f"the head {versions()}"))  # fmt: skip
    except Exception as e:
        checks.append((False, f"{type(e).__name__}: {e}"))
    finally:
        executor.close()
    return checks


def doctor_checks(config: Config, environ: Mapping[str, str]) -> Iterator[Any]:
    """``check_cluster`` as ``opus doctor``'s ``Check`` lines (``doctor.check_executor``)."""
    check = importlib.import_module("opus.orchestrator.doctor").Check
    for ok, line in check_cluster(config, environ):
        yield check("executor (ray)", ok, line)

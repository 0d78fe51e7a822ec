"""Figures 1, 2 and 7: a real ``Orchestrator`` in this process with instant in-process agents.

1. pickup latency — ``Orchestrator.run()`` serves a vault (watch on); a note is renamed into
   the planned folder and a thread polls the file (~1 ms) for ``status: in-progress``.
2. orchestration overhead — ``Orchestrator.process()`` of one FR, against the git commands
   that job needs run directly (``subprocess``) in the same repository, interleaved.
7. throughput — ``run_once()`` over N planned FRs at concurrency 3, against the same git
   commands run directly in 3 parallel lanes (SPEC §12), in the same run.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shlex
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import UNIXDatagramSocket
from report import Figure, median, ms, percentile, ratio
from world import World, git, instant_agents, make_world, simple_note

from opus.orchestrator import Job, Orchestrator, Status
from opus.orchestrator.lifecycle import RESTING

POLL_BASELINE = 30.0
"""The fixed poll interval of the best-known peers (SPEC §12)."""
_COMMIT = ("-c", "maintenance.auto=false", "-c", "gc.auto=0", "-c", "commit.gpgsign=false")


# --- 1. pickup latency -------------------------------------------------------------------------


class NoteWatch(threading.Thread):
    """Reads one note every ~1 ms and records (perf_counter) when each status first shows."""

    def __init__(self, path: Path, statuses: tuple[str, ...] = ("queued", "in-progress")) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.statuses = statuses
        self.seen: dict[str, float] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        patterns = {
            s: re.compile(rf"^status: {re.escape(s)}\s*$", re.MULTILINE) for s in self.statuses
        }
        last = self.statuses[-1]
        while not self.halt.is_set():
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                text = ""
            now = time.perf_counter()
            for status, pattern in patterns.items():
                if status not in self.seen and pattern.search(text):
                    self.seen[status] = now
            if last in self.seen:
                return
            time.sleep(0.001)


@dataclass
class _Rest:
    """Set when the FR being watched reaches a resting status (via ``on_change``)."""

    fr_id: str = ""
    event: anyio.Event | None = None
    status: Status | None = None

    def __call__(self, job: Job) -> None:
        if job.fr_id == self.fr_id and job.status in RESTING and self.event is not None:
            self.status = job.status
            self.event.set()


async def _serve_and_move(
    world: World, orch: Orchestrator, notify: UNIXDatagramSocket, rest: _Rest, moves: int
) -> tuple[list[float], list[float]]:
    """Serve with ``orch.run()``; move notes in one at a time. Returns the seconds from
    each rename to ``status: in-progress`` and to ``status: queued`` (warm-up excluded)."""
    rng = random.Random(7)
    in_progress: list[float] = []
    queued: list[float] = []
    async with notify, orch, anyio.create_task_group() as tg:

        async def serve() -> None:
            await orch.run()
            tg.cancel_scope.cancel()  # stops _drain

        tg.start_soon(serve)
        with anyio.fail_after(30):
            while b"READY=1" not in (await notify.receive())[0].split(b"\n"):
                pass
        tg.start_soon(_drain, notify)
        for i in range(moves + 1):  # the first move warms up and is not counted
            fr_id = f"FR-{i + 1}"
            src, dst = world.move_in(f"{fr_id}.md", simple_note(fr_id))
            rest.fr_id, rest.event = fr_id, anyio.Event()
            watch = NoteWatch(dst)
            watch.start()
            start = time.perf_counter()
            os.replace(src, dst)
            with anyio.fail_after(60):
                await rest.event.wait()
            watch.halt.set()
            await anyio.to_thread.run_sync(watch.join)
            if rest.status is not Status.REVIEW or "in-progress" not in watch.seen:
                raise RuntimeError(f"{fr_id} ended {rest.status}, saw {watch.seen}")
            if i:
                in_progress.append(watch.seen["in-progress"] - start)
                queued.append(watch.seen.get("queued", watch.seen["in-progress"]) - start)
            await anyio.sleep(rng.uniform(0.05, 0.15))  # the loop is idle again
        orch.stop()
    return in_progress, queued


async def pickup_latency(base: Path, moves: int) -> Figure:
    world = make_world(base)
    rest = _Rest()
    # READY=1 on NOTIFY_SOCKET (sd_notify) says the first tick is done and the loop serves;
    # the socket lives in a short temp path (a unix socket path has at most 107 bytes)
    with tempfile.TemporaryDirectory(prefix="opus-bench-") as sockets:
        address = Path(sockets) / "notify"
        notify = await anyio.create_unix_datagram_socket(local_path=address)
        environ = {**os.environ, "NOTIFY_SOCKET": str(address)}
        orch = Orchestrator(
            world.config(), agents=instant_agents(), environ=environ, on_change=rest
        )
        in_progress, queued = await _serve_and_move(world, orch, notify, rest, moves)
    p50, p99 = percentile(in_progress, 50), percentile(in_progress, 99)
    base50, base99 = POLL_BASELINE / 2, POLL_BASELINE * 0.99
    return Figure(
        1,
        measured=f"p50 {ms(p50)}, p99 {ms(p99)} (n={len(in_progress)})",
        target="p50 ≤ 50 ms, p99 ≤ 250 ms",
        ok=p50 <= 0.050 and p99 <= 0.250,
        baseline=f"30 s fixed poll: p50 {base50:.0f} s, p99 {base99:.1f} s",
        ratio=f"{ratio(p50, base50)} / {ratio(p99, base99)}",
        details=[
            f"moved in → status: queued p50 {ms(percentile(queued, 50))}, "
            f"p99 {ms(percentile(queued, 99))}",
            f"in-progress min {ms(min(in_progress))}, max {ms(max(in_progress))}; "
            "one warm-up move not counted; moves 50–150 ms after the previous FR rests",
        ],
    )


async def _drain(sock: UNIXDatagramSocket) -> None:
    """Read (and drop) the service's further sd_notify messages."""
    while True:
        await sock.receive()


# --- 2. orchestration overhead -------------------------------------------------------------------


def git_commands(world: World, name: str, adding: threading.Lock | None = None) -> None:
    """The git work one FR needs, run directly: base, worktree, commit, head, diff, stat.

    ``adding``: held around ``worktree add``, which git cannot run twice at once in one
    repository (opus holds a lock per repository there too).
    """
    repo = world.repo
    tree = world.root.parent / "baseline-worktrees" / name
    tree.parent.mkdir(exist_ok=True)
    with adding or contextlib.nullcontext():
        base = git(repo, "rev-parse", "--verify", "refs/heads/main^{commit}")
        git(repo, "worktree", "add", "-q", "-b", f"baseline/{name}", str(tree), base)
    (tree / "bench_change.txt").write_text("one line of change\n")
    git(tree, "add", "-A")
    git(tree, *_COMMIT, "commit", "-q", "--no-verify", "-m", f"baseline({name}): coder")
    git(tree, "rev-parse", "--verify", "HEAD^{commit}")
    git(tree, "diff", "--no-color", "--no-ext-diff", base, "HEAD")
    git(tree, "diff", "--no-color", "--stat", base, "HEAD")


@contextmanager
def git_trace(path: Path) -> Iterator[Counter[str]]:
    """Count the git processes started inside the block, by subcommand (via ``GIT_TRACE``,
    which this process's git children, opus's included, inherit)."""
    counts: Counter[str] = Counter()
    os.environ["GIT_TRACE"] = str(path)
    try:
        yield counts
    finally:
        del os.environ["GIT_TRACE"]
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        _, found, command = line.partition("trace: built-in: git ")
        if not found:
            continue
        words = iter(shlex.split(command))
        for word in words:
            if word in ("-C", "-c"):
                next(words, None)
            elif not word.startswith("-"):
                counts[word] += 1
                break


def _top(counts: Counter[str], per: int = 1) -> str:
    total = sum(counts.values()) / per
    parts = ", ".join(f"{name} {n / per:.3g}" for name, n in counts.most_common(3))
    return f"{total:.3g} ({parts}, …)"


async def overhead(base: Path, runs: int) -> tuple[Figure, float]:
    """Figure 2, and the median single-FR time (figure 7's unit)."""
    world = make_world(base)
    for i in range(runs + 2):
        world.put(f"FR-{i}.md", simple_note(f"FR-{i}"))
    opus: list[float] = []
    direct: list[float] = []
    async with Orchestrator(world.config(), agents=instant_agents()) as orch:
        await orch.process("FR-0")  # warm-up
        git_commands(world, "warm-up")
        for i in range(1, runs + 1):
            start = time.perf_counter()
            git_commands(world, f"b{i}")
            direct.append(time.perf_counter() - start)
            start = time.perf_counter()
            job = await orch.process(f"FR-{i}")
            opus.append(time.perf_counter() - start)
            if job.status is not Status.REVIEW:
                raise RuntimeError(f"FR-{i} ended {job.status}: {job.error}")
        # untimed: count the git processes each side runs
        with git_trace(base / "git-trace-opus.log") as opus_git:
            await orch.process(f"FR-{runs + 1}")
        with git_trace(base / "git-trace-direct.log") as direct_git:
            git_commands(world, "traced")
    o, d = median(opus), median(direct)
    share = (o - d) / d
    return Figure(
        2,
        measured=f"{share * 100:.0f} % (opus {ms(o)} vs git {ms(d)}, median of {runs})",
        target="≤ 50 %",
        ok=share <= 0.50,
        baseline=f"the job's git commands run directly: {ms(d)}",
        ratio=ratio(o, d),
        details=[
            f"git processes per FR: opus {_top(opus_git)}; direct {_top(direct_git)}",
            "opus: Orchestrator.process() of one planned FR → review, 4 instant in-process "
            "agents, local delivery; direct: rev-parse, worktree add -b, add -A, commit, "
            "rev-parse HEAD, diff, diff --stat",
        ],
    ), o


# --- 7. throughput ---------------------------------------------------------------------------


async def _batch(world: World, count: int) -> float:
    """``run_once()`` over ``count`` planned FRs; the wall time in seconds."""
    for i in range(count):
        world.put(f"FR-{i + 1}.md", simple_note(f"FR-{i + 1}"))
    async with Orchestrator(world.config(), agents=instant_agents()) as orch:
        start = time.perf_counter()
        summary = await orch.run_once()
        wall = time.perf_counter() - start
    statuses = set(summary.statuses.values())
    if statuses != {"review"} or len(summary.statuses) != count:
        raise RuntimeError(f"{count} FRs ended as {statuses} ({len(summary.statuses)} FRs)")
    return wall


def git_lanes(world: World, count: int, lanes: int = 3) -> float:
    """The same git work for ``count`` FRs, run directly in ``lanes`` threads; wall time."""
    names = iter(range(count))
    lock, adding = threading.Lock(), threading.Lock()

    def lane() -> None:
        while True:
            with lock:
                n = next(names, None)
            if n is None:
                return
            git_commands(world, f"lane-{n}", adding)

    threads = [threading.Thread(target=lane) for _ in range(lanes)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


async def throughput(base: Path, count: int, single: float | None) -> Figure:
    """N FRs through ``run_once()`` at concurrency 3, against the same git commands run
    directly in 3 parallel lanes (SPEC §12), in one run; also N/5 FRs, for growth per FR."""
    lanes = git_lanes(make_world(base / "lanes"), count)
    wall = await _batch(make_world(base / "batch", concurrency=3), count)
    small = max(3, count // 5)
    small_wall = await _batch(make_world(base / "small", concurrency=3), small)
    with git_trace(base / "git-trace-batch.log") as batch_git:  # untimed, a fresh vault
        await _batch(make_world(base / "traced", concurrency=3), count)
    growth = (wall / count) / (small_wall / small)
    return Figure(
        7,
        measured=f"{count} FRs in {wall:.2f} s ({count / wall:.1f} FR/s)",
        target="≤ 1.25× of the same git commands in 3 parallel lanes",
        ok=wall / lanes <= 1.25,
        baseline=f"git commands of {count} FRs in 3 lanes: {lanes:.2f} s",
        ratio=ratio(wall, lanes),
        details=[
            f"run_once() over {count} planned FRs, concurrency 3, instant agents; "
            f"git processes per FR: {_top(batch_git, count)}",
            f"per-FR time at {count} vs {small} FRs: {ms(wall / count)} vs "
            f"{ms(small_wall / small)} ({growth:.2f}×: growth with the batch)",
        ],
    )

"""Figures 3–6: scanning a large vault, checkpoint cost against history, and a served vault.

3. vault scan — ``Vault.scan()`` of N realistic notes: cold (a new ``Vault``, files in the
   page cache) and unchanged (the same ``Vault`` again), against a bare scandir + stat.
4. checkpoint cost — ``Registry.save()`` with 10 jobs against N finished jobs kept live in
   ``registry.json`` and N jobs in ``archive/``.
5./6. idle CPU and memory — ``opus run`` serving the N-note vault in a child process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from report import Figure, median, ms, percentile, ratio
from world import World

from opus.orchestrator import Checkpoint, Job, Outcome, Priority, Stage, Status, Usage
from opus.orchestrator.registry import Registry
from opus.orchestrator.vault import Vault

# --- 3. vault scan ---------------------------------------------------------------------------


def bare_scan(folder: Path) -> int:
    """The floor of any scan: list the folder and stat every ``*.md``; returns the count."""
    count = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(".md"):
                entry.stat(follow_symlinks=False)
                count += 1
    return count


def _timed(repeats: int, work: Callable[[], object]) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return times


def vault_scan(world: World, count: int, cold_runs: int) -> tuple[Figure, float]:
    """Figure 3, and the bare scandir + stat time (figure 5's baseline)."""
    config = world.config()
    for path in world.planned.iterdir():  # the page cache holds every note
        path.read_bytes()
    if bare_scan(world.planned) != count:
        raise RuntimeError(f"expected {count} notes in {world.planned}")
    bare = median(_timed(10, lambda: bare_scan(world.planned)))
    cold: list[float] = []
    vault = Vault(config)
    for _ in range(cold_runs):
        vault = Vault(config)
        start = time.perf_counter()
        scan = vault.scan()
        cold.append(time.perf_counter() - start)
        if len(scan.frs) != count or scan.problems:
            raise RuntimeError(f"scan found {len(scan.frs)} FRs, {len(scan.problems)} problems")
    parses = vault.parses
    unchanged = median(_timed(10, vault.scan))
    if vault.parses != parses:
        raise RuntimeError("an unchanged scan parsed notes again")
    c = median(cold)
    return Figure(
        3,
        measured=f"cold {ms(c)}, unchanged {ms(unchanged)} ({count:,} notes)",
        target="cold ≤ 1 s, unchanged ≤ 100 ms",
        ok=c <= 1.0 and unchanged <= 0.100,
        baseline=f"bare scandir + stat {ms(bare)}",
        ratio=f"{ratio(c, bare)} / {ratio(unchanged, bare)}",
        details=[
            f"cold: median of {cold_runs} new Vault objects (min {ms(min(cold))}); "
            f"unchanged: median of 10 rescans, 0 notes reparsed",
        ],
    ), bare


# --- 4. checkpoint cost ------------------------------------------------------------------------


def _job_template(finished: datetime) -> str:
    """A finished job's registry row (5 checkpoints, usage) with ``{i}`` placeholders."""
    history = [
        Checkpoint(
            stage=stage,
            iteration=1,
            outcome=Outcome.OK,
            started_at=finished,
            finished_at=finished,
            commit="c" * 40,
            artifact=f"{stage}.md",
            usage=Usage(input_tokens=12000, output_tokens=900, cost_usd=0.04),
        )
        for stage in Stage
    ]
    job = Job(
        id="20260101-000000-fr-{i}-beef",
        fr_id="FR-{i}",
        fr_path="10_features/03_planned/FR-{i}.md",
        title="Finished thing {i}",
        priority=Priority.MEDIUM,
        status=Status.DONE,
        repo="app",
        branch="opus/fr-{i}",
        base_commit="b" * 40,
        created_at=finished,
        updated_at=finished,
        finished_at=finished,
        usage=Usage(input_tokens=60000, output_tokens=4500, cost_usd=0.2),
        history=history,
    )
    return json.dumps(job.model_dump(mode="json"), separators=(",", ":"))


def _write_history(state: Path, jobs: int, *, archived: bool) -> None:
    """``jobs`` finished jobs: live in registry.json, or in archive/ (older than keep_days)."""
    (state / "archive").mkdir(parents=True)
    now = datetime.now().replace(microsecond=0)
    if archived:
        row = _job_template(now - timedelta(days=90))
        month = f"{now - timedelta(days=90):%Y-%m}.jsonl"
        with open(state / "archive" / month, "w") as f:
            f.writelines(row.replace("{i}", str(i)) + "\n" for i in range(jobs))
        (state / "registry.json").write_text('{"version":1,"jobs":[]}')
        return
    row = _job_template(now - timedelta(days=1))
    with open(state / "registry.json", "w") as f:
        f.write('{"version":1,"jobs":[')
        f.write(",".join(row.replace("{i}", str(i)) for i in range(jobs)))
        f.write("]}")


class _History:
    """One registry holding a given history, and the save times measured on it."""

    def __init__(self, state: Path, jobs: int, *, archived: bool) -> None:
        _write_history(state, jobs, archived=archived)
        self.registry = Registry(state, now=datetime.now)
        start = time.perf_counter()
        self.registry.open()
        self.open = time.perf_counter() - start
        self.job = self.registry.create(
            fr_id="FR-live",
            fr_path="10_features/03_planned/FR-live.md",
            title="Live",
            priority=Priority.HIGH,
            repo="app",
            branch="opus/fr-live",
        )
        self.job.status = Status.IN_PROGRESS
        self.saves: list[float] = []
        self.rewrites: list[float] = []

    def save(self, n: int, *, rewrite: bool = False) -> None:
        """Time one checkpoint; ``rewrite``: one that falls due for the registry.json rewrite."""
        self.job.stage = _STAGES[n % 4]
        self.registry.flush_interval = 0.0 if rewrite else 1.0
        start = time.perf_counter()
        self.registry.save(self.job, "checkpoint", stage=self.job.stage.value, iteration=1)
        (self.rewrites if rewrite else self.saves).append(time.perf_counter() - start)


_STAGES = list(Stage)


def checkpoint_cost(base: Path, jobs: int, saves: int, rewrites: int = 21) -> Figure:
    """Saves alternate between the three registries, so disk noise hits them alike."""
    small = _History(base / "small", 10, archived=False)
    live = _History(base / "live", jobs, archived=False)
    archived = _History(base / "archived", jobs, archived=True)
    histories = (small, live, archived)
    os.sync()
    for n in range(saves):
        for h in histories:
            h.save(n)
    for n in range(rewrites):  # a rewrite of the large live registry takes ~1 s: fewer of those
        for h in histories if n < 5 else (small, archived):
            h.save(n, rewrite=True)
    sizes = [h.registry.registry_file.stat().st_size for h in histories]
    s, lv, ar = (median(h.saves) for h in histories)
    rs, rl, ra = (median(h.rewrites) for h in histories)
    worst = max(lv / s, ar / s, rl / rs, ra / rs)
    many = f"{jobs:,}"
    return Figure(
        4,
        measured=(
            f"median save {ms(s)} / {ms(lv)} / {ms(ar)}; save that rewrites "
            f"registry.json {ms(rs)} / {ms(rl)} / {ms(ra)} (10 jobs / {many} live / "
            f"{many} archived)"
        ),
        target="≤ 1.5× (cost independent of history)",
        ok=worst <= 1.5,
        baseline=f"10 jobs: save {ms(s)}, rewriting save {ms(rs)}",
        ratio=(
            f"save {ratio(lv, s)} / {ratio(ar, s)}; rewriting save "
            f"{ratio(rl, rs)} / {ratio(ra, rs)} (live / archived)"
        ),
        details=[
            f"{saves} back-to-back saves per registry (flush_interval 1 s), interleaved; "
            f"p99 {ms(percentile(small.saves, 99))} / {ms(percentile(live.saves, 99))} / "
            f"{ms(percentile(archived.saves, 99))}",
            f"rewriting save: median of {rewrites} ({min(rewrites, 5)} for the live "
            f"registry) with flush_interval 0 — what every "
            f"checkpoint costs when checkpoints come ≥ 1 s apart; registry.json is "
            f"{sizes[0] / 1e3:.0f} kB / {sizes[1] / 1e6:.0f} MB / {sizes[2] / 1e3:.1f} kB",
            f"Registry.open: 10 jobs {ms(small.open)}, {many} live {live.open:.2f} s, "
            f"{many} archived {ms(archived.open)}",
        ],
    )


# --- 5./6. the served vault: idle CPU and memory -----------------------------------------------


def _opus_command() -> list[str]:
    script = Path(sys.executable).parent / "opus"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from opus.cli import main; main()"]


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime + stime, cutime + cstime) of ``pid`` in seconds, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    own = (int(fields[11]) + int(fields[12])) / tick
    children = (int(fields[13]) + int(fields[14])) / tick
    return own, children


def _memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of ``pid`` in MB."""
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        match = re.match(r"(VmRSS|VmHWM):\s+(\d+) kB", line)
        if match:
            found[match.group(1)] = int(match.group(2)) / 1024
    return found


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _baseline_rss() -> float:
    """VmRSS of a Python process that imported opus's whole stack and serves nothing."""
    code = (
        "import sys, opus.cli, opus.orchestrator.service, opus.orchestrator.agents.presets;"
        "print('ready', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the baseline process did not start")
        return _memory(proc.pid)["VmRSS"]
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=30)


def served_vault(world: World, count: int, window: float, bare: float) -> tuple[Figure, Figure]:
    """Figures 5 and 6 from one ``opus run`` child serving the vault's ``count`` notes."""
    proc = subprocess.Popen(
        [*_opus_command(), "run", "--config", str(world.config_file)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    serving = threading.Event()

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip())
            if "serving " in line:
                serving.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    started = time.perf_counter()
    try:
        while not serving.wait(0.05):
            if proc.poll() is not None or time.perf_counter() - started > 120:
                raise RuntimeError("opus run did not start serving:\n" + "\n".join(lines[-20:]))
        startup = time.perf_counter() - started
        cpu0, kids0 = _cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        time.sleep(window)
        cpu1, kids1 = _cpu_seconds(proc.pid)
        elapsed = time.perf_counter() - t0
        memory = _memory(proc.pid)
        if proc.poll() is not None:
            raise RuntimeError("opus run exited:\n" + "\n".join(lines[-20:]))
    finally:
        _stop(proc)
        reader.join(timeout=5)
    warnings = [line for line in lines if line.startswith(("warning", "error"))]
    share = (cpu1 - cpu0) / elapsed * 100
    tick = os.sysconf("SC_CLK_TCK")
    poll_share = bare / 30 * 100
    base_rss = _baseline_rss()
    rss, hwm = memory["VmRSS"], memory["VmHWM"]
    cpu = Figure(
        5,
        measured=f"{share:.3f} % of one core ({cpu1 - cpu0:.2f} CPU-s in {elapsed:.1f} s)",
        target="≤ 0.5 %",
        ok=share <= 0.5,
        baseline=f"bare scandir + stat every 30 s: {poll_share:.3f} %",
        ratio=ratio(share, poll_share),
        details=[
            f"opus run (watch on) serving {count:,} resting notes; window starts after the "
            f"'serving' log line ({startup:.2f} s after spawn); /proc utime+stime, "
            f"{tick} ticks/s (1 tick = {100 / tick / elapsed:.3f} %); "
            f"children CPU {kids1 - kids0:.2f} s; "
            f"{len(warnings)} warning line(s) logged",
        ],
    )
    mem = Figure(
        6,
        measured=f"VmHWM {hwm:.0f} MB, VmRSS {rss:.0f} MB ({count:,} notes)",
        target="≤ 150 MB",
        ok=hwm <= 150,
        baseline=f"Python + opus imports, no vault: {base_rss:.0f} MB",
        ratio=ratio(hwm, base_rss),
        details=[f"same child as figure 5, read at the end of its {elapsed:.0f} s window"],
    )
    return cpu, mem

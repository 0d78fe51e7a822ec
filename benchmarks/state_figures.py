"""Figures 3, 5 and 6: scanning a large vault, and serving it.

3. vault scan — ``Vault.scan()`` of N realistic notes: cold (a new ``Vault``, files in the
   page cache) and unchanged (the same ``Vault`` again), against a bare scandir + stat.
5./6. idle CPU and memory — ``opus run`` serving the N-note vault in a child process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from report import Figure, median, ms, ratio
from world import World

from opus.orchestrator.plain_yaml import forget
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
        forget()  # a cold scan starts with the line memos of a new process
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
        target="cold ≤ 0.7 s (SPEC: 1 s), unchanged ≤ 100 ms",
        ok=c <= 0.7 and unchanged <= 0.100,
        baseline=f"bare scandir + stat {ms(bare)}",
        ratio=f"{ratio(c, bare)} / {ratio(unchanged, bare)}",
        details=[
            f"cold: median of {cold_runs} new Vault objects (min {ms(min(cold))}); "
            f"unchanged: median of 10 rescans, 0 notes reparsed",
        ],
    ), bare


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

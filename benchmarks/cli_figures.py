"""Figures 8 and 9: the command line's latency, and ``opus metrics`` against history.

8. CLI latency — ``opus --version`` and ``opus status`` (a vault of N FR notes, each with its
   finished job in ``registry.json``), each a new process, against ``python -c pass``; also
   timed: the floor of a command line built on click with pydantic-validated settings (SPEC
   §6, §13) — importing both and defining one model, opus's own code not imported.

9. metrics — ``opus metrics --json`` with no archive vs with M archived jobs spread over the
   ten months before this one (their job folders kept, as opus keeps them), each a new
   process; the registry rolls the archive up when it opens (once, untimed).

Every process runs with its bytecode cached, as an installed opus runs (pip compiles it at
install): ``PYTHONDONTWRITEBYTECODE`` is dropped from the children's environment and the
bytecode goes to a cache in the run's temporary folder (``PYTHONPYCACHEPREFIX``, filled by an
untimed first run), so a shell that sets it does not make every run compile opus's modules
again (~100 ms of ``opus status``), and the source tree is not written.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from checkpoint_figure import _job_template
from report import Figure, median, ms, ratio
from world import World, make_world

from opus.orchestrator.registry import Registry

OPUS = [sys.executable, "-m", "opus"]
DEPENDENCIES = "import click, pydantic\nclass A(pydantic.BaseModel):\n    x: int = 0\n"
"""What any ``opus`` command that reads the configuration must run before its own code."""


def compiled(base: Path) -> dict[str, str]:
    """The children's environment: bytecode written to (and read from) a cache under
    ``base``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(base / "pycache")
    return env


def _timed(
    argv: list[str], runs: int, env: dict[str, str] | None = None, *, warm: bool = True
) -> float:
    """Median wall time of ``runs`` runs, after an untimed one (which fills the bytecode
    cache) unless ``warm`` is false; their CPU time (user + system) goes to ``CPU``."""
    if warm:
        subprocess.run(argv, capture_output=True, env=env, check=False)
    times, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, env=env, check=False)
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            raise RuntimeError(f"{argv} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    CPU[" ".join(argv[1:4])] = median(cpus)
    return median(times)


CPU: dict[str, float] = {}
"""Median CPU seconds of the last timing of each command (robust to a busy machine)."""


def _fill(world: World, jobs: int) -> None:
    """N notes resting at ``done`` and their jobs in registry.json."""
    now = datetime.now().replace(microsecond=0)
    row = _job_template(now - timedelta(hours=1))
    state = world.root / ".opus"
    state.mkdir(exist_ok=True)
    with open(state / "registry.json", "w") as f:
        f.write('{"version":1,"jobs":[' + ",".join(row.replace("{i}", str(i)) for i in range(jobs)))
        f.write("]}")
    for i in range(jobs):
        world.put(
            f"FR-{i}.md",
            f"---\nid: FR-{i}\nstatus: done\njob_id: 20260101-000000-fr-{i}-beef\n---\n# FR {i}\n",
        )


def cli_latency(base: Path, jobs: int, runs: int) -> Figure:
    world = make_world(base / "status")
    _fill(world, jobs)
    config = str(world.config_file)
    env = compiled(base)
    floor = _timed([sys.executable, "-c", "pass"], runs, env)
    version = _timed([*OPUS, "--version"], runs, env)
    deps = _timed([sys.executable, "-c", DEPENDENCIES], runs, env)
    status = _timed([*OPUS, "status", "--config", config], max(3, runs // 2), env)
    return Figure(
        8,
        measured=f"--version {ms(version)}, status {ms(status)} ({jobs:,} jobs)",
        target="--version ≤ 60 ms, status ≤ 150 ms",
        ok=version <= 0.060 and status <= 0.150,
        baseline=f"python -c pass {ms(floor)}",
        ratio=f"{ratio(version, floor)} / {ratio(status, floor)}",
        details=[
            f"each a new process, bytecode cached, median of {runs} (status: "
            f"{max(3, runs // 2)}); CPU time "
            f"(user + system): python {ms(CPU['-c pass'])}, --version "
            f"{ms(CPU['-m opus --version'])}, status {ms(CPU['-m opus status'])}",
            f"floor of click + pydantic + one model (no opus code): {ms(deps)} "
            f"({ratio(deps, floor)} of python); status is {ratio(status, deps)} of it",
        ],
    )


def _archive(state: Path, jobs: int) -> None:
    """M archived jobs over ten past months, each with its job folder and event log."""
    archive = state / "archive"
    archive.mkdir(parents=True)
    now = datetime.now().replace(microsecond=0)
    months = 10
    for m in range(months):
        finished = (now.replace(day=1) - timedelta(days=1 + 31 * m)).replace(day=15)
        row = _job_template(finished)
        ids = range(m, jobs, months)
        with open(archive / f"{finished:%Y-%m}.jsonl", "w") as f:
            f.writelines(row.replace("{i}", str(i)) + "\n" for i in ids)
        for i in ids:
            folder = state / "jobs" / f"20260101-000000-fr-{i}-beef"
            folder.mkdir(parents=True)
            (folder / "events.jsonl").write_text('{"event":"archived"}\n')
    Registry(state, now=datetime.now).open()  # rolls the archive up, as opus's start does


def metrics_history(base: Path, jobs: int, runs: int) -> Figure:
    empty, full = make_world(base / "empty"), make_world(base / "full")
    Registry(empty.root / ".opus", now=datetime.now).open()
    _archive(full.root / ".opus", jobs)
    argv = [*OPUS, "metrics", "--json", "--since", "400", "--config"]
    env = compiled(base)
    t0 = t1 = 0.0
    zero, many = [], []
    for world in (empty, full):  # untimed: fills the bytecode cache
        subprocess.run([*argv, str(world.config_file)], capture_output=True, env=env, check=True)
    for _ in range(runs):  # interleaved, so noise hits both alike
        zero.append(_timed([*argv, str(empty.config_file)], 1, env, warm=False))
        many.append(_timed([*argv, str(full.config_file)], 1, env, warm=False))
    t0, t1 = median(zero), median(many)
    done = subprocess.run([*argv, str(full.config_file)], capture_output=True, env=env, check=True)
    counted = json.loads(done.stdout)["jobs"]
    return Figure(
        9,
        measured=f"{ms(t0)} vs {ms(t1)} ({jobs:,} archived jobs, {counted:,} counted)",
        target="≤ 1.5× (independent of history)",
        ok=t1 <= 1.5 * t0 and counted == jobs,
        baseline=f"no archive: {ms(t0)}",
        ratio=ratio(t1, t0),
        details=[
            f"`opus metrics --json --since 400`, a new process each, median of {runs}, "
            "interleaved; the archive is read through its monthly roll-ups"
        ],
    )

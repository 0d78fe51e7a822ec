"""``opus logs FR [--stage S] [-f]``: an FR's agent output, from its stage log files.

A stage writes ``jobs/<job>/<stage>-<iteration>.log`` as its agent prints (SPEC §8); these
functions only read those files, so they work while the service runs, or without it.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from pathlib import Path

from .config import Config
from .lifecycle import Status
from .models import Job
from .reactions import artifact_tag

__all__ = ("current_log", "follow", "headed", "stage_logs")

_LOG = re.compile(r"^(?P<stage>[a-z]+)-(?:r(?P<round>\d+)-)?(?P<iteration>\d+)\.log$")
"""``coder-2.log`` in round 1, ``coder-r2-1.log`` in a rework round (SPEC §15)."""
_MOVING = (Status.IN_PROGRESS, Status.QUEUED)


def stage_logs(config: Config, job: Job) -> list[Path]:
    """The job's stage logs, oldest first (by iteration, then by when they were written)."""
    folder = config.state_dir / "jobs" / job.id
    found = []
    for path in folder.glob("*.log") if folder.is_dir() else []:
        m = _LOG.match(path.name)
        if m:
            try:
                order = (int(m["round"] or 1), int(m["iteration"]))
                found.append((path.stat().st_mtime_ns, order, path))
            except OSError:
                continue
    return [p for _, _, p in sorted(found, key=lambda t: (t[0], t[1]))]


def current_log(config: Config, job: Job, stage: str | None = None) -> Path | None:
    """The log of ``stage`` (its latest iteration), else of the running stage, else the last."""
    logs = stage_logs(config, job)
    if stage is not None:
        mine = [p for p in logs if p.name.startswith(f"{stage}-")]
        return mine[-1] if mine else None
    if job.status is Status.IN_PROGRESS and job.stage is not None:
        tag = artifact_tag(job.round, job.iteration)
        running = config.state_dir / "jobs" / job.id / f"{job.stage}-{tag}.log"
        if running.exists():
            return running
    return logs[-1] if logs else None


def follow(
    config: Config,
    job_of: Callable[[], Job | None],
    out: Callable[[Path, str], None],
    *,
    stage: str | None = None,
    poll: float = 0.25,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Hand ``out`` the job's stage logs as they grow, as (log, complete lines) — from the
    current one on, then each log a later stage starts (stages that run side by side
    included) — until the FR rests (its job is neither queued nor in progress). With
    ``stage``, only that stage's logs. ``headed`` makes ``out`` of a plain text printer."""
    offsets: dict[Path, int] = {}
    first = True
    while True:
        job = job_of()
        if job is None:
            return
        logs = stage_logs(config, job)
        if stage is not None:
            logs = [p for p in logs if p.name.startswith(f"{stage}-")]
        if first:  # earlier stages are history: start at the current (or last) log
            first = False
            start = current_log(config, job, stage)
            if start is not None and start in logs:
                logs = logs[logs.index(start) :]
                for p in stage_logs(config, job):
                    if p not in logs:
                        offsets[p] = -1  # never shown
        for path in logs:
            before = offsets.get(path, 0)
            if before >= 0:
                offsets[path] = _drain(path, before, functools.partial(out, path))
        if job.status not in _MOVING:
            return
        sleep(poll)


def headed(echo: Callable[[str], None]) -> Callable[[Path, str], None]:
    """``follow``'s ``out`` for a terminal: the text, after a ``==> name <==`` line whenever
    the output switches file."""
    shown: list[Path] = []

    def out(path: Path, text: str) -> None:
        if shown != [path]:
            shown[:] = [path]
            echo(f"==> {path.name} <==\n")
        echo(text)

    return out


def _drain(path: Path, offset: int, echo: Callable[[str], None]) -> int:
    """Print the complete lines written since ``offset``; return the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return offset
    cut = data.rfind(b"\n") + 1
    if cut:
        echo(data[:cut].decode("utf-8", "replace"))
    return offset + cut

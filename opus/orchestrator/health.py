"""The liveness file ``health.json``: rewritten every tick, read by ``opus health``.

Format (version 1)::

    {"version": 1, "pid": 123, "started_at": "…", "last_tick": "…",
     "running": [{…}, …], "queued": 2}

Date-times are ISO 8601 strings, as given (aware or naive local time).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from .atomic import atomic_write
from .lock import InstanceLock

__all__ = ("check_health", "health_record", "write_health")

VERSION = 1


def write_health(
    path: Path,
    *,
    pid: int,
    started_at: datetime,
    last_tick: datetime,
    running: list[dict[str, Any]],
    queued: int,
    executor: str | None = None,
) -> None:
    """Atomically replace ``path`` with the service's liveness record (mode 0600)."""
    record = {
        "version": VERSION,
        "pid": pid,
        "started_at": started_at.isoformat(),
        "last_tick": last_tick.isoformat(),
        "running": running,
        "queued": queued,
    }
    if executor:
        record["executor"] = executor
    data = json.dumps(record, default=_default, separators=(",", ":")).encode()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, data + b"\n", sync=False)  # liveness, rewritten every tick


def check_health(path: Path, *, now: datetime, max_age: float) -> tuple[bool, str]:
    """Whether the service that writes ``path`` is alive and ticking, and a line saying why.

    Healthy iff the file exists and parses, its pid is alive and ``now - last_tick <= max_age``.
    """
    record = health_record(path, now=now, max_age=max_age)
    return bool(record["ok"]), str(record["reason"])


def health_record(
    path: Path, *, now: datetime, max_age: float, lock: Path | None = None
) -> dict[str, Any]:
    """``check_health`` as data for ``opus health --json``: ``ok``, ``reason``, and what the
    file says (``pid``, ``started_at``, ``last_tick``, ``age`` in seconds, ``running``,
    ``queued``) when it could be read. With ``lock`` (the instance lock), a pid that no
    longer holds it is not running either: it is on its way out (``opus stop`` returned)."""
    out: dict[str, Any] = {"ok": False, "reason": "", "health_file": str(path)}
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {**out, "reason": f"no health file at {path}"}
    except OSError as e:
        return {**out, "reason": f"cannot read health file {path}: {e.strerror or e}"}
    try:
        record = json.loads(raw)
        pid = record["pid"]
        last_tick = datetime.fromisoformat(record["last_tick"])
    except (ValueError, TypeError, KeyError) as e:
        return {**out, "reason": f"health file {path} is unreadable: {type(e).__name__}: {e}"}
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return {**out, "reason": f"health file {path} holds no valid pid: {pid!r}"}
    age = max(0.0, _seconds_between(last_tick, now))
    running = record.get("running")
    out.update(
        pid=pid,
        started_at=record.get("started_at"),
        last_tick=last_tick.isoformat(),
        age=round(age, 3),
        running=running if isinstance(running, list) else [],
        queued=record.get("queued", 0),
    )
    if record.get("executor"):
        out["executor"] = record["executor"]  # why remote stages wait (SPEC §18)
    if not _alive(pid):
        return {**out, "reason": f"pid {pid} is not running"}
    if lock is not None and InstanceLock(lock).holder() != pid:
        return {**out, "reason": f"pid {pid} is not running opus (it does not hold {lock})"}
    if age > max_age:
        return {**out, "reason": f"last tick {age:.0f} s ago (limit {max_age:g} s)"}
    count = len(out["running"])
    waits = record.get("executor")
    why = f"; remote stages wait: {waits}" if waits else ""
    return {
        **out,
        "ok": True,
        "reason": f"ok: pid {pid}, {count} running, last tick {age:.0f} s ago{why}",
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it just is not ours
    return True


def _seconds_between(earlier: datetime, later: datetime) -> float:
    """``later - earlier`` in seconds; a naive side counts as local time if the other is aware."""
    if (earlier.tzinfo is None) != (later.tzinfo is None):
        earlier, later = earlier.astimezone(), later.astimezone()
    return (later - earlier).total_seconds()


def _default(value: object) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)

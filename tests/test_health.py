"""health.json: atomic 0600 writes and the liveness verdict with real pids."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from opus.orchestrator.health import check_health, write_health

T0 = datetime(2026, 11, 21, 10, 30, 0)


def write(path: Path, *, pid: int, last_tick: datetime = T0, **extra: Any) -> None:
    running: list[dict[str, Any]] = extra.pop("running", [])
    write_health(
        path,
        pid=pid,
        started_at=T0 - timedelta(hours=1),
        last_tick=last_tick,
        running=running,
        queued=extra.pop("queued", 0),
    )


@pytest.fixture
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert child.wait(timeout=30) == 0  # reaped: its pid no longer exists
    return child.pid


def test_write_is_atomic_private_json(tmp_path: Path) -> None:
    path = tmp_path / "state" / "health.json"
    running = [{"job_id": "j1", "fr_id": "FR-1", "stage": "coder", "since": T0}]
    write(path, pid=os.getpid(), running=running, queued=2)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record == {
        "version": 1,
        "pid": os.getpid(),
        "started_at": "2026-11-21T09:30:00",
        "last_tick": "2026-11-21T10:30:00",
        "running": [{"job_id": "j1", "fr_id": "FR-1", "stage": "coder", "since": T0.isoformat()}],
        "queued": 2,
    }
    write(path, pid=os.getpid(), last_tick=T0 + timedelta(seconds=5))
    assert json.loads(path.read_text(encoding="utf-8"))["last_tick"] == "2026-11-21T10:30:05"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["health.json"]  # no temp files


def test_healthy(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    write(path, pid=os.getpid(), running=[{"job_id": "a"}, {"job_id": "b"}])
    ok, why = check_health(path, now=T0 + timedelta(seconds=3), max_age=120)
    assert ok is True
    assert why == f"ok: pid {os.getpid()}, 2 running, last tick 3 s ago"


def test_age_equal_to_the_limit_is_healthy(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    write(path, pid=os.getpid())
    assert check_health(path, now=T0 + timedelta(seconds=120), max_age=120)[0] is True
    assert check_health(path, now=T0 + timedelta(seconds=121), max_age=120)[0] is False


def test_no_file(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    assert check_health(path, now=T0, max_age=120) == (False, f"no health file at {path}")


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"pid": 1}', b'{"pid": 1, "last_tick": "yesterday"}', b"\xff\xfe"],
)
def test_unreadable_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "health.json"
    path.write_bytes(content)
    ok, why = check_health(path, now=T0, max_age=120)
    assert ok is False
    assert why.startswith(f"health file {path} is unreadable")


@pytest.mark.parametrize("pid", [0, -5, "123", True])
def test_invalid_pid(tmp_path: Path, pid: object) -> None:
    path = tmp_path / "health.json"
    path.write_text(json.dumps({"pid": pid, "last_tick": T0.isoformat()}), encoding="utf-8")
    ok, why = check_health(path, now=T0, max_age=120)
    assert ok is False
    assert "no valid pid" in why


def test_dead_pid(tmp_path: Path, dead_pid: int) -> None:
    path = tmp_path / "health.json"
    write(path, pid=dead_pid)
    ok, why = check_health(path, now=T0, max_age=120)
    assert (ok, why) == (False, f"pid {dead_pid} is not running")


def test_a_live_pid_that_no_longer_holds_the_lock_is_not_running(tmp_path: Path) -> None:
    """Between ``opus stop`` returning (the lock released) and the process being gone."""
    from opus.orchestrator.health import health_record
    from opus.orchestrator.lock import InstanceLock

    path, lock = tmp_path / "health.json", tmp_path / "opus.lock"
    write(path, pid=os.getpid())
    with InstanceLock(lock):
        held = health_record(path, now=T0, max_age=120, lock=lock)
    assert held["ok"] is True, held
    gone = health_record(path, now=T0, max_age=120, lock=lock)
    assert gone["ok"] is False
    assert gone["reason"] == f"pid {os.getpid()} is not running opus (it does not hold {lock})"


def test_stale_tick(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    write(path, pid=os.getpid())
    ok, why = check_health(path, now=T0 + timedelta(seconds=512), max_age=120)
    assert (ok, why) == (False, "last tick 512 s ago (limit 120 s)")


def test_another_users_pid_counts_as_alive(tmp_path: Path) -> None:
    # pid 1 always exists; unless we are root, os.kill(1, 0) raises PermissionError
    path = tmp_path / "health.json"
    write(path, pid=1)
    ok, why = check_health(path, now=T0, max_age=120)
    assert ok is True
    assert why.startswith("ok: pid 1, 0 running")


def test_aware_and_naive_times_mix(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    tick = datetime.now(UTC)
    write(path, pid=os.getpid(), last_tick=tick)
    local_now = (tick + timedelta(seconds=10)).astimezone().replace(tzinfo=None)
    assert check_health(path, now=local_now, max_age=60) == (
        True,
        f"ok: pid {os.getpid()}, 0 running, last tick 10 s ago",
    )
    assert check_health(path, now=tick + timedelta(seconds=90), max_age=60)[0] is False


def test_tick_in_the_future_is_not_negative(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    write(path, pid=os.getpid(), last_tick=T0 + timedelta(seconds=30))
    ok, why = check_health(path, now=T0, max_age=120)
    assert ok is True
    assert why.endswith("last tick 0 s ago")


CHECK_AS_NOBODY = """
import json, os, shutil, sys, tempfile
from datetime import datetime
from pathlib import Path
from opus.orchestrator.health import check_health, write_health
folder = Path(tempfile.mkdtemp(prefix="opus-health-"))
os.chown(folder, 65534, 65534)
os.setgid(65534)
os.setuid(65534)
try:
    try:
        os.kill(1, 0)
        denied = False
    except PermissionError:
        denied = True
    t = datetime(2026, 1, 1)
    write_health(folder / "h.json", pid=1, started_at=t, last_tick=t, running=[], queued=0)
    print(json.dumps([denied, *check_health(folder / "h.json", now=t, max_age=5)]))
finally:
    shutil.rmtree(folder)
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another user")
def test_permission_error_counts_as_alive() -> None:
    # as root, os.kill never raises PermissionError: check from a child that dropped to nobody
    result = subprocess.run(
        [sys.executable, "-c", CHECK_AS_NOBODY], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    denied, ok, why = json.loads(result.stdout)
    assert denied is True
    assert ok is True
    assert why == "ok: pid 1, 0 running, last tick 0 s ago"

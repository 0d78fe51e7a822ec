"""The single-instance lock, with real child processes holding and contending for it."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from opus.orchestrator.errors import LockHeld
from opus.orchestrator.lock import InstanceLock, cleanup_temp_files

HOLD = """
import subprocess, sys
from pathlib import Path
from opus.orchestrator.lock import InstanceLock
InstanceLock(Path(sys.argv[1])).acquire()
extra = ""
if len(sys.argv) > 2:  # start a grandchild that outlives us (like an agent would)
    child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"],
                             close_fds=False)
    extra = f" {child.pid}"
print("held" + extra, flush=True)
sys.stdin.read()
"""

CONTEND = """
import sys
from pathlib import Path
from opus.orchestrator.errors import LockHeld
from opus.orchestrator.lock import InstanceLock
try:
    InstanceLock(Path(sys.argv[1])).acquire()
except LockHeld as e:
    print(e.pid, flush=True)
    sys.exit(3)
print("acquired", flush=True)
"""


def _holder(path: Path, *extra: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    words = proc.stdout.readline().split()
    assert words[:1] == ["held"], "the child did not take the lock"
    return proc, words[1:]


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def test_acquire_writes_pid_and_release_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "opus.lock"
    lock = InstanceLock(path)
    assert lock.holder() is None
    lock.acquire()
    assert lock.held
    assert path.read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert InstanceLock(path).holder() == os.getpid()
    lock.release()
    assert not lock.held
    assert path.exists()
    assert InstanceLock(path).holder() is None
    lock.acquire()  # a released lock can be taken again
    assert lock.held and InstanceLock(path).holder() == os.getpid()
    lock.release()
    assert not lock.held


def test_second_lock_in_this_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "opus.lock"
    with InstanceLock(path):
        with pytest.raises(LockHeld) as info:
            InstanceLock(path).acquire()
        assert info.value.pid == os.getpid()
        assert str(os.getpid()) in str(info.value)
        assert path.read_text() == f"{os.getpid()}\n"  # the failed attempt truncated nothing
    assert InstanceLock(path).holder() is None


def test_context_manager_releases_on_error(tmp_path: Path) -> None:
    path = tmp_path / "opus.lock"
    with pytest.raises(RuntimeError), InstanceLock(path):
        raise RuntimeError("boom")
    assert InstanceLock(path).holder() is None


def test_child_process_is_refused_with_our_pid(tmp_path: Path) -> None:
    path = tmp_path / "opus.lock"
    with InstanceLock(path):
        done = subprocess.run(
            [sys.executable, "-c", CONTEND, str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 3, done.stderr
        assert done.stdout.strip() == str(os.getpid())
        assert path.read_text() == f"{os.getpid()}\n"
    done = subprocess.run(
        [sys.executable, "-c", CONTEND, str(path)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "acquired"


def test_lock_of_a_sigkilled_holder_is_free(tmp_path: Path) -> None:
    path = tmp_path / "opus.lock"
    proc, _ = _holder(path)
    try:
        with pytest.raises(LockHeld) as info:
            InstanceLock(path).acquire()
        assert info.value.pid == proc.pid
        assert InstanceLock(path).holder() == proc.pid
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        _stop(proc)
    assert path.read_text() == f"{proc.pid}\n"  # a stale pid, but nobody holds the lock
    assert InstanceLock(path).holder() is None
    with InstanceLock(path) as lock:
        assert lock.holder() == os.getpid()
        assert path.read_text() == f"{os.getpid()}\n"


def test_lock_is_not_inherited_by_a_holders_children(tmp_path: Path) -> None:
    path = tmp_path / "opus.lock"
    proc, words = _holder(path, "spawn")
    grandchild = int(words[0])
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        os.kill(grandchild, 0)  # the grandchild still runs
        with InstanceLock(path) as lock:
            assert lock.held
    finally:
        _stop(proc)
        try:
            os.kill(grandchild, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_cleanup_temp_files(tmp_path: Path) -> None:
    (tmp_path / ".opus-tmp-registry.json.x1").write_text("{")
    (tmp_path / ".opus-tmp-plan.md.x2").write_text("half")
    (tmp_path / "registry.json").write_text("{}")
    (tmp_path / ".opus-tmp-dir").mkdir()
    removed = cleanup_temp_files(tmp_path, ".opus-tmp-")
    assert sorted(p.name for p in removed) == [".opus-tmp-plan.md.x2", ".opus-tmp-registry.json.x1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".opus-tmp-dir", "registry.json"]
    assert cleanup_temp_files(tmp_path / "missing", ".opus-tmp-") == []
    with pytest.raises(ValueError):
        cleanup_temp_files(tmp_path, "")

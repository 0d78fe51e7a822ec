"""``opus stop``: ask the service serving a vault to stop, from another process (SPEC §9).

The service's pid is the one in its lock file (held while it serves). ``SIGTERM`` is the
orderly stop (running stages get ``shutdown_grace``); ``STOP_NOW`` (``SIGQUIT``) is the
emergency stop: every agent killed at once, each job checkpointed, exit within 5 s.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from .config import Config
from .errors import OpusError
from .lock import InstanceLock

__all__ = ("STOP_NOW", "stop_service")

STOP_NOW = signal.SIGQUIT
"""The signal of the emergency stop (``opus stop --now``; ``systemctl kill -s QUIT``)."""


def stop_service(
    config: Config,
    *,
    now: bool = False,
    timeout: float = 90.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[int, float]:
    """Signal the service and wait until it has let go of its lock: ``(pid, seconds)``.

    Raises OpusError when no opus serves the vault, or it is still running after ``timeout``.
    """
    lock = InstanceLock(config.state_dir / "opus.lock")
    pid = lock.holder()
    if pid is None:
        raise OpusError(f"no opus serves {config.root} (no lock held in {config.state_dir})")
    start = clock()
    try:
        os.kill(pid, STOP_NOW if now else signal.SIGTERM)
    except ProcessLookupError:
        return pid, 0.0
    except PermissionError as e:
        raise OpusError(f"cannot signal opus (pid {pid}): {e.strerror}") from e
    pause = 0.01
    while lock.holder() is not None:
        if clock() - start > timeout:
            raise OpusError(f"opus (pid {pid}) still running {timeout:g} s after the signal")
        sleep(pause)
        pause = min(pause * 2, 0.1)
    # the lock goes first; the process ends a moment later (its interpreter's teardown):
    # "stopped" means gone, within the same limit (the vault is already free meanwhile)
    while not _gone(pid) and clock() - start <= timeout:
        sleep(pause)
    return pid, clock() - start


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent to reap it has, once its last
    thread is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie leader with threads still tearing down has not exited yet
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
    except (OSError, ValueError):
        return False
    return (
        status.get("State", "").strip()[:1] in ("Z", "X")
        and status.get("Threads", "").strip() == "1"
    )

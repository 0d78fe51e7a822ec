"""Supervision inside a child subreaper (a cluster node's worker, SPEC §18): orphans the
agent leaves exited (a sandbox's own init, a daemon's exited child) are adopted by the
supervising process, which must reap them itself rather than wait for init."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).parent / "agent_scripts" / "subreaper.py"
REAP = 20.0
"""The supervisor's wait for orphans to go (and its grace), set long: a stage that waits
for an adopted zombie takes all of it."""


def supervised_in_subreaper(*argv: str) -> dict[str, Any]:
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "stage", str(REAP), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=REAP * 4,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _bwrap() -> str:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.skip("bubblewrap is missing")
    return bwrap


def test_a_sandboxed_stage_ends_at_once_and_keeps_its_exit_status() -> None:
    bwrap = _bwrap()
    # opus's sandbox: its own PID namespace, whose init outlives bwrap by a moment and is
    # then adopted by the subreaper as a zombie
    sandbox = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
               "--unshare-pid", "--unshare-ipc", "--die-with-parent"]  # fmt: skip
    result = supervised_in_subreaper(*sandbox, "sh", "-c", "exit 3")

    assert result["returncode"] == 3  # the agent's status, not 0 nor the subreaper's
    assert result["zombies"] == []  # the sandbox's init was reaped, not left behind
    assert result["seconds"] < REAP / 4  # not the reap wait (nor the grace)
    # only the stage's own orphans were reaped: a child another part waits for is not stolen
    assert result["sibling_waitable"] and result["sibling_status"] == 0


def test_an_exited_orphan_of_the_agent_is_reaped_by_its_adopter() -> None:
    orphan = [sys.executable, str(SCRIPT), "orphan", "4"]
    result = supervised_in_subreaper(*orphan)

    assert result["returncode"] == 4
    assert result["zombies"] == []
    assert result["seconds"] < REAP / 4
    assert result["sibling_waitable"] and result["sibling_status"] == 0

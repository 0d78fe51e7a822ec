"""A child process for the subreaper tests: ``subreaper.py MODE ...``.

stage REAP ARGV...  become a child subreaper (what Ray's option makes a cluster node's
                    worker), start a sibling child that exits at once and is left unwaited,
                    then supervise ARGV with ``run_process`` (REAP s for orphans to go,
                    grace as long); print a JSON line: seconds the stage took, its exit
                    status, our zombies left but the sibling, whether the sibling is still
                    ours to wait
orphan CODE         fork a child that exits at once, wait until it is a zombie (not
                    reaping it), exit CODE: the subreaper adopts an exited orphan
"""

import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

PR_SET_CHILD_SUBREAPER = 36


def zombies() -> list[int]:
    """Our zombie children, per /proc."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == me:
                found.append(int(entry.name))
    return found


def stage(reap: float, argv: list[str]) -> None:
    from opus.orchestrator import supervisor
    from opus.orchestrator.redact import Redactor

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    supervisor.REAP_TIMEOUT = reap
    sibling = subprocess.Popen(["true"])  # another part of the process waits for this one
    os.waitid(os.P_PID, sibling.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    folder = Path(tempfile.mkdtemp())
    began = time.monotonic()
    result = anyio.run(
        lambda: supervisor.run_process(
            argv,
            cwd=folder,
            env={"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
            stdin=None,
            timeout=60,
            stall_timeout=60,
            log_file=folder / "stage.log",
            redactor=Redactor([]),
            grace=reap,
        )
    )
    took = time.monotonic() - began
    waitable = os.waitid(os.P_PID, sibling.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    print(
        json.dumps(
            {
                "seconds": took,
                "returncode": result.returncode,
                "zombies": [pid for pid in zombies() if pid != sibling.pid],
                "sibling_waitable": waitable is not None,
                "sibling_status": sibling.wait(),
            }
        )
    )


def orphan(code: int) -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # a zombie now; we exit without reaping
    return code


def main() -> int:
    mode = sys.argv[1]
    if mode == "stage":
        stage(float(sys.argv[2]), sys.argv[3:])
        return 0
    if mode == "orphan":
        return orphan(int(sys.argv[2]))
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main())

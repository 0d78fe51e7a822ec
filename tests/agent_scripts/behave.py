"""A child process for the supervisor tests: ``behave.py MODE [ARG]``.

echo            read stdin; print its length and text; a line on stderr; exit 0
hang            print a line, then sleep until killed
silent          print a line, then sleep without output or file changes
busy SECONDS    print nothing, but rewrite ./busy.txt every 0.1 s for SECONDS; exit 0
stubborn READY  ignore SIGTERM, create READY, sleep
grandchild READY  start ``sleep 1000`` (holding our stdout), create READY, exit 0
linger READY    start ``sleep 1000``, create READY, sleep (for cancellation)
exit CODE       print a line on each stream, exit CODE
suicide         kill ourselves with SIGKILL
flood BYTES     write BYTES bytes to stdout
secret TEXT     print TEXT on stdout and stderr
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    mode = sys.argv[1]
    arg = sys.argv[2] if len(sys.argv) > 2 else ""
    if mode == "echo":
        data = sys.stdin.read()
        print(f"len={len(data)}")
        print(data, end="")
        print("to stderr", file=sys.stderr)
        return 0
    if mode in ("hang", "silent"):
        print("started", flush=True)
        time.sleep(1000)
    if mode == "busy":
        end = time.monotonic() + float(arg)
        n = 0
        while time.monotonic() < end:
            n += 1
            Path("busy.txt").write_text("x" * n)
            time.sleep(0.1)
        return 0
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        Path(arg).write_text(str(os.getpid()))
        print("ignoring SIGTERM", flush=True)
        time.sleep(1000)
    if mode in ("grandchild", "linger"):
        child = subprocess.Popen(["sleep", "1000"])
        Path(arg).write_text(str(child.pid))
        print(f"grandchild {child.pid}", flush=True)
        if mode == "linger":
            time.sleep(1000)
        return 0
    if mode == "exit":
        print("bye")
        print("failing", file=sys.stderr)
        return int(arg)
    if mode == "suicide":
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "flood":
        sys.stdout.write("y" * (int(arg) - 1) + "\n")
        return 0
    if mode == "secret":
        print(f"token is {arg}")
        print(f"err {arg}", file=sys.stderr)
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main())

"""A command agent for the contract tests: ``contract.py RECORD SPEC_JSON [ARG...]``.

Appends to RECORD (JSON lines) what it got: argv, cwd, stdin (and whether it was a pipe),
environment. Then, per SPEC: ``output`` → written to $OPUS_OUTPUT_FILE, ``stdout`` /
``stderr`` → printed, ``exit`` → exit status (default 0).
"""

import json
import os
import stat
import sys
from pathlib import Path


def main() -> int:
    record, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    mode = os.fstat(0).st_mode
    kind = "pipe" if stat.S_ISFIFO(mode) else "chardev" if stat.S_ISCHR(mode) else "other"
    got = {
        "argv": sys.argv[3:],
        "cwd": str(Path.cwd()),
        "stdin": sys.stdin.read(),
        "stdin_kind": kind,
        "env": dict(os.environ),
    }
    with record.open("a") as f:
        f.write(json.dumps(got) + "\n")
    if "output" in spec:
        Path(os.environ["OPUS_OUTPUT_FILE"]).write_text(spec["output"])
    if "stdout" in spec:
        sys.stdout.write(spec["stdout"])
    if "stderr" in spec:
        sys.stderr.write(spec["stderr"])
    return int(spec.get("exit", 0))


if __name__ == "__main__":
    sys.exit(main())

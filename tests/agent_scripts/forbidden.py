"""An agent that tries what the sandbox forbids (SPEC §17): ``forbidden.py STAGE``.

Every stage records what it tried in ``OPUS_OUTPUT_FILE`` as ``{"attempts": {name: result}}``
where a result is ``"refused: <why>"`` or ``"done"``, then does its stage's honest work:
planner  tries to write the worktree; the plan is the JSON record
coder    tries each forbidden thing, leaves a file in ``OPUS_ARTIFACTS`` (allowed), changes
         ``change.txt`` and commits it itself
tester   exits 0
reviewer approves (the verdict goes to stdout: the output file holds the record)

Environment (the agent's ``env`` table): ``MARKER`` (the bytes it tries to write),
``VAULT``, ``REPO``, ``OTHER`` (a file of another job's worktree), ``HOME_MARKER`` (a file
name in the real HOME), ``PORT`` (a loopback TCP server), ``TOKEN`` (names the daemon).
"""

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def attempt(record: dict[str, str], name: str, action: Callable[[], object]) -> None:
    try:
        action()
    except OSError as e:
        record[name] = f"refused: {e.strerror or e.__class__.__name__}"
    else:
        record[name] = "done"


def append(path: str | Path, data: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)


def main() -> int:
    stage, env = sys.argv[1], os.environ
    marker = env.get("MARKER", "AGENT WAS HERE")
    record: dict[str, str] = {}
    if stage == "planner":
        attempt(record, "write the worktree", lambda: append("planner.txt", marker))
    if stage == "coder":
        vault, repo = Path(env["VAULT"]), Path(env["REPO"])
        attempt(record, "write the registry (../../registry.json)",
                lambda: append("../../registry.json", marker))  # fmt: skip
        attempt(record, "append to its own note", lambda: append(env["OPUS_FR_FILE"], marker))
        artifacts = Path(env["OPUS_ARTIFACTS"])
        attempt(record, "rewrite opus's events in the artifacts",
                lambda: append(artifacts / "events.jsonl", marker))  # fmt: skip
        attempt(record, "rewrite the planner's prompt",
                lambda: append(artifacts / "prompt-planner-1.md", marker))  # fmt: skip
        notes = artifacts / "coder-notes.txt"
        attempt(record, "leave a file in the artifacts",
                lambda: notes.write_text("what the coder saw\n"))  # fmt: skip
        attempt(record, "write the vault root", lambda: append(vault / "opus.toml", marker))
        attempt(record, "create a file in the vault", lambda: append(vault / "new.md", marker))
        attempt(record, "write another job's worktree", lambda: append(env["OTHER"], marker))
        attempt(record, "write the person's checkout", lambda: append(repo / "README.md", marker))
        attempt(record, "write the person's git HEAD",
                lambda: append(repo / ".git" / "HEAD", marker))  # fmt: skip
        attempt(record, "read a file in the real HOME",
                lambda: (Path.home() / env["HOME_MARKER"]).read_bytes())  # fmt: skip
        port = int(env["PORT"])
        attempt(record, "reach a loopback server",
                lambda: socket.create_connection(("127.0.0.1", port), 2).close())  # fmt: skip
        daemon = [sys.executable, "-c", "import time; time.sleep(600)", env["TOKEN"]]
        quiet = subprocess.DEVNULL
        # with an empty environment: not findable by its stage's OPUS_* variables (what opus
        # kills unsandboxed), only by the sandbox's PID namespace
        subprocess.run(["setsid", "--fork", *daemon], check=True, stdout=quiet, stderr=quiet,
                       env={"PATH": env.get("PATH", "")})  # fmt: skip
        record["leave a setsid daemon"] = "started"
        Path("change.txt").write_text(f"changed by {env['OPUS_FR_ID']}\n")
        subprocess.run(["git", "add", "-A"], check=True)
        subprocess.run(["git", "commit", "-q", "-m", "the coder's own commit"], check=True)
    Path(env["OPUS_OUTPUT_FILE"]).write_text(json.dumps({"attempts": record}, indent=1))
    if stage == "planner":
        print("# Plan\n\nChange change.txt.")
    if stage == "reviewer":
        print(json.dumps({"verdict": "approve", "confidence": 95, "summary": "fine"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A scripted ideator for tests: a real child process following SPEC §5.1 and §19.

Answers, in turn, the entries of the JSON list in ``$IDEAS`` (the last repeats): a string
(printed on standard output) or ``{"output": …, "usage": {…}}`` (written as JSON to
``OPUS_OUTPUT_FILE``) or ``{"exit": N}`` (fail with status N). Each run appends
``{"stage", "prompt", "worktree", "at"}`` to ``$CALLS`` as a JSON line, and scribbles into
the worktree (which opus must throw away).
"""

import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    env = os.environ
    prompt = sys.stdin.read()
    calls = Path(env["CALLS"])
    done = len(calls.read_text().splitlines()) if calls.exists() else 0
    answers = json.loads(Path(env["IDEAS"]).read_text())
    answer = answers[min(done, len(answers) - 1)]
    worktree = Path(env["OPUS_WORKTREE"])
    try:
        (worktree / "scribble.txt").write_text("an ideator must not change the repository\n")
        scribbled = True
    except OSError:  # in a sandbox the worktree is read-only
        scribbled = False
    line = {
        "stage": env["OPUS_STAGE"],
        "prompt": prompt,
        "worktree": str(worktree),
        "at": time.time(),
        "scribbled": scribbled,
    }
    with open(calls, "a") as f:
        f.write(json.dumps(line) + "\n")
    if isinstance(answer, dict) and "exit" in answer:
        print("the ideator broke", file=sys.stderr)
        return int(answer["exit"])
    if isinstance(answer, str):
        print(answer)
    else:
        Path(env["OPUS_OUTPUT_FILE"]).write_text(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())

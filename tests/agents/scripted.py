"""A scripted agent for tests: a real child process following SPEC §5.1.

``scripted.py STAGE``; behaviour from the JSON file named by ``$SCRIPT``:
``{"FR-1": {"coder": [step_for_iteration_1, step_for_iteration_2, ...]}, "*": {...}}``
(the last step repeats). A step is an object with any of:
``write`` {path: text} into the worktree · ``stdout`` text · ``output`` text into
``OPUS_OUTPUT_FILE`` · ``verdict`` object (written as JSON to the output file) · ``usage`` ·
``exit`` code · ``hang`` (sleep until killed) · ``sleep`` seconds · ``wait_for`` a file
path to appear · ``write_before`` {path: text} written before waiting (``{pid}`` in the name).
Steps for a rework round N (``OPUS_ROUND``) are under ``"STAGE@N"``, else ``STAGE``'s apply;
the default coder writes a different text in each round.
Every start and end is appended to ``$CALLS`` as a JSON line.
"""

import json
import os
import sys
import time
from pathlib import Path

DEFAULTS = {
    "planner": {"output": "# Plan\n\n1. Do it.\n"},
    "coder": {"write": {"{fr}.txt": "change of iteration {iteration}\n"}},
    "tester": {"exit": 0, "stdout": "1 passed"},
    "reviewer": {"verdict": {"verdict": "approve", "confidence": 95, "summary": "Looks good."}},
}


def main() -> int:
    stage = sys.argv[1]
    env = os.environ
    fr, iteration = env["OPUS_FR_ID"], int(env["OPUS_ITERATION"])
    round_ = int(env.get("OPUS_ROUND", "1"))
    script = json.loads(Path(env["SCRIPT"]).read_text()) if env.get("SCRIPT") else {}
    mine, anyone = script.get(fr, {}), script.get("*", {})
    steps = (
        mine.get(f"{stage}@{round_}")
        or anyone.get(f"{stage}@{round_}")
        or mine.get(stage)
        or anyone.get(stage)
    )
    default = DEFAULTS[stage]
    if stage == "coder" and round_ > 1:
        default = {"write": {"{fr}.txt": "change of round {round}, iteration {iteration}\n"}}
    step = steps[min(iteration, len(steps)) - 1] if steps else default
    calls = Path(env["CALLS"]) if env.get("CALLS") else None

    def record(event: str) -> None:
        if calls:
            line = {
                "event": event,
                "stage": stage,
                "fr": fr,
                "iteration": iteration,
                "round": round_,
                "pid": os.getpid(),
                "pgid": os.getpgid(0),
                "feedback": env.get("OPUS_FEEDBACK_FILE"),
                "node": env.get("OPUS_TEST_NODE"),
                "worktree": env["OPUS_WORKTREE"],
                "time": time.time(),
            }
            with open(calls, "a") as f:
                f.write(json.dumps(line) + "\n")

    record("start")
    sys.stdin.read()
    for name, text in step.get("write_before", {}).items():
        Path(env["OPUS_WORKTREE"], name.format(pid=os.getpid())).write_text(text)
    if "wait_for" in step:
        while not Path(step["wait_for"]).exists():
            time.sleep(0.02)
    if step.get("hang"):
        time.sleep(1000)
    time.sleep(step.get("sleep", 0))  # an agent that takes its time
    worktree = Path(env["OPUS_WORKTREE"])
    for name, text in step.get("write", {}).items():
        path = worktree / name.format(fr=fr, iteration=iteration, round=round_)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.format(fr=fr, iteration=iteration, round=round_))
    output = Path(env["OPUS_OUTPUT_FILE"])
    if "output" in step:
        output.write_text(step["output"])
    if "verdict" in step:
        output.write_text(
            json.dumps({**step["verdict"], **({"usage": step["usage"]} if "usage" in step else {})})
        )
    elif "usage" in step:  # with the answer, if any (SPEC §5.2's envelope)
        answer = {"output": step["output"]} if "output" in step else {}
        output.write_text(json.dumps({**answer, "usage": step["usage"]}))
    if "stdout" in step:
        print(step["stdout"])
    record("end")
    return int(step.get("exit", 0))


if __name__ == "__main__":
    sys.exit(main())

"""The demo's scripted agent: a real child process that follows the command contract.

Run as ``python -m opus.demo.agent STAGE``. It reads the FR id, iteration and paths from the
``OPUS_*`` environment, and plays a fixed script per FR, so the demo shows opus at work —
a failing test fed back to the coder, a review rejection then an approval — without any
model. In a rework round (``OPUS_ROUND`` 2, 3, …) the coder resolves the conflicts opus left
in the worktree (keeping both sides) and does what a person's feedback asks for when it
names a function (``give `polite()` a docstring``). The tester is not here: the demo runs
the repository's real tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

FAREWELL = """

def farewell(name: str) -> str:
    return f"Goodbye, {name}!"
"""
FAREWELL_TEST = """import unittest

from app.greet import farewell


class FarewellTest(unittest.TestCase):
    def test_farewell(self) -> None:
        self.assertEqual(farewell("Ada"), "Goodbye, Ada!")
"""
SHOUT_BUGGY = """

def shout(name: str) -> str:
    return f"HELLO, {name}!"
"""
SHOUT = """

def shout(name: str) -> str:
    return f"HELLO, {name.upper()}!"
"""
SHOUT_TEST = """import unittest

from app.greet import shout


class ShoutTest(unittest.TestCase):
    def test_shout(self) -> None:
        self.assertEqual(shout("Ada"), "HELLO, ADA!")
"""
POLITE = """

def polite(name: str, title: str = "Dr.") -> str:
    return f"Good day, {title} {name}."
"""
POLITE_TEST = """import unittest

from app.greet import polite


class PoliteTest(unittest.TestCase):
    def test_polite(self) -> None:
        self.assertEqual(polite("Ada", "Ms."), "Good day, Ms. Ada.")
"""
WAVE = """

def wave(name: str) -> str:
    return f"{farewell(name)} *waves*"
"""
WAVE_TEST = """import unittest

from app.greet import wave


class WaveTest(unittest.TestCase):
    def test_wave(self) -> None:
        self.assertEqual(wave("Ada"), "Goodbye, Ada! *waves*")
"""

# FR id → iteration → (code appended to app/greet.py, {test file: content})
SCRIPT: dict[str, dict[int, tuple[str, dict[str, str]]]] = {
    "FR-101": {1: (FAREWELL, {"tests/test_farewell.py": FAREWELL_TEST})},
    "FR-102": {1: (SHOUT_BUGGY, {"tests/test_shout.py": SHOUT_TEST}), 2: (SHOUT, {})},
    "FR-103": {1: (POLITE, {}), 2: ("", {"tests/test_polite.py": POLITE_TEST})},
    "FR-104": {1: (WAVE, {"tests/test_wave.py": WAVE_TEST})},
}


def plan(fr_id: str, title: str) -> str:
    return (
        f"# Plan for {fr_id}: {title}\n\n1. Add the function to `app/greet.py`.\n"
        "2. Add a unit test under `tests/`.\n3. Run the test suite.\n"
    )


def code(fr_id: str, iteration: int, worktree: Path) -> None:
    step = SCRIPT.get(fr_id, {}).get(iteration)
    if step is None:
        return
    addition, files = step
    greet = worktree / "app" / "greet.py"
    text = greet.read_text()
    if fr_id == "FR-102" and iteration == 2:
        text = text.replace(SHOUT_BUGGY, "")
    greet.write_text(text + addition)
    for name, content in files.items():
        (worktree / name).write_text(content)


def _git(worktree: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=worktree, capture_output=True, text=True, check=True
    ).stdout


def resolve_conflicts(worktree: Path) -> list[str]:
    """Resolve every conflicted file by keeping both sides (the demo's changes only add)."""
    paths = _git(worktree, "diff", "--name-only", "--diff-filter=U").split()
    for rel in paths:
        path = worktree / rel
        lines = path.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if not re.match(r"(<{7}|={7}|>{7})( |$)", ln)]
        path.write_text("".join(kept))
    return paths


def rework(fr_id: str, feedback: str, worktree: Path) -> str:
    """A person's request in a rework round: give the named function a docstring."""
    named = re.search(r"`(\w+)\(\)`", feedback)
    if named is None or "docstring" not in feedback:
        return "nothing I understand in the feedback"
    greet = worktree / "app" / "greet.py"
    text = greet.read_text()
    match = re.search(rf"^def {named.group(1)}\(.*:\n", text, re.MULTILINE)
    if match is None:
        return f"no {named.group(1)}() in app/greet.py"
    doc = f'    """{fr_id}: {named.group(1)}(), as the person asked."""\n'
    if doc not in text:
        greet.write_text(text[: match.end()] + doc + text[match.end() :])
    return f"docstring added to {named.group(1)}()"


def review(base: str, worktree: Path) -> dict[str, object]:
    changed = subprocess.run(
        ["git", "diff", "--name-only", base, "HEAD"],
        cwd=worktree,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if any(p.startswith("app/") for p in changed) and not any(
        p.startswith("tests/") for p in changed
    ):
        return {
            "verdict": "request_changes",
            "confidence": 80,
            "summary": "The new function has no test.",
            "issues": [
                {
                    "severity": "major",
                    "file": "app/greet.py",
                    "message": "add a unit test for the new function",
                }
            ],
        }
    return {
        "verdict": "approve",
        "confidence": 95,
        "summary": f"Focused change with tests ({len(changed)} file(s)).",
        "issues": [],
        "usage": {"input_tokens": 1200, "output_tokens": 80, "cost_usd": 0.0},
    }


# the demo ideator's proposals, first one whose title the prompt does not list yet
IDEAS = [
    (
        "Greet a list of names in one call",
        "`app.greet` greets one name at a time; callers with a guest list loop themselves.\n\n"
        "## Proposal\n\nAdd `greet_all(names: list[str]) -> str` that joins one greeting "
        "per name with newlines, reusing `greet`.\n\n"
        "## Acceptance criteria\n\n"
        '- [ ] `greet_all(["Ada", "Alan"])` returns `"Hello, Ada!\\nHello, Alan!"`\n'
        '- [ ] `greet_all([])` returns `""`\n'
        "- [ ] a unit test in `tests/` covers both cases; the suite passes\n",
    ),
    (
        "Reject empty names with a clear error",
        "`greet('')` returns `Hello, !`.\n\n## Proposal\n\nRaise `ValueError` naming the "
        "problem when the name is empty or only spaces.\n\n## Acceptance criteria\n\n"
        "- [ ] `greet('')` and `greet('  ')` raise `ValueError('name must not be empty')`\n"
        "- [ ] `greet('Ada')` is unchanged; a unit test covers all three\n",
    ),
]


def ideate(prompt: str) -> str:
    for title, body in IDEAS:
        if f"- {title}" not in prompt:
            return f"# {title}\n\n{body}"
    return f"# {IDEAS[0][0]}\n\n{IDEAS[0][1]}"  # opus drops it as a duplicate


def main() -> int:
    stage = sys.argv[1]
    env = os.environ
    fr_id, iteration = env["OPUS_FR_ID"], int(env["OPUS_ITERATION"])
    worktree, output = Path(env["OPUS_WORKTREE"]), Path(env["OPUS_OUTPUT_FILE"])
    prompt = sys.stdin.read()
    title = prompt.splitlines()[0].partition(": ")[2] if prompt else fr_id
    if stage == "ideator":
        output.write_text(ideate(prompt))
    elif stage == "planner":
        output.write_text(plan(fr_id, title))
    elif stage == "coder" and int(env.get("OPUS_ROUND", "1")) > 1:
        resolved = resolve_conflicts(worktree)
        if resolved:
            print(f"{fr_id}: resolved the conflicts in {', '.join(resolved)} (kept both sides)")
        feedback = json.loads(Path(env["OPUS_FEEDBACK_FILE"]).read_text())
        if feedback.get("source") == "person":
            print(f"{fr_id}: {rework(fr_id, feedback['message'], worktree)}")
    elif stage == "coder":
        code(fr_id, iteration, worktree)
        print(f"{fr_id}: iteration {iteration} written")
    elif stage == "reviewer":
        base = re.search(r"against base commit ([0-9a-f]+)\)", prompt)
        if base is None:
            print("no base commit in the prompt", file=sys.stderr)
            return 2
        output.write_text(json.dumps(review(base.group(1), worktree)))
        return 0
    else:
        print(f"unknown stage {stage}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``opus demo``: the README's first command works from this checkout and shows the loop."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from opus.cli import main

from .conftest import git


def test_demo_runs_every_example_fr_end_to_end(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    out = result.output
    # each status change printed as it happens, the loop at work
    assert "FR-102   in-progress  coder, iteration 2 ← The tests failed." in out
    assert "FR-103   in-progress  coder, iteration 2 ← The new function has no test." in out
    for line in (
        "FR-101   done       ok",
        "FR-102   done       ok",
        "FR-103   review     ok",
        "FR-104   review     ok",
    ):
        assert line in out
    # FR-102 no longer merged cleanly once FR-101 was merged: the coder resolved it in a round
    assert "FR-102   round 2 (conflict) ← The branch no longer merges cleanly into `main`" in out
    assert "FR-102   in-progress  coder, iteration 1, round 2" in out
    # a scripted person asked for changes on FR-103: a rework round from their feedback
    assert '(a person: opus rework FR-103 -m "Please give `polite()` a docstring.")' in out
    assert re.search(r"FR-103   round [23] \(person\) ← Please give `polite\(\)` a docstring", out)
    repo = tmp_path / "demo" / "app"
    main_greet = git(repo, "show", "main:app/greet.py")
    assert "def farewell" in main_greet  # FR-101 auto-merged
    assert "HELLO, {name.upper()}" in main_greet  # FR-102 merged after its conflict round
    assert "<<<<<<<" not in main_greet and ">>>>>>>" not in main_greet
    assert "def polite" not in main_greet  # FR-103 awaits review
    assert '"""FR-103: polite(), as the person asked."""' in git(
        repo, "show", "opus/fr-103:app/greet.py"
    )
    config = str(tmp_path / "demo" / "vault" / "opus.toml")
    status = CliRunner().invoke(main, ["status", "--json", "--config", config])
    rows = {r["id"]: r for r in json.loads(status.output)}
    assert rows["FR-102"]["round"] == 2 and rows["FR-101"]["round"] is None
    # a conflict, the person's request, and (when FR-102's merge moved the base under it,
    # seen at the next poll: SPEC §7) a conflict again
    assert rows["FR-103"]["round"] in (2, 3, 4)
    show = CliRunner().invoke(main, ["show", "FR-103", "--config", config])
    assert "rounds:" in show.output and "person — Please give" in show.output
    # the directory is left to inspect
    assert (tmp_path / "demo" / "vault" / ".opus" / "registry.json").exists()


def test_demo_refuses_a_used_directory(tmp_path: Path) -> None:
    (tmp_path / "vault").mkdir()
    result = CliRunner().invoke(main, ["demo", str(tmp_path)])
    assert result.exit_code == 1
    assert "already holds a demo" in result.output

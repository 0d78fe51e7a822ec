"""``opus demo``: the README's first command works from this checkout and shows the loop."""

from __future__ import annotations

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
        "FR-102   review     ok",
        "FR-103   review     ok",
        "FR-104   review     ok",
    ):
        assert line in out
    repo = tmp_path / "demo" / "app"
    assert "def farewell" in git(repo, "show", "main:app/greet.py")  # FR-101 auto-merged
    assert "def shout" not in git(repo, "show", "main:app/greet.py")  # FR-102 awaits review
    assert "HELLO, {name.upper()}" in git(repo, "show", "opus/fr-102:app/greet.py")
    # the directory is left to inspect
    assert (tmp_path / "demo" / "vault" / ".opus" / "registry.json").exists()


def test_demo_refuses_a_used_directory(tmp_path: Path) -> None:
    (tmp_path / "vault").mkdir()
    result = CliRunner().invoke(main, ["demo", str(tmp_path)])
    assert result.exit_code == 1
    assert "already holds a demo" in result.output

"""The real CLI over a real vault and a real git repository, with scripted agents."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from opus import __version__
from opus.cli import main

from .conftest import Vault, git


def opus(vault: Vault, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*args, "--config", str(vault.config)])
    return result.exit_code, result.output


def meta(path: Path) -> dict[str, object]:
    text = path.read_text()
    return yaml.safe_load(text.split("---\n")[1]) or {}


FR = """\
---
id: FR-1
title: Add a thing
priority: high
tags: [x]   # a person's comment
---
# Add a thing

Please add a thing.
"""


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_fr_moved_in_reaches_review_with_the_coders_commit(vault: Vault) -> None:
    note = vault.note("FR-1.md", FR)
    base_before = git(vault.repo, "rev-parse", "main")
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    assert "FR-1\treview" in out
    data = meta(note)
    assert data["status"] == "review"
    assert data["branch"] == "opus/fr-1"
    assert "stage" not in data and "error" not in data
    # the person's lines are untouched
    assert "tags: [x]   # a person's comment" in note.read_text()
    assert note.read_text().endswith("# Add a thing\n\nPlease add a thing.\n")
    # the branch holds the coder's commit; the base did not move
    assert git(vault.repo, "rev-parse", "main") == base_before
    log = git(vault.repo, "log", "--format=%s", "main..opus/fr-1")
    assert log == "opus(FR-1): coder, iteration 1"
    assert git(vault.repo, "show", "opus/fr-1:FR-1.txt") == "change of iteration 1"
    # each stage ran once; artifacts are there
    assert [c["stage"] for c in vault.calls() if c["event"] == "end"] == [
        "planner",
        "coder",
        "tester",
        "reviewer",
    ]
    jobs = json.loads((vault.state / "registry.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["review"]
    assert data["job_id"] == jobs[0]["id"]  # the note names the job that did the work
    assert [(c["stage"], c["outcome"]) for c in jobs[0]["history"]] == [
        ("planner", "ok"),
        ("coder", "ok"),
        ("tester", "ok"),
        ("reviewer", "ok"),
        ("delivery", "ok"),
    ]
    folder = vault.state / "jobs" / jobs[0]["id"]
    for name in (
        "plan.md",
        "pr.md",
        "review-1.json",
        "prompt-coder-1.md",
        "events.jsonl",
        "coder-1.log",
    ):
        assert (folder / name).exists(), name
    assert "Add a thing" in (folder / "pr.md").read_text()
    # the dashboard lists it
    assert "FR-1" in (vault.root / "00_system" / "opus-dashboard.md").read_text()


def test_failing_stage_ends_failed_with_error(vault: Vault) -> None:
    vault.script({"FR-1": {"planner": [{"exit": 3, "stdout": "boom"}]}})
    note = vault.note("FR-1.md", FR)
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    data = meta(note)
    assert data["status"] == "failed"
    assert "planner failed" in str(data["error"])
    # retries = 1: two attempts
    assert len(vault.runs("planner")) == 2


def test_broken_notes_stay_byte_identical_while_good_ones_are_served(vault: Vault) -> None:
    broken = {
        "bad-yaml.md": b"---\ntitle: [unclosed\n---\nbody\n",
        "binary.md": b"---\nid: B\n---\n\x00\x01\x02",
        "dup-a.md": b"---\nid: FR-1\n---\nsame id as the good one\n",
    }
    note = vault.note("FR-1.md", FR)
    for name, data in broken.items():
        (vault.planned / name).write_bytes(data)
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    assert meta(note)["status"] == "review"
    for name, data in broken.items():
        assert (vault.planned / name).read_bytes() == data, name
    code, out = opus(vault, "validate")
    assert code == 1
    for name in broken:
        assert name in out
    code, out = opus(vault, "status", "--json")
    rows = json.loads(out)
    assert {r["note"].split("/")[-1] for r in rows if r["status"] == "unreadable"} == set(broken)


def test_bad_values_fail_the_fr_naming_the_key(vault: Vault) -> None:
    note = vault.note("FR-9.md", "---\npriority: urgent\n---\n# Nine\n")
    code, out = opus(vault, "run", "--once")
    assert code == 0, out
    data = meta(note)
    assert data["status"] == "failed"
    assert str(data["error"]).startswith("priority:")
    assert vault.calls() == []


def test_validate_ok_and_problems(vault: Vault) -> None:
    vault.note("FR-1.md", FR)
    code, out = opus(vault, "validate")
    assert code == 0, out
    vault.note("FR-2.md", "---\nrepo: ../etc\ndepends_on: [FR-404]\n---\n# Two\n")
    code, out = opus(vault, "validate", "--json")
    assert code == 1
    problems = json.loads(out)["problems"]
    assert any("`repo`" in p for p in problems)
    assert any("FR-404" in p for p in problems)


def test_config_error_names_the_key_and_file(vault: Vault) -> None:
    vault.config.write_text(
        vault.config.read_text().replace("[pipeline]\n", "[pipeline]\nconcurency = 3\n")
    )
    for command in (["run", "--once"], ["status"], ["validate"]):
        code, out = opus(vault, *command)
        assert code == 2, command
        assert "pipeline.concurency" in out and str(vault.config) in out
    assert not vault.state.exists()  # nothing was touched


def test_status_json_lists_frs(vault: Vault) -> None:
    vault.note("FR-1.md", FR)
    opus(vault, "run", "--once")
    code, out = opus(vault, "status", "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert row["id"] == "FR-1" and row["status"] == "review" and row["branch"] == "opus/fr-1"


def test_init_scaffolds_a_vault(tmp_path: Path) -> None:
    repo = tmp_path / "app"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "master")
    git(repo, "commit", "-q", "--allow-empty", "-m", "initial")
    result = CliRunner().invoke(main, ["init", str(tmp_path / "v"), "--repo", "../app"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "v" / "10_features" / "03_planned").is_dir()
    text = (tmp_path / "v" / "opus.toml").read_text()
    assert 'base = "master"' in text  # the repository's own default branch
    assert "base branch: master (detected)" in result.output
    assert "next: opus doctor --config" in result.output
    template = (tmp_path / "v" / "templates" / "feature-request.md").read_text()
    assert 'title: "{{title}}"' in template and "created: {{date}}" in template
    base = yaml.safe_load((tmp_path / "v" / "00_system" / "opus.base").read_text())
    assert base["filters"]["and"][0] == 'file.inFolder("10_features/03_planned")'
    views = {v["type"]: v for v in base["views"]}
    assert views["cards"]["groupBy"]["property"] == "status" and "status" in views["table"]["order"]
    # the written config loads and validates its repository
    from opus.orchestrator.checks import repo_problems
    from opus.orchestrator.config import load_config

    assert repo_problems(load_config(tmp_path / "v" / "opus.toml")) == []
    again = CliRunner().invoke(main, ["init", str(tmp_path / "v"), "--repo", "../app"])
    assert again.exit_code == 1 and "already exists" in again.output


def test_init_refuses_a_missing_or_non_git_repository(tmp_path: Path) -> None:
    missing = CliRunner().invoke(main, ["init", str(tmp_path / "v"), "--repo", "../nope"])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    (tmp_path / "plain").mkdir()
    plain = CliRunner().invoke(
        main, ["init", str(tmp_path / "v"), "--repo", str(tmp_path / "plain")]
    )
    assert plain.exit_code == 1 and "is not a git repository" in plain.output
    assert not (tmp_path / "v" / "opus.toml").exists()


def test_init_without_repo_scaffolds_before_the_repository_exists(tmp_path: Path) -> None:
    """SPEC §9 ``opus init [DIR]``: the default ``../app`` may come later; init says so, and
    validate refuses it until then (an explicit ``--repo`` must exist: above)."""
    vault = tmp_path / "v"
    result = CliRunner().invoke(main, ["init", str(vault)])
    assert result.exit_code == 0, result.output
    assert (vault / "10_features" / "03_planned").is_dir()
    assert (vault / "templates" / "feature-request.md").is_file()
    assert f"warning: [repos.app] path ../app: {tmp_path / 'app'} does not exist" in result.output
    assert 'path = "../app"' in (vault / "opus.toml").read_text()
    config = ["--config", str(vault / "opus.toml")]
    validate = CliRunner().invoke(main, ["validate", *config])
    assert validate.exit_code == 1 and "[repos.app.path]" in validate.output
    repo = tmp_path / "app"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "commit", "-q", "--allow-empty", "-m", "initial")
    validate = CliRunner().invoke(main, ["validate", *config])
    assert "[repos.app" not in validate.output, validate.output

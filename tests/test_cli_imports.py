"""The command line's import discipline (SPEC §12, CLI latency): ``opus --version`` loads
neither click nor the library, and the read commands load none of the service's heavy parts
(agents, httpx, the service, git, Ray…). Each command runs in a new process, as a person
runs it; the modules it loaded are what it left in ``sys.modules``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from opus.cli import main

from .conftest import Vault

PROBE = """
import atexit, json, runpy, sys
out, how, args = sys.argv[1], sys.argv[2], sys.argv[3:]
def report():
    with open(out, "w") as f:
        json.dump(sorted(sys.modules), f)
atexit.register(report)
sys.argv = ["opus", *args]
if how == "-m":  # python -m opus
    runpy.run_module("opus", run_name="__main__", alter_sys=True)
else:  # the console script: [project.scripts] opus = "opus.__main__:main"
    from opus.__main__ import main
    sys.exit(main())
"""

HEAVY = (
    "httpx",
    "ray",
    "git",
    "watchdog",
    "apprise",
    "ruamel",
    "rich",
    "opus.orchestrator.agents",
    "opus.orchestrator.service",
    "opus.orchestrator.pipeline",
    "opus.orchestrator.workspace",
    "opus.orchestrator.sandbox",
    "opus.orchestrator.notify",
    "opus.orchestrator.github",
)
"""What no read command needs: packages and opus modules (each with its submodules)."""

FR = """\
---
id: FR-1
title: Add a thing
---
# Add a thing
"""


def loaded(tmp_path: Path, *args: str, how: str = "-m") -> tuple[list[str], str]:
    """The modules ``opus ARGS`` loaded in a new process, and what it printed."""
    out = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(out), how, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    modules: list[str] = json.loads(out.read_text())
    return modules, done.stdout


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if m in HEAVY or m.startswith(tuple(f"{h}." for h in HEAVY))]


@pytest.mark.parametrize("how", ["-m", "script"])
def test_version_loads_neither_click_nor_the_library(tmp_path: Path, how: str) -> None:
    modules, out = loaded(tmp_path, "--version", how=how)
    assert out == CliRunner().invoke(main, ["--version"]).output == "opus, version 0.1.0\n"
    ours = ["opus"] if how == "-m" else ["opus", "opus.__main__"]  # -m runs it as __main__
    assert [m for m in modules if m.split(".")[0] in ("opus", "click", "pydantic")] == ours


def test_version_to_a_closed_pipe_exits_1_quietly_as_click_does() -> None:
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "opus", "--version"],
            stdout=write,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (1, b"")


def test_other_arguments_reach_the_click_app(tmp_path: Path) -> None:
    _, out = loaded(tmp_path, "--help", how="script")
    assert "Usage:" in out and "status" in out


def test_read_commands_load_no_heavy_part(vault: Vault, tmp_path: Path) -> None:
    vault.note("FR-1.md", FR)
    ran = CliRunner().invoke(main, ["run", "--once", "--config", str(vault.config)])
    assert ran.exit_code == 0, ran.output
    config = ["--config", str(vault.config)]
    for command, shown in (
        (["status"], "opus/fr-1"),
        (["status", "--json"], '"branch": "opus/fr-1"'),
        (["logs", "FR-1"], "scripted.py reviewer"),
        (["metrics"], "jobs in the last 30 day(s): 1  review=1"),
    ):
        modules, out = loaded(tmp_path, *command, *config)
        assert shown in out, (command, out)
        assert heavy(modules) == [], command
    modules, out = loaded(tmp_path, "metrics", "--json", *config)
    assert json.loads(out)["jobs"] == 1
    assert heavy(modules) == []


def test_the_heavy_parts_are_seen_when_loaded(vault: Vault, tmp_path: Path) -> None:
    """The probe itself: a command that does need them (``validate`` checks the repository
    with git, the sandbox and the agents' commands) is caught."""
    modules, _ = loaded(tmp_path, "validate", "--config", str(vault.config))
    assert "git" in heavy(modules) and "opus.orchestrator.sandbox" in heavy(modules)


def test_job_summaries_read_as_the_jobs_do(tmp_path: Path) -> None:
    """``opus status`` reads the jobs through ``JobSummary`` (the registry's rows without
    their history): the same fields, types and defaults as ``Job``, so the same values."""
    from datetime import datetime, timedelta

    from opus.orchestrator.models import Checkpoint, Job
    from opus.orchestrator.views import JobSummary, job_summaries, read_jobs

    for name, field in JobSummary.model_fields.items():
        job_field = Job.model_fields[name]
        assert (field.annotation, field.default) == (job_field.annotation, job_field.default)
    required = {n for n, f in Job.model_fields.items() if f.is_required()}
    assert required <= set(JobSummary.model_fields)

    now = datetime(2026, 12, 1, 12, 0, 0)
    rows = []
    for i, status in enumerate(["done", "in-progress", "queued"]):
        job = Job(
            id=f"20261201-1200{i:02d}-fr-{i}-beef",
            fr_id=f"FR-{i}",
            fr_path=f"10_features/03_planned/FR-{i}.md",
            title=f"Thing {i}",
            priority="high",
            status=status,
            stage="coder" if status != "done" else None,
            repo="app",
            branch=f"opus/fr-{i}",
            created_at=now + timedelta(minutes=i),
            updated_at=now,
            history=[
                Checkpoint(
                    stage="planner", iteration=1, outcome="ok", started_at=now, finished_at=now
                )
            ],
        )
        rows.append(job.model_dump(mode="json"))
    rows[1]["iteration"] = "2"  # what the models coerce, the summary coerces alike
    del rows[2]["round"]  # and a missing key takes the same default
    state = tmp_path / "state"
    state.mkdir()
    (state / "registry.json").write_text(json.dumps({"version": 1, "jobs": rows}))
    newer = dict(rows[0], status="review", error="x")  # an event log newer than the registry
    log = state / "jobs" / rows[0]["id"] / "events.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"event": "saved", "job": newer}) + "\n")

    jobs, summaries = read_jobs(state), job_summaries(state)
    assert [s.model_dump() for s in summaries] == [
        j.model_dump(include=set(JobSummary.model_fields)) for j in jobs
    ]
    assert [(s.id, s.status.value, s.iteration, s.round, s.error) for s in summaries] == [
        (rows[0]["id"], "review", 1, 1, "x"),
        (rows[1]["id"], "in-progress", 2, 1, None),
        (rows[2]["id"], "queued", 1, 1, None),
    ]

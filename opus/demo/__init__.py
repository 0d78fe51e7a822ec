"""``opus demo``: the example vault, a tiny repository and scripted agents, end to end."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import anyio

from ..orchestrator import views
from ..orchestrator.config import load_config
from ..orchestrator.errors import OpusError
from ..orchestrator.ideation import waiting_ideas
from ..orchestrator.lifecycle import Status
from ..orchestrator.models import Job
from ..orchestrator.service import Orchestrator

HERE = Path(__file__).parent
EXPECTED = {"FR-101": "done", "FR-102": "done", "FR-103": "review", "FR-104": "review"}
FEEDBACK = "Please give `polite()` a docstring."


def example_vault() -> Path:
    """``vault.example`` of the source checkout opus runs from."""
    for parent in HERE.parents:
        candidate = parent / "vault.example"
        if (candidate / "opus.toml").is_file():
            return candidate
    raise OpusError(
        "vault.example not found: run `opus demo` from an install of the source "
        "checkout (pip install -e .)"
    )


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        [
            "git",
            "-c",
            "user.name=opus demo",
            "-c",
            "user.email=demo@localhost",
            "-c",
            "init.defaultBranch=main",
            *args,
        ],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def prepare(directory: Path) -> Path:
    """Copy the example vault and the demo repository into ``directory``; return opus.toml."""
    vault, repo = directory / "vault", directory / "app"
    if vault.exists() or repo.exists():
        raise OpusError(f"{directory} already holds a demo (vault/ or app/); pick another DIR")
    shutil.copytree(example_vault(), vault)
    shutil.copytree(HERE / "repo", repo, ignore=shutil.ignore_patterns("__pycache__"))
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "demo app: greet()")
    config = vault / "opus.toml"
    text = config.read_text(encoding="utf-8")
    config.write_text(
        text.replace('command = "python ', f'command = "{sys.executable} '), encoding="utf-8"
    )
    return config


class Printer:
    """Prints one line whenever a job's status, stage or iteration changes."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.seen: dict[str, tuple[str, str | None, int, int]] = {}

    def __call__(self, job: Job) -> None:
        key = (job.status.value, job.stage.value if job.stage else None, job.iteration, job.round)
        before = self.seen.get(job.fr_id)
        if before == key:
            return
        self.seen[job.fr_id] = key
        if job.rounds and (before is None or before[3] != job.round):
            last = job.rounds[-1]
            first = last.feedback.strip().splitlines()[0]
            self.echo(f"  {job.fr_id:8} round {last.round} ({last.source}) ← {first}")
        where = (
            f"{job.stage}, iteration {job.iteration}"
            if job.status.value in ("in-progress", "queued") and job.stage
            else ""
        )
        if job.round > 1:
            where += f", round {job.round}" if where else f"round {job.round}"
        more = f" — {job.error}" if job.error else ""
        if (
            job.stage is not None
            and job.stage.value == "coder"
            and job.iteration > 1
            and job.feedback is not None
        ):
            more = f" ← {job.feedback.message}"
            if job.feedback.test_output:
                more += " " + job.feedback.test_output.strip().splitlines()[-1]
        self.echo(f"  {job.fr_id:8} {job.status.value:12} {where}{more}")


async def run_demo(directory: Path | None, echo: Callable[[str], None]) -> int:
    """Run every example FR to a resting status; 0 when each ended as the demo expects."""
    directory = Path(tempfile.mkdtemp(prefix="opus-demo-")) if directory is None else directory
    directory.mkdir(parents=True, exist_ok=True)
    config = load_config(prepare(directory.resolve()))
    echo(f"opus demo in {directory}")
    echo(f"  vault {config.root}  ·  repository {config.repo_path('app')}")
    echo("")
    async with Orchestrator(config, on_change=Printer(echo)) as orch:
        summary = await orch.run_once()
        # a scripted person answers: changes on FR-103, approval of FR-102 (which no longer
        # merges cleanly since FR-101 was merged: the coder resolves that in a round)
        echo("")
        echo(f'  (a person: opus rework FR-103 -m "{FEEDBACK}")')
        await anyio.to_thread.run_sync(lambda: views.rework(config, "FR-103", FEEDBACK))
        summary = await orch.run_once()
        for _ in range(2):
            if summary.statuses.get("FR-102") != "review":
                break
            echo("  (a person: opus approve FR-102)")
            await anyio.to_thread.run_sync(
                lambda: views.set_status(config, "FR-102", Status.APPROVED, None)
            )
            summary = await orch.run_once()
    echo("")
    ok = True
    for fr_id, status in summary.statuses.items():
        expected = EXPECTED.get(fr_id)
        mark = "ok" if expected in (None, status) else f"expected {expected}"
        ok = ok and mark == "ok"
        echo(f"  {fr_id:8} {status:10} {mark}")
    for path, title, category in waiting_ideas(config):
        echo(f"  idea     {title} ({category}): {path.relative_to(config.root)}")
    echo("")
    echo(f"Look around: the notes in {config.planned_dir},")
    echo(f"  the branches in {config.repo_path('app')} (git branch -a; git log --all --oneline),")
    echo(f"  the artifacts in {config.state_dir / 'jobs'},")
    echo(f"  and `opus status --config {config.source}`.")
    return 0 if ok else 1

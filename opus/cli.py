"""The ``opus`` command: a thin click shell over ``opus.orchestrator``; one ``anyio.run``."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import click

from . import __version__
from .orchestrator import views as insp
from .orchestrator.config import Config, load_config
from .orchestrator.errors import ConfigError, LockHeld, NoteError, OpusError
from .orchestrator.lifecycle import Status

F = TypeVar("F", bound=Callable[..., Any])


def config_option(f: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        default=None,
        help="opus.toml to use (default: ./opus.toml, else $OPUS_CONFIG).",
    )(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"opus: {message}", err=True)
    sys.exit(code)


def load(config_path: Path | None) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as e:
        fail(f"configuration error: {e}", 2)


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.now().isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup_logging(*, json_logs: bool = False, verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json_logs else _LineFormatter())
    root = logging.getLogger("opus")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="opus")
def main() -> None:
    """opus — drive feature-request notes through coding agents, 24/7."""


@main.command()
@click.argument("directory", type=click.Path(path_type=Path), default=".")
@click.option(
    "--repo",
    "repo",
    default="../app",
    show_default=True,
    help="Path of the target git repository (relative to DIR).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing opus.toml.")
@config_option
def init(directory: Path, repo: str, force: bool, config_path: Path | None) -> None:
    """Scaffold a vault in DIR (or the folder of --config): folders, opus.toml, FR template."""
    from .orchestrator.scaffold import init_vault

    if config_path is not None:
        directory = config_path.parent
    try:
        created = init_vault(directory, repo=repo, force=force)
    except OpusError as e:
        fail(str(e))
    for path in created:
        click.echo(f"created {path}")


@main.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@config_option
def demo(directory: Path | None, config_path: Path | None) -> None:
    """Run every example FR end to end with the bundled demo agents."""
    from .demo import run_demo

    setup_logging()
    logging.getLogger("opus").setLevel(logging.WARNING)
    try:
        code = anyio.run(run_demo, directory, click.echo)
    except OpusError as e:
        fail(str(e))
    sys.exit(code)


@main.command()
@config_option
@click.option("--once", is_flag=True, help="Settle, run every eligible FR to rest, then exit.")
@click.option("--json-logs", is_flag=True, help="Log JSON lines instead of text.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug lines too.")
def run(config_path: Path | None, once: bool, json_logs: bool, verbose: bool) -> None:
    """Serve the vault until SIGTERM (the service; see systemd/)."""
    from .orchestrator.service import serve

    setup_logging(json_logs=json_logs, verbose=verbose)
    config = load(config_path)
    try:
        summary = anyio.run(lambda: serve(config, once=once, config_path=config_path))
    except LockHeld as e:
        fail(str(e))
    except ConfigError as e:
        fail(f"configuration error: {e}", 2)
    except OpusError as e:
        fail(str(e))
    if summary is not None:
        for fr_id, status in summary.statuses.items():
            click.echo(f"{fr_id}\t{status}")
        for problem in summary.problems:
            click.echo(f"problem\t{problem}", err=True)


@main.command()
@config_option
@json_option
@click.option("--watch", is_flag=True, help="Refresh live (Ctrl-C to leave).")
def status(config_path: Path | None, as_json: bool, watch: bool) -> None:
    """Table of FRs and jobs: id, status, stage, iteration, age, branch."""
    config = load(config_path)
    if as_json:
        click.echo(json.dumps(insp.status_rows(config), indent=2, default=str))
        return
    if watch:
        insp.watch_status(config)
        return
    insp.print_status(config)


@main.command()
@click.argument("fr")
@config_option
@json_option
def show(fr: str, config_path: Path | None, as_json: bool) -> None:
    """One FR's job: every checkpoint, artifacts, last review, usage."""
    config = load(config_path)
    try:
        data = insp.show_data(config, fr)
    except (NoteError, OpusError) as e:
        fail(str(e))
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        insp.print_show(data)


@main.command()
@config_option
@json_option
def validate(config_path: Path | None, as_json: bool) -> None:
    """Check the config and every note; list each problem; exit 1 if any."""
    config = load(config_path)
    problems = insp.validate(config)
    if as_json:
        click.echo(json.dumps({"ok": not problems, "problems": problems}, indent=2))
    else:
        for problem in problems:
            click.echo(problem)
        click.echo(f"{len(problems)} problem(s)" if problems else "ok: no problems")
    sys.exit(1 if problems else 0)


def _control(name: str, target: Status, allowed: frozenset[Status] | None, doc: str) -> None:
    @main.command(name=name, help=doc)
    @click.argument("fr")
    @config_option
    def command(fr: str, config_path: Path | None) -> None:
        config = load(config_path)
        try:
            old = insp.set_status(config, fr, target, allowed)
        except (NoteError, OpusError) as e:
            fail(str(e))
        click.echo(f"{fr}: {old or 'planned'} → {target}")


_S = Status
_control(
    "retry",
    _S.PLANNED,
    frozenset({_S.FAILED, _S.BLOCKED, _S.CANCELLED}),
    "Start a fresh job for a failed, blocked or cancelled FR (status: planned).",
)
_control(
    "pause",
    _S.PAUSED,
    frozenset({_S.PLANNED, _S.QUEUED, _S.IN_PROGRESS}),
    "Stop the FR at its next stage boundary, keeping its checkpoint (status: paused).",
)
_control(
    "resume",
    _S.PLANNED,
    frozenset({_S.PAUSED}),
    "Resume a paused FR from its checkpoint (status: planned).",
)
_control(
    "cancel",
    _S.CANCELLED,
    frozenset({_S.PLANNED, _S.QUEUED, _S.IN_PROGRESS, _S.PAUSED, _S.REVIEW}),
    "Stop the FR now, killing its agent; the branch is kept (status: cancelled).",
)
_control(
    "approve",
    _S.APPROVED,
    frozenset({_S.REVIEW}),
    "Approve an FR in review: opus merges it (status: approved).",
)


@main.command()
@config_option
@click.option(
    "--max-age",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds since the last tick still counted as healthy.",
)
def health(config_path: Path | None, max_age: float) -> None:
    """Exit 0 if a service is running and its last tick is recent, else 1."""
    from .orchestrator.health import check_health

    config = load(config_path)
    ok, why = check_health(config.state_dir / "health.json", now=datetime.now(), max_age=max_age)
    click.echo(why)
    sys.exit(0 if ok else 1)


@main.command()
@config_option
@click.option("--category", default=None, help="The category (default: least recently used).")
def ideate(config_path: Path | None, category: str | None) -> None:
    """Run one ideation now, whatever the queue: an idea note in [ideation] folder."""
    from .orchestrator.service import Orchestrator

    setup_logging()
    config = load(config_path)

    async def one() -> Any:
        async with Orchestrator(config) as orch:
            return await orch.ideate(category)

    try:
        run = anyio.run(one)
    except OpusError as e:
        fail(str(e))
    if run.outcome != "proposed":
        fail(f"no idea written ({run.category}): {run.outcome}: {run.detail}")
    click.echo(f"{run.idea_id} ({run.category}): {run.title}\n{config.root / run.note}")


@main.command()
@config_option
@json_option
@click.option(
    "--since",
    "days",
    type=int,
    default=30,
    show_default=True,
    help="Only jobs created in the last DAYS days.",
)
def metrics(config_path: Path | None, as_json: bool, days: int) -> None:
    """Throughput, success rate, durations, iterations, utilization, tokens and cost."""
    from .orchestrator.metrics import compute, render, window_start

    config = load(config_path)
    from .orchestrator.ideation import idea_metrics

    now = datetime.now()
    jobs = insp.read_jobs(config.state_dir)
    data = compute(
        jobs,
        insp.all_events(config),
        since_days=days,
        now=now,
        concurrency=config.pipeline.concurrency,
        archived=insp.archived_figures(config, window_start(now, days)),
    )
    data["ideas"] = idea_metrics(config, jobs, since=now - timedelta(days=days))
    click.echo(json.dumps(data, indent=2) if as_json else render(data))

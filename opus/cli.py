"""The ``opus`` command: a thin click shell over ``opus.orchestrator``; one ``anyio.run``.

Conventions every command follows (SPEC §9), so a new one only adds its body:

- ``--config PATH`` before the subcommand or after it (``config_option``; ``load()``);
- ``--json`` (``json_option``) prints only JSON on stdout — ``emit(data)`` — with machine
  values (seconds as numbers, ISO date-times), and ``fail()`` then prints
  ``{"error": …}`` with the same exit status: 0 success, 1 failure, 2 usage or config;
- imports of the library's heavy parts (agents, httpx, the service) stay inside the
  commands that need them, so ``opus status`` and ``opus --version`` start fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from . import __version__

if TYPE_CHECKING:
    from .orchestrator.config import Config

F = TypeVar("F", bound=Callable[..., Any])

_JSON = "opus.json"
_LOG_FORMAT = "opus.log_format"
_ARGV = "opus.argv"


class OpusGroup(click.Group):
    """Remembers the arguments, so a usage error of a ``--json`` command is JSON too."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGV] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            if not _wants_json(ctx):
                raise
            _print_json({"error": e.format_message()})
            sys.exit(e.exit_code)


def _wants_json(ctx: click.Context | None = None) -> bool:
    ctx = ctx or click.get_current_context(silent=True)
    if ctx is None:
        return False
    return bool(ctx.meta.get(_JSON)) or "--json" in ctx.meta.get(_ARGV, ())


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_machine))


def _machine(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _config_given(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None:
        ctx.meta["opus.config"] = value
    return value


def config_option(f: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        default=None,
        expose_value=False,
        is_eager=True,
        callback=_config_given,
        help="opus.toml to use (default: ./opus.toml, else $OPUS_CONFIG).",
    )(f)


def _json_given(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[_JSON] = True
    return value


def json_option(f: F) -> F:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        is_eager=True,
        callback=_json_given,
        help="Print only JSON on stdout (errors too).",
    )(f)


def emit(data: Any, text: Callable[[], None] | str | None = None) -> None:
    """Print ``data`` as JSON under ``--json``, else ``text`` (a string or a printer)."""
    if _wants_json():
        _print_json(data)
    elif callable(text):
        text()
    elif text is not None:
        click.echo(text)


def fail(message: str, code: int = 1, *, problems: Sequence[str] = ()) -> NoReturn:
    if _wants_json():
        _print_json({"error": message, **({"problems": list(problems)} if problems else {})})
    else:
        ctx = click.get_current_context(silent=True)
        prefix = "<3>" if ctx is not None and ctx.meta.get(_LOG_FORMAT) == "journal" else ""
        click.echo(f"{prefix}opus: {message}", err=True)
        for problem in problems:
            click.echo(f"{prefix}  {problem}", err=True)
    sys.exit(code)


def config_path() -> Path | None:
    ctx = click.get_current_context()
    path: Path | None = ctx.meta.get("opus.config")
    return path


def load() -> Config:
    """The config named by ``--config`` (before or after the subcommand); exit 2 if bad."""
    from .orchestrator.config import load_config
    from .orchestrator.errors import ConfigError

    try:
        return load_config(config_path())
    except ConfigError as e:
        _config_failure(e)


def _config_failure(e: Any) -> NoReturn:
    problems = list(e.problems)
    where = f"{e.file}: " if e.file else ""
    if len(problems) == 1:
        fail(f"configuration error: {where}{problems[0]}", 2)
    fail(f"configuration error: {where}{len(problems)} problems", 2, problems=problems)


def _quiet_logging() -> None:
    """Read commands: the library's warnings (an unreadable note…) are the command's output,
    not log lines printed a second time."""
    from .log_format import setup_logging

    setup_logging(level=logging.ERROR)


@click.group(cls=OpusGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="opus")
@config_option
def main() -> None:
    """opus — drive feature-request notes through coding agents, 24/7."""
    # no scan of every installed package for pydantic plugins at each command's start
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")


# -- setting up ------------------------------------------------------------------------------


@main.command()
@click.argument("directory", type=click.Path(path_type=Path), default=".")
@click.option(
    "--repo",
    "repo",
    default=None,
    help="Path of the target git repository (relative to DIR; it must be one). "
    "Default: ../app, named in opus.toml even before it exists.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing opus.toml.")
@config_option
@json_option
def init(directory: Path, repo: str | None, force: bool, as_json: bool) -> None:
    """Scaffold a vault in DIR (or the folder of --config): folders, opus.toml, FR template."""
    from .orchestrator.errors import OpusError
    from .orchestrator.scaffold import init_vault

    given = config_path()
    if given is not None:
        directory = given.parent
    try:
        report = init_vault(directory, repo=repo, force=force)
    except OpusError as e:
        fail(str(e))
    emit(report.data(), "\n".join(report.lines()))


@main.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@config_option
def demo(directory: Path | None) -> None:
    """Run every example FR end to end with the bundled demo agents."""
    import anyio

    from .demo import run_demo
    from .log_format import setup_logging
    from .orchestrator.errors import OpusError

    setup_logging(level=logging.WARNING)
    try:
        code = anyio.run(run_demo, directory, click.echo)
    except OpusError as e:
        fail(str(e))
    sys.exit(code)


@main.command()
@config_option
@json_option
def doctor(as_json: bool) -> None:
    """Check what `opus run` will need: agents, repositories, sandbox, executor, notifiers."""
    from .orchestrator.doctor import render, run_checks

    _quiet_logging()
    checks = run_checks(load())
    failed = [c for c in checks if not c.ok]
    emit(
        {"ok": not failed, "checks": [c.__dict__ for c in checks]},
        render(checks) + f"\n{len(failed)} check(s) failed" * bool(failed),
    )
    sys.exit(1 if failed else 0)


@main.command()
@config_option
@json_option
def validate(as_json: bool) -> None:
    """Check the config and every note; list each problem; exit 1 if any."""
    from .orchestrator import views
    from .orchestrator.errors import ConfigError

    _quiet_logging()
    try:
        from .orchestrator.config import load_config

        config = load_config(config_path())
    except ConfigError as e:
        if as_json:
            _print_json({"ok": False, "error": "configuration error", "problems": e.problems})
            sys.exit(2)
        _config_failure(e)
    problems = views.validate(config)
    emit(
        {"ok": not problems, "problems": problems},
        "\n".join([*problems, f"{len(problems)} problem(s)" if problems else "ok: no problems"]),
    )
    sys.exit(1 if problems else 0)


# -- the service -----------------------------------------------------------------------------


@main.command()
@config_option
@click.option("--once", is_flag=True, help="Settle, run every eligible FR to rest, then exit.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json", "journal"]),
    default=None,
    help="Log lines as text (a time in front on a terminal), JSON, or with journald "
    "priorities (the default when $JOURNAL_STREAM is set).",
)
@click.option("--json-logs", is_flag=True, help="Same as --log-format json.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug lines too.")
@json_option
def run(once: bool, log_format: Any, json_logs: bool, verbose: bool, as_json: bool) -> None:
    """Serve the vault until SIGTERM (the service; see systemd/)."""
    import anyio

    from .log_format import setup_logging
    from .orchestrator.errors import ConfigError, OpusError
    from .orchestrator.service import serve

    chosen = setup_logging(
        log_format="json" if json_logs else log_format,
        level=logging.DEBUG if verbose else logging.INFO,
    )
    click.get_current_context().meta[_LOG_FORMAT] = chosen  # for ``fail``: <3> in the journal
    config = load()
    try:
        summary = anyio.run(lambda: serve(config, once=once, config_path=config_path()))
    except ConfigError as e:
        _config_failure(e)
    except OSError as e:  # a full disk, a read-only state folder: one line, no traceback
        fail(_os_error(e))
    except OpusError as e:
        fail(str(e))
    except BaseExceptionGroup as group:  # the same, raised inside the service's task groups
        leaf = _os_leaf(group)
        if leaf is None:
            raise
        fail(_os_error(leaf))
    if summary is not None and as_json:  # --once: where each FR rests, and bad notes
        _print_json({"statuses": summary.statuses, "problems": summary.problems})
    elif summary is not None:
        for fr_id, status in summary.statuses.items():
            click.echo(f"{fr_id}\t{status}")
        prefix = "<4>" if chosen == "journal" else ""
        for problem in summary.problems:
            click.echo(f"{prefix}problem\t{problem}", err=True)


def _os_leaf(group: BaseExceptionGroup[BaseException]) -> OSError | None:
    """The first OSError of a group whose every leaf is an OSError or cancellation."""
    found: list[OSError] = []

    def walk(e: BaseException) -> bool:
        if isinstance(e, BaseExceptionGroup):
            return all(walk(x) for x in e.exceptions)
        if isinstance(e, OSError):
            found.append(e)
            return True
        return e.__class__.__name__ == "CancelledError"

    return found[0] if walk(group) and found else None


def _os_error(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or e}{where}"


@main.command()
@config_option
@click.option("--now", is_flag=True, help="Kill every agent at once, checkpoint, exit (≤ 5 s).")
@click.option(
    "--timeout",
    type=float,
    default=None,
    help="Seconds to wait for the service to exit (default: shutdown_grace + 30; --now: 10).",
)
@json_option
def stop(now: bool, timeout: float | None, as_json: bool) -> None:
    """Ask the running service to stop: as SIGTERM, or with --now the emergency stop."""
    from .orchestrator.control import stop_service
    from .orchestrator.errors import OpusError

    config = load()
    limit = (
        timeout if timeout is not None else (10.0 if now else config.service.shutdown_grace + 30)
    )
    try:
        pid, seconds = stop_service(config, now=now, timeout=limit)
    except OpusError as e:
        fail(str(e))
    emit(
        {"pid": pid, "stopped": True, "seconds": round(seconds, 3), "now": now},
        f"opus (pid {pid}) stopped in {seconds:.1f} s",
    )


@main.command()
@config_option
@json_option
@click.option(
    "--max-age",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds since the last tick still counted as healthy.",
)
def health(as_json: bool, max_age: float) -> None:
    """Exit 0 if a service is running and its last tick is recent, else 1."""
    from .orchestrator.health import health_record

    config = load()
    state = config.state_dir
    record = health_record(
        state / "health.json", now=datetime.now(), max_age=max_age, lock=state / "opus.lock"
    )
    emit(record, record["reason"])
    sys.exit(0 if record["ok"] else 1)


# -- looking -------------------------------------------------------------------------------


@main.command()
@config_option
@json_option
@click.option("--watch", is_flag=True, help="Refresh live (Ctrl-C to leave).")
def status(as_json: bool, watch: bool) -> None:
    """Table of FRs and jobs: id, status, stage, iteration, age, branch."""
    from .orchestrator import views

    _quiet_logging()
    config = load()
    if as_json:
        _print_json(views.status_rows(config))
    elif watch:
        views.watch_status(config)
    else:
        views.print_status(config)


@main.command()
@click.argument("fr")
@config_option
@json_option
def show(fr: str, as_json: bool) -> None:
    """One FR's job: every checkpoint, artifacts, last review, usage."""
    from .orchestrator import views
    from .orchestrator.errors import OpusError

    _quiet_logging()
    config = load()
    try:
        data = views.show_data(config, fr)
    except OpusError as e:
        fail(str(e))
    emit(data, lambda: views.print_show(data))


@main.command()
@click.argument("fr")
@click.option("--stage", type=click.Choice(["planner", "coder", "tester", "reviewer"]))
@click.option("-f", "--follow", is_flag=True, help="Follow live, across stages, until it rests.")
@config_option
@json_option
def logs(fr: str, stage: str | None, follow: bool, as_json: bool) -> None:
    """The agent output of FR's current (or last) stage; -f follows it live.

    With --json: one object (the log and its lines), or with -f one object per line as
    it comes ({"log": name, "line": text})."""
    from .orchestrator import views
    from .orchestrator.errors import OpusError
    from .orchestrator.stage_logs import current_log, headed
    from .orchestrator.stage_logs import follow as follow_logs

    _quiet_logging()
    config = load()
    try:
        fr_id, job = views.job_for(config, fr)
    except OpusError as e:
        fail(str(e))
    if job is None:
        fail(f"{fr_id}: no job yet")
    if follow:

        def latest() -> Any:
            return views.job_for(config, fr_id)[1]

        def as_lines(path: Path, text: str) -> None:
            for line in text.splitlines():
                click.echo(json.dumps({"log": path.name, "line": line}))

        out = as_lines if as_json else headed(lambda s: click.echo(s, nl=False))
        try:
            follow_logs(config, latest, out, stage=stage)
        except KeyboardInterrupt:
            pass
        return
    path = current_log(config, job, stage)
    if path is None:
        fail(f"{fr_id}: no {stage or 'stage'} log yet (job {job.id})")
    running = job.status.value == "in-progress"
    if as_json:
        text = path.read_bytes().decode("utf-8", "replace")
        _print_json(
            {"fr_id": fr_id, "job_id": job.id, "log": path, "running": running,
             "lines": text.splitlines()}
        )  # fmt: skip
        return
    click.echo(f"==> {path} <==", err=True)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            sys.stdout.buffer.write(chunk)
    sys.stdout.flush()
    if running:
        click.echo(f"(still running: opus logs {fr_id} -f follows it)", err=True)


@main.command()
@config_option
@json_option
@click.option("--category", default=None, help="The category (default: least recently used).")
def ideate(category: str | None, as_json: bool) -> None:
    """Run one ideation now, whatever the queue: an idea note in [ideation] folder."""
    import anyio

    from .log_format import setup_logging
    from .orchestrator.errors import OpusError
    from .orchestrator.service import Orchestrator

    setup_logging()
    config = load()
    if category is not None and category not in config.ideation.categories:
        known = ", ".join(config.ideation.categories)
        fail(f"--category {category!r} is not one of [ideation] categories: {known}", 2)

    async def one() -> Any:
        async with Orchestrator(config) as orch:
            return await orch.ideate(category)

    try:
        run = anyio.run(one)
    except OpusError as e:
        fail(str(e))
    if run.outcome != "proposed":
        fail(f"no idea written ({run.category}): {run.outcome}: {run.detail}")
    if as_json:
        _print_json(
            {
                "idea_id": run.idea_id,
                "category": run.category,
                "title": run.title,
                "note": str(config.root / run.note),
            }
        )
        return
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
def metrics(as_json: bool, days: int) -> None:
    """Throughput, success rate, durations, iterations, utilization, tokens and cost."""
    from .orchestrator import views
    from .orchestrator.ideation import idea_metrics
    from .orchestrator.metrics import compute, render, window_start

    config = load()
    now = datetime.now()
    jobs = views.read_jobs(config.state_dir)
    data = compute(
        jobs,
        views.all_events(config, jobs),
        since_days=days,
        now=now,
        concurrency=config.pipeline.concurrency,
        archived=views.archived_figures(config, window_start(now, days)),
    )
    data["ideas"] = idea_metrics(config, jobs, since=now - timedelta(days=days))
    emit(data, lambda: click.echo(render(data)))


# -- a person's controls -------------------------------------------------------------------


def control_command(
    name: str,
    target: str,
    allowed: frozenset[str] | None,
    doc: str,
    *,
    all_of: frozenset[str] | None = None,
) -> click.Command:
    """A command that sets FR's note ``status`` to ``target`` (what a person's edit does);
    with ``all_of``, ``--all`` sets it on every FR whose status is one of those."""

    @main.command(name=name, help=doc)
    @click.argument("fr", required=all_of is None)
    @config_option
    @json_option
    def command(as_json: bool, fr: str | None = None, every: bool = False) -> None:
        from .orchestrator import views
        from .orchestrator.errors import OpusError
        from .orchestrator.lifecycle import Status

        _quiet_logging()
        config = load()
        goal = Status(target)
        allow = frozenset(Status(s) for s in allowed) if allowed is not None else None
        if every:
            if fr is not None:
                fail("give an FR or --all, not both", 2)
            assert all_of is not None
            changed = views.set_status_all(config, goal, frozenset(Status(s) for s in all_of))
            emit(
                [{"fr_id": i, "from": old, "to": goal.value} for i, old in changed],
                "\n".join(f"{i}: {old} → {goal}" for i, old in changed) or f"no FR to {name}",
            )
            return
        if fr is None:
            fail(f"give an FR (or --all): opus {name} FR", 2)
        try:
            fr_id, old = views.set_status(config, fr, goal, allow)
        except OpusError as e:
            fail(str(e))
        shown = old.value if old else "planned"
        emit({"fr_id": fr_id, "from": shown, "to": goal.value}, f"{fr_id}: {shown} → {goal}")

    if all_of is not None:
        states = ", ".join(sorted(all_of))
        command = click.option("--all", "every", is_flag=True, help=f"Every FR that is {states}.")(
            command
        )
    return command


control_command(
    "retry",
    "planned",
    frozenset({"failed", "blocked", "cancelled"}),
    "Start a fresh job for a failed, blocked or cancelled FR (status: planned).",
)
control_command(
    "pause",
    "paused",
    frozenset({"planned", "queued", "in-progress"}),
    "Stop the FR at its next stage boundary, keeping its checkpoint (status: paused).",
    all_of=frozenset({"queued", "in-progress"}),
)
control_command(
    "resume",
    "planned",
    frozenset({"paused"}),
    "Resume a paused FR from its checkpoint (status: planned).",
    all_of=frozenset({"paused"}),
)
control_command(
    "cancel",
    "cancelled",
    frozenset({"planned", "queued", "in-progress", "paused", "review", "plan-review"}),
    "Stop the FR now, killing its agent; the branch is kept (status: cancelled).",
)
control_command(
    "approve",
    "approved",
    frozenset({"review", "plan-review", "blocked"}),
    "Approve an FR in review (opus merges it), a plan in plan-review (the coder starts), or "
    "retry the refused merge of a blocked FR (status: approved).",
)


@main.command()
@click.argument("fr")
@click.option("-m", "--message", "text", required=True, help="What to change (markdown).")
@config_option
@json_option
def rework(fr: str, text: str, as_json: bool) -> None:
    """Ask for changes on an FR in review (a rework round) or plan-review (a new plan):
    sets `feedback: TEXT` and `status: changes-requested`."""
    from .orchestrator import views
    from .orchestrator.errors import OpusError

    _quiet_logging()
    config = load()
    try:
        fr_id, old = views.rework(config, fr, text)
    except OpusError as e:
        fail(str(e))
    to = "changes-requested"
    emit({"fr_id": fr_id, "from": old.value, "to": to}, f"{fr_id}: {old} → {to}")

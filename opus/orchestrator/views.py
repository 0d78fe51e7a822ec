"""Read-only views for the CLI: status, show, validate, metrics input, and note controls.

Nothing here takes the service's lock: it reads the registry and the notes as they are on
disk, and writes only a note's ``status`` (exactly what a person would do by hand).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from .config import Config
from .errors import NoteError, OpusError
from .lifecycle import Stage, Status
from .models import Job, Priority
from .vault import Vault, dependency_cycle

if TYPE_CHECKING:
    from .rollups import Figures

# checks, sandbox, reactions and rollups are imported by the views that use them, so that
# `opus status` does not load them (SPEC §12: CLI latency)


def read_jobs(state_dir: Path) -> list[Job]:
    """The registry's jobs, brought up to date from event logs newer than registry.json.

    Cost follows the live jobs, not the history: a job folder that registry.json does not
    name is read only when its id (which starts with its creation time) is younger than a
    day before registry.json was written — older ones were archived (or finished before that
    write, which named every job alive then)."""
    return _read_jobs(state_dir, _registry_jobs, _record(Job))


def job_summaries(state_dir: Path) -> list[JobSummary]:
    """``read_jobs``, as much of each job as ``opus status`` shows: the parser skips the
    rest of each row (history, usage…) instead of building it — most of the cost of
    reading 1,000 jobs (SPEC §12's CLI latency)."""
    return _read_jobs(state_dir, _registry_summaries, _record(JobSummary))


class _Keyed(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def created_at(self) -> datetime: ...


J = TypeVar("J", bound=_Keyed)


def _read_jobs(
    state_dir: Path,
    registry_jobs: Callable[[bytes], tuple[list[J], object]],
    from_record: Callable[[object], J | None],
) -> list[J]:
    jobs: dict[str, J] = {}
    registry = state_dir / "registry.json"
    mtime = 0
    written = ""
    try:
        mtime = registry.stat().st_mtime_ns
        rows, written_at = registry_jobs(registry.read_bytes())
        jobs = {job.id: job for job in rows}
        written = _day_before(written_at)
    except (OSError, ValueError):
        mtime = 0
    folder = state_dir / "jobs"
    try:
        # no job folder made or removed since registry.json: no listing of the history
        same = bool(mtime) and os.stat(folder).st_mtime_ns < mtime  # noqa: PTH116
        names = list(jobs) if same else os.listdir(folder)  # noqa: PTH208 - names only
    except OSError:
        names = []
    for name in names:
        if name not in jobs and written and _STAMPED.match(name) and name[:15] < written:
            continue
        log = os.path.join(folder, name, "events.jsonl")  # noqa: PTH118 - hot loop
        try:
            # a log older than registry.json holds nothing newer: a live job's state is
            # in it, and a job missing from it was archived (its marker came first)
            if os.stat(log).st_mtime_ns < mtime:  # noqa: PTH116
                continue
            with open(log, "rb") as f:
                lines = f.read().split(b"\n")[:-1]
        except OSError:
            continue
        for line in reversed(lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "archived":
                jobs.pop(name, None)
                break
            if "job" in record:
                job = from_record(record["job"])
                if job is not None:
                    jobs[job.id] = job
                break
    return sorted(jobs.values(), key=lambda j: j.created_at)


class JobSummary(BaseModel):
    """The fields of a ``Job`` that ``opus status`` shows, and the rest of its required ones,
    with the same types and defaults (a test holds them equal): a row reads as its Job
    would, and what is not here is skipped."""

    id: str
    fr_id: str
    fr_path: str
    title: str
    priority: Priority
    status: Status
    stage: Stage | None = None
    iteration: int = 1
    repo: str
    branch: str
    created_at: datetime
    updated_at: datetime
    error: str | None = None
    round: int = 1


class _RegistryDoc(BaseModel):
    jobs: list[Job] = []
    written_at: str | None = None


class _SummaryDoc(BaseModel):
    jobs: list[JobSummary] = []
    written_at: str | None = None


def _registry_jobs(data: bytes) -> tuple[list[Job], object]:
    doc = _RegistryDoc.model_validate_json(data)  # one pass, in Rust
    return doc.jobs, doc.written_at


def _registry_summaries(data: bytes) -> tuple[list[JobSummary], object]:
    doc = _SummaryDoc.model_validate_json(data)
    return doc.jobs, doc.written_at


M = TypeVar("M", bound=BaseModel)


def _record(model: type[M]) -> Callable[[object], M | None]:
    def read(data: object) -> M | None:
        try:
            return model.model_validate(data)
        except ValidationError:
            return None

    return read


_STAMPED = re.compile(r"\d{8}-\d{6}-")


def _day_before(stamp: object) -> str:
    """``YYYYmmdd-HHMMSS`` a day before ``stamp`` (clock steps and DST within a day), or ""."""
    if not isinstance(stamp, str):
        return ""
    try:
        return f"{datetime.strptime(stamp, '%Y%m%d-%H%M%S') - timedelta(days=1):%Y%m%d-%H%M%S}"
    except ValueError:
        return ""


def archived_figures(config: Config, since: date) -> tuple[Figures, set[str]]:
    """The archive's roll-ups of jobs created on or after ``since`` (not the archive)."""
    from .rollups import rollups_since

    return rollups_since(config.state_dir / "archive", since)


def events(config: Config, job_id: str) -> list[dict[str, Any]]:
    path = config.state_dir / "jobs" / job_id / "events.jsonl"
    try:
        lines = path.read_bytes().split(b"\n")[:-1]
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def all_events(config: Config, jobs: Iterable[Job]) -> dict[str, list[dict[str, Any]]]:
    return {job.id: events(config, job.id) for job in jobs}


def age_text(seconds: float) -> str:
    """``4m``, ``2h``… for a table; JSON carries the seconds."""
    s = max(0, int(seconds))
    return (
        f"{s}s"
        if s < 120
        else f"{s // 60}m"
        if s < 7200
        else f"{s // 3600}h"
        if s < 172800
        else f"{s // 86400}d"
    )


def status_rows(config: Config, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """One row per FR note (and per job whose note is gone), plus unreadable notes."""
    now = now or datetime.now()
    scan = Vault(config).scan()
    latest = {job.fr_id: job for job in job_summaries(config.state_dir)}
    in_vault = _in_vault(config.root)
    rows: list[dict[str, Any]] = []
    for fr_id in sorted(set(scan.frs) | set(latest)):
        fr, job = scan.frs.get(fr_id), latest.get(fr_id)
        status = (
            (fr.status.value if fr and fr.status else "planned")
            if fr
            else (job.status.value if job else "?")
        )
        if job and fr and fr.status is None:
            status = job.status.value
        rows.append(
            {
                "id": fr_id,
                "status": status,
                "stage": (
                    job.stage.value
                    if job
                    and job.stage
                    and job.status in (Status.IN_PROGRESS, Status.QUEUED, Status.PAUSED)
                    else None
                ),
                # an archived job's FR: what its note says (the archive is not read here)
                "iteration": job.iteration if job else (fr.iteration if fr else None),
                "round": job.round if job and job.round > 1 else None,
                "age": round(max(0.0, (now - job.created_at).total_seconds()), 3) if job else None,
                "branch": job.branch if job else None,
                "job_id": job.id if job else (fr.job_id if fr else None),
                "priority": (fr.priority.value if fr else job.priority.value if job else None),
                "title": fr.title if fr else job.title if job else "",
                "error": (job.error if job else None) or (fr.error if fr else None),
                "note": in_vault(fr.path) if fr else (job.fr_path if job else None),
            }
        )
    for problem in scan.problems:
        rows.append(
            {
                "id": None,
                "status": "unreadable",
                "stage": None,
                "iteration": None,
                "round": None,
                "age": None,
                "branch": None,
                "job_id": None,
                "priority": None,
                "title": "",
                "error": problem.message,
                "note": in_vault(problem.path),
            }
        )
    return rows


def _in_vault(root: Path) -> Callable[[Path], str]:
    """``str(path.relative_to(root))``, by cutting the prefix where it is one (a thousand
    paths a table: pathlib's parsing was a tenth of `opus status`)."""
    prefix = os.path.join(root, "")  # noqa: PTH118 - a string prefix, not a path

    def relative(path: Path) -> str:
        text = str(path)
        if text.startswith(prefix) and len(text) > len(prefix):
            return text[len(prefix) :]
        return str(path.relative_to(root))

    return relative


def print_status(config: Config) -> None:
    import shutil

    print(status_text(config, width=shutil.get_terminal_size().columns))


STATUS_HEADER = ("id", "status", "stage", "iter", "round", "age", "branch", "title / problem")


def status_text(config: Config, *, width: int = 100) -> str:
    """The status table as aligned plain text (a table renderer's cost grows with the rows;
    this is a join per row), its last column cut to ``width``."""
    rows = [STATUS_HEADER]
    for r in status_rows(config):
        rows.append(
            (
                r["id"] or r["note"],
                r["status"],
                r["stage"] or "",
                str(r["iteration"] or ""),
                str(r["round"] or ""),
                age_text(r["age"]) if r["age"] is not None else "",
                r["branch"] or "",
                r["error"]
                if r["status"] in ("unreadable", "failed", "blocked", "queued") and r["error"]
                else r["title"],
            )
        )
    return format_columns(rows, width=width)


def format_columns(rows: Sequence[Sequence[str]], *, width: int = 100) -> str:
    """Left-aligned columns two spaces apart; the last column is cut to fit ``width``."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    indent = sum(widths) + 2 * len(widths)
    room = max(20, width - indent)
    lines = []
    for row in rows:
        last = " ".join(row[-1].split())
        if len(last) > room:
            last = last[: room - 1] + "…"
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        lines.append(("  ".join([*cells, last])).rstrip())
    return "\n".join(lines)


def watch_status(config: Config) -> None:
    import shutil
    import time

    from rich.live import Live
    from rich.text import Text

    def frame() -> Text:
        return Text(status_text(config, width=shutil.get_terminal_size().columns))

    with Live(frame(), refresh_per_second=2) as live:
        try:
            while True:
                time.sleep(1)
                live.update(frame())
        except KeyboardInterrupt:
            return


def job_for(config: Config, ref: str) -> tuple[str, Job | None]:
    """The FR ``ref`` names (see ``Vault.find``; a gone note's id still works) and its
    latest job."""
    vault = Vault(config)
    jobs = read_jobs(config.state_dir)
    gone: NoteError | None = None
    try:
        fr_id = vault.read(vault.find(ref)).id
    except NoteError as e:
        fr_id, gone = ref, e  # a gone note: its id still names the job, live or archived
    mine = [j for j in jobs if j.fr_id == fr_id]
    job = mine[-1] if mine else _archived_job(config, fr_id)
    if gone is not None and job is None:
        raise gone
    return fr_id, job


def _archived_job(config: Config, fr_id: str) -> Job | None:
    """The FR's newest archived job (finished over ``keep_days`` ago), if any: read only when
    the registry holds none, as ``opus show`` of an old FR does."""
    from .registry import Registry

    archived = [j for j in Registry(config.state_dir).archived() if j.fr_id == fr_id]
    return max(archived, key=lambda j: j.created_at) if archived else None


def show_data(config: Config, ref: str) -> dict[str, Any]:
    from .reactions import artifact_tag

    fr_id, job = job_for(config, ref)
    if job is None:
        raise OpusError(f"{fr_id}: no job yet")
    folder = config.state_dir / "jobs" / job.id
    names = {f"review-{artifact_tag(cp.round, cp.iteration)}.json" for cp in job.history}
    reviews = [folder / cp.artifact for cp in job.history if cp.artifact in names]
    review = json.loads(reviews[-1].read_text()) if reviews and reviews[-1].exists() else None
    rounds = [{"round": 1, "source": "first delivery", "feedback": None, "started_at": None}]
    rounds += [r.model_dump(mode="json", exclude={"base"}) for r in job.rounds]
    return {
        "fr_id": fr_id,
        "job": job.model_dump(mode="json"),
        "artifacts": sorted(p.name for p in folder.iterdir()) if folder.is_dir() else [],
        "artifacts_dir": str(folder),
        "review": review,
        "rounds": rounds,
    }


def print_show(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    job = data["job"]
    console = Console()
    console.print(
        f"[bold]{data['fr_id']}[/bold] {job['title']} — {job['status']}"
        + (
            f" ({job['stage']}, iteration {job['iteration']})"
            if job["status"] == "in-progress"
            else ""
        )
    )
    console.print(
        f"job {job['id']} · branch {job['branch']} · priority {job['priority']}"
        + (f" · {job['pr_url']}" if job.get("pr_url") else "")
    )
    if job.get("error"):
        console.print(f"error: {job['error']}")
    if len(data["rounds"]) > 1:
        console.print("rounds:")
        for r in data["rounds"]:
            first = (r["feedback"] or "").strip().splitlines()[:1]
            console.print(f"  {r['round']}: {r['source']}" + (f" — {first[0]}" if first else ""))
    table = Table(
        "round",
        "stage",
        "iter",
        "outcome",
        "attempts",
        "seconds",
        "commit",
        "cost $",
        box=None,
        header_style="bold",
    )
    for cp in job["history"]:
        secs = (
            datetime.fromisoformat(cp["finished_at"]) - datetime.fromisoformat(cp["started_at"])
        ).total_seconds()
        usage = cp.get("usage") or {}
        table.add_row(
            str(cp.get("round", 1)),
            cp["stage"],
            str(cp["iteration"]),
            cp["outcome"],
            str(cp["attempts"]),
            f"{secs:.1f}",
            (cp.get("commit") or "")[:10],
            f"{usage.get('cost_usd', 0):.4f}" if usage else "",
        )
    console.print(table)
    u = job["usage"]
    console.print(
        f"usage: {u['input_tokens']} in / {u['output_tokens']} out tokens, "
        f"${u['cost_usd']:.4f}{' (estimated)' if u.get('cost_estimated') else ''}"
    )
    if job.get("agent_versions"):
        console.print("agents: " + ", ".join(f"{k} {v}" for k, v in job["agent_versions"].items()))
    if data["review"]:
        r = data["review"]
        console.print(
            f"last review: {r['verdict']} ({r.get('confidence', 0)}): {r.get('summary', '')}"
        )
        for issue in r.get("issues", []):
            console.print(f"  - {issue.get('severity')}: {issue.get('message')}")
    console.print(f"artifacts in {data['artifacts_dir']}: {', '.join(data['artifacts'])}")


def validate(config: Config, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every problem with the repositories, agents, notifiers and notes, one line each."""
    from .checks import agent_problems, notifier_problems, repo_problems
    from .sandbox import sandbox_problems

    problems = [
        *repo_problems(config),
        *agent_problems(config, environ),
        *notifier_problems(config, environ),
        *sandbox_problems(config, environ),
    ]
    scan = Vault(config).scan()
    for p in scan.problems:
        problems.append(f"{p.path}: {p.message}")
    for fr in scan.frs.values():
        for key, problem in fr.problems or ([fr.invalid] if fr.invalid else []):
            problems.append(f"{fr.path}: `{key}`: {problem}")
        for dep in fr.depends_on:
            if dep not in scan.frs and dep != fr.id:
                problems.append(f"{fr.path}: depends_on: no FR with id {dep!r} in the vault")
            if dep == fr.id:
                problems.append(f"{fr.path}: depends_on: an FR cannot depend on itself")
        if (cycle := dependency_cycle(fr.id, scan.frs)) is not None:
            problems.append(f"{fr.path}: depends_on: a cycle: {' → '.join(cycle)}")
    return list(dict.fromkeys(problems))


def set_status(
    config: Config, ref: str, target: Status, allowed: frozenset[Status] | None
) -> tuple[str, Status | None]:
    """Write a person's ``status`` into the note (what ``opus pause FR`` and friends do);
    return the FR's id and the status it had."""
    vault = Vault(config)
    path = vault.find(ref)
    fr = vault.read(path)
    current = fr.status or Status.PLANNED
    if allowed is not None and current not in allowed and current is not target:
        raise OpusError(
            f"{fr.id} is {current}; this needs one of: "
            + ", ".join(sorted(s.value for s in allowed))
        )
    if target is Status.APPROVED and current is Status.BLOCKED:
        _, job = job_for(config, str(path))
        if job is not None and not job.merge_refused:  # blocked before there was a merge
            raise OpusError(
                f"{fr.id} is blocked by its pipeline, not by a refused merge"
                f"{': ' + job.error if job.error else ''}; `opus retry {fr.id}` runs it again"
            )
    vault.update(
        path, {"status": target.value, "updated_at": datetime.now().replace(microsecond=0)}
    )
    return fr.id, fr.status


def rework(config: Config, ref: str, text: str) -> tuple[str, Status]:
    """``opus rework FR -m TEXT``: a person's ``feedback`` and ``changes-requested``
    (SPEC §15, §16) on an FR in ``review`` or ``plan-review``; returns its id and old status."""
    if not text.strip():
        raise OpusError("the feedback text is empty: say what to change")
    vault = Vault(config)
    path = vault.find(ref)
    fr = vault.read(path)
    current = fr.status or Status.PLANNED
    if current not in (Status.REVIEW, Status.PLAN_REVIEW):
        raise OpusError(f"{fr.id} is {current}; rework needs review or plan-review")
    now = datetime.now().replace(microsecond=0)
    changes = {"status": Status.CHANGES_REQUESTED.value, "feedback": text, "updated_at": now}
    vault.update(path, changes, person=True)
    return fr.id, current


def set_status_all(
    config: Config, target: Status, current: frozenset[Status]
) -> list[tuple[str, str]]:
    """``set_status`` on every FR whose status is in ``current``: ``[(fr_id, old)]``."""
    vault = Vault(config)
    changed = []
    for fr in sorted(vault.scan().frs.values(), key=lambda f: f.id):
        status = fr.status or Status.PLANNED
        if status in current:
            vault.update(
                fr.path,
                {"status": target.value, "updated_at": datetime.now().replace(microsecond=0)},
            )
            changed.append((fr.id, status.value))
    return changed

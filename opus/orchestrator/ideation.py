"""Ideation (SPEC §19): when nothing is queued or running, an agent proposes the next FR.

:meth:`Ideation.due` says whether a run may start now (enabled, idle, the budget allows,
fewer than ``max_open`` opus ideas wait, ``interval`` passed since the last run);
:meth:`Ideation.run` runs ``[agents.ideator]`` once — read-only on a detached worktree of
the base, treated like the planner (its changes are thrown away with the worktree) — for
the least-recently-used category and repository, validates its answer and writes the idea
note into ``[ideation] folder``. What each run did, what it spent and when each category
was last used are kept in ``<state>/ideation.json`` (so the rotation survives a restart and
the spend counts toward the budget).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import yaml
from anyio.abc import TaskGroup
from pydantic import BaseModel, Field, ValidationError

from .atomic import atomic_write
from .config import AgentSection, Config
from .errors import AgentError, NoteError, OpusError, WorkspaceError
from .frontmatter import read_note
from .lifecycle import Stage, Status
from .models import FeatureRequest, Job, Usage
from .vault import is_candidate_name

if TYPE_CHECKING:
    from .agents.base import Agent
    from .runtime import Runtime

__all__ = (
    "IdeaRun",
    "Ideation",
    "Ledger",
    "idea_metrics",
    "ideator_section",
    "near_duplicate",
    "next_category",
    "parse_idea",
    "waiting_ideas",
)

log = logging.getLogger(__name__)

LEDGER = "ideation.json"
SIMILAR = 0.82
"""difflib ratio of two normalized titles at or above which an idea is a duplicate."""
CONTEXT_BYTES = 24_000
"""Repository context (file list and small files) put into the ideator's prompt."""
_UNSAFE = re.compile(r'[\\/:*?"<>|#^\[\]\x00-\x1f]+')


class IdeaRun(BaseModel):
    """One ideation run, kept in the ledger."""

    at: datetime
    category: str
    repo: str
    outcome: Literal["proposed", "duplicate", "invalid", "failed"]
    idea_id: str | None = None
    title: str | None = None
    note: str | None = None
    """The idea note's path, relative to the vault."""
    detail: str | None = None
    usage: Usage | None = None


class Ledger(BaseModel):
    """``<state>/ideation.json``."""

    version: int = 1
    categories: dict[str, datetime] = Field(default_factory=dict)
    """Category → when it was last used."""
    repos: dict[str, datetime] = Field(default_factory=dict)
    runs: list[IdeaRun] = Field(default_factory=list)

    @property
    def last_run(self) -> datetime | None:
        return self.runs[-1].at if self.runs else None

    def spending(self) -> list[tuple[datetime, float]]:
        """(when, USD) of every run that spent something: for the budget."""
        return [(r.at, r.usage.cost_usd) for r in self.runs if r.usage and r.usage.cost_usd]


def load_ledger(state_dir: Path) -> Ledger:
    path = state_dir / LEDGER
    try:
        return Ledger.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return Ledger()
    except (ValidationError, ValueError) as e:
        aside = path.with_name(f"{LEDGER}.corrupt-{secrets.token_hex(3)}")
        os.replace(path, aside)
        log.warning("%s cannot be read (%s): kept as %s, starting afresh", path, e, aside.name)
        return Ledger()


def save_ledger(state_dir: Path, ledger: Ledger) -> None:
    atomic_write(state_dir / LEDGER, ledger.model_dump_json(indent=2).encode())


def next_category(categories: Sequence[str], used: dict[str, datetime]) -> str:
    """The least-recently-used category: never used ones first, in the configured order."""
    never = [c for c in categories if c not in used]
    if never:
        return never[0]
    return min(categories, key=lambda c: used[c])


def ideator_section(config: Config) -> AgentSection:
    """``[agents.ideator]``; without it, the planner's agent (which already reads the
    repository without changing it)."""
    return config.agents.ideator or config.agents.planner


# -- the vault ------------------------------------------------------------------------------


def _notes(folder: Path) -> Iterable[tuple[Path, dict[str, Any], str]]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if not (is_candidate_name(entry.name) and entry.is_file(follow_symlinks=False)):
            continue
        try:
            note = read_note(Path(entry.path))
        except (NoteError, OSError):
            continue
        yield Path(entry.path), note.meta, note.body


def waiting_ideas(config: Config) -> list[tuple[Path, str, str]]:
    """Opus's ideas waiting in the ideas folder: (path, title, category)."""
    found = []
    for path, meta, body in _notes(config.root / config.ideation.folder):
        if str(meta.get("source")) == "opus" and str(meta.get("status")).lower() == "idea":
            found.append((path, _title(meta, body, path), str(meta.get("category") or "")))
    return found


def _title(meta: dict[str, Any], body: str, path: Path) -> str:
    if isinstance(meta.get("title"), str) and meta["title"].strip():
        return str(meta["title"]).strip()
    match = re.search(r"^# +(.+?)\s*$", body, re.MULTILINE)
    return match.group(1) if match else path.stem


def _aliases(meta: dict[str, Any]) -> list[str]:
    value = meta.get("aliases") or meta.get("alias")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value if v]
    return []


def _fr_folders(config: Config) -> list[Path]:
    """The planned folder, the ideas folder and the folders beside the planned one."""
    planned = config.planned_dir
    folders = {planned, config.root / config.ideation.folder}
    try:
        folders |= {p for p in planned.parent.iterdir() if p.is_dir() and p.name[:1] != "."}
    except OSError:
        pass
    return sorted(folders)


def known_titles(config: Config, jobs: Iterable[Job]) -> list[str]:
    """Titles and aliases of every FR and idea: the planned and ideas folders, the folders
    next to them (where done FRs are filed) and every job opus remembers."""
    titles: list[str] = []
    planned = config.planned_dir
    for folder in _fr_folders(config):
        for path, meta, body in _notes(folder):
            if folder != planned and not ({"id", "status", "source"} & set(meta)):
                continue  # a plain note beside the FRs (a plan, the person's own)
            titles += [_title(meta, body, path), *_aliases(meta)]
    titles += [job.title for job in jobs]
    return list(dict.fromkeys(t.strip() for t in titles if t.strip()))


def _normal(title: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", title.lower()).split())


def near_duplicate(title: str, existing: Iterable[str]) -> str | None:
    """The existing title ``title`` nearly repeats (difflib ratio ≥ SIMILAR), if any."""
    wanted = _normal(title)
    for other in existing:
        if difflib.SequenceMatcher(None, wanted, _normal(other)).ratio() >= SIMILAR:
            return other
    return None


# -- the ideator's prompt and answer --------------------------------------------------------


def ideation_prompt(category: str, repo: str, context: str, titles: Sequence[str]) -> str:
    listed = "\n".join(f"- {t}" for t in titles) or "(none yet)"
    return "\n".join(
        [
            f"# Ideation: propose one improvement ({category})",
            "",
            f"You are the **ideator** for the repository `{repo}`. Read the repository (do not "
            f"change any file) and propose **one** new improvement in the category "
            f"**{category}**: something this project does not have and no feature request "
            "below already asks for, scoped to a few hours of work for one engineer.",
            "",
            "Answer in markdown, written to the file named by `OPUS_OUTPUT_FILE` or printed on "
            "standard output: the first line is a `# ` heading with the idea's title (short, "
            "imperative); then the body: the problem, the proposed change, and a section "
            "`## Acceptance criteria` with a checklist of verifiable criteria.",
            "",
            "## Feature requests and ideas already in the vault (titles and aliases)",
            "",
            listed,
            "",
            "## The repository",
            "",
            context.strip() or "(no files)",
            "",
        ]
    )


def parse_idea(text: str) -> tuple[str, str]:
    """(title, body) of the ideator's answer: the first ``# `` heading and what follows.
    Raises ValueError when there is no heading, no body, or no acceptance criteria in it
    (SPEC §19: an idea is a title and a body with acceptance criteria)."""
    match = re.search(r"^# +(.+?)[ \t#]*$", text, re.MULTILINE)
    if match is None:
        raise ValueError("the answer has no `# ` heading for the title")
    title = " ".join(match.group(1).split())
    body = text[match.end() :].strip()
    if not body:
        raise ValueError(f"the idea {title!r} has no body")
    if "acceptance criteria" not in body.lower():
        raise ValueError(f"the idea {title!r} has no acceptance criteria")
    return title, body


def idea_note(idea_id: str, title: str, body: str, category: str, created: datetime) -> str:
    meta = yaml.safe_dump(
        {"id": idea_id, "title": title, "status": "idea", "category": category, "source": "opus"},
        sort_keys=False,
        allow_unicode=True,
    )
    stamp = created.replace(microsecond=0, tzinfo=None).isoformat()
    return f"---\n{meta}created: {stamp}\n---\n# {title}\n\n{body.rstrip()}\n"


def note_name(idea_id: str, title: str) -> str:
    clean = " ".join(_UNSAFE.sub(" ", title).split()).strip(". ")[:80].rstrip()
    return f"{idea_id} {clean}.md" if clean else f"{idea_id}.md"


# -- running ---------------------------------------------------------------------------------


class Ideation:
    """Ideation for one vault. Constructing does no I/O; :meth:`load` reads the ledger."""

    def __init__(
        self,
        rt: Runtime,
        *,
        agent: Agent | None = None,
        on_written: Callable[[], None] | None = None,
    ) -> None:
        self.rt = rt
        self._agent = agent
        self._on_written = on_written
        """Called after an idea note is written (the dashboard lists it)."""
        self.ledger = Ledger()
        self.running = False

    def load(self) -> None:
        """Read the ledger; its spend joins the runtime's budget."""
        self.ledger = load_ledger(self.rt.config.state_dir)
        self.rt.other_spend = self.ledger.spending()

    def due(self, jobs: Iterable[Job], *, busy: bool) -> str | None:
        """Why no ideation may start now, or None when one may."""
        config, now = self.rt.config, self.rt.now()
        if not config.ideation.enabled:
            return "ideation is off"
        if self.running:
            return "an ideation is running"
        if busy or any(j.status in (Status.QUEUED, Status.IN_PROGRESS) for j in jobs):
            return "work is queued or running"
        last = self.ledger.last_run
        if last is not None and (now - last).total_seconds() < config.ideation.interval:
            return "the interval has not passed"
        return self._limits()

    def _limits(self) -> str | None:
        why = self.rt.over_budget()
        if why:
            return why
        waiting = len(waiting_ideas(self.rt.config))
        if waiting >= self.rt.config.ideation.max_open:
            return f"{waiting} idea(s) wait (max_open {self.rt.config.ideation.max_open})"
        return None

    async def tick(self, tg: TaskGroup, jobs: Iterable[Job], *, busy: bool) -> bool:
        """The service's seam, at the end of each tick: start one ideation in ``tg`` when it
        is due (it runs beside the loop; new FRs are still picked up meanwhile)."""
        if not self.rt.config.ideation.enabled:
            return False
        listed = list(jobs)
        why = await anyio.to_thread.run_sync(lambda: self.due(listed, busy=busy))
        if why is not None:
            log.debug("no ideation: %s", why)
            return False
        self.running = True
        tg.start_soon(self._background)
        return True

    async def _background(self) -> None:
        try:
            await self._run(None)
        except Exception:
            log.exception("ideation: internal error")
        finally:
            self.running = False

    async def run(self, category: str | None = None) -> IdeaRun:
        """One ideation now (``opus ideate``): the budget and ``max_open`` still apply."""
        why = await anyio.to_thread.run_sync(self._limits)
        if why:
            raise OpusError(f"no ideation: {why}")
        self.running = True
        try:
            return await self._run(category)
        finally:
            self.running = False

    async def _run(self, wanted: str | None) -> IdeaRun:
        rt, config = self.rt, self.rt.config
        category = wanted or next_category(config.ideation.categories, self.ledger.categories)
        repo = next_category(list(config.repos), self.ledger.repos)
        started = rt.now()
        run = IdeaRun(at=started, category=category, repo=repo, outcome="failed")
        jobs = [*rt.registry.archived(), *rt.registry.jobs()]
        titles = await anyio.to_thread.run_sync(known_titles, config, jobs)
        try:
            answer, run.usage = await self._ask(category, repo, titles, started)
            title, body = parse_idea(answer)
        except AgentError as e:
            run.usage = e.usage or None  # a failed run was still paid for
            run.detail = rt.redactor(f"the ideator failed: {e}")
        except WorkspaceError as e:
            run.detail = rt.redactor(f"no worktree for the ideator: {e}")
        except ValueError as e:
            run.outcome, run.detail = "invalid", str(e)
        else:
            run.title = title
            twin = near_duplicate(title, titles)
            if twin is not None:
                run.outcome, run.detail = "duplicate", f"too close to {twin!r}"
            else:
                run.idea_id = f"IDEA-{started:%Y%m%d-%H%M%S}"
                path = await anyio.to_thread.run_sync(
                    self._write, run.idea_id, title, body, category, started
                )
                run.outcome, run.note = "proposed", path.relative_to(config.root).as_posix()
        await anyio.to_thread.run_sync(self._remember, run)
        if run.usage is not None:
            await rt.check_budget(None)  # alert_at for what the ideator spent
        if run.outcome == "proposed" and self._on_written is not None:
            self._on_written()
        if run.outcome == "proposed":
            log.info("ideation (%s, %s): proposed %r in %s", category, repo, run.title, run.note)
        else:
            log.warning("ideation (%s, %s): %s: %s", category, repo, run.outcome, run.detail)
        return run

    async def _ask(
        self, category: str, repo: str, titles: list[str], started: datetime
    ) -> tuple[str, Usage | None]:
        # the agents are imported here, not at the top: `opus metrics` reads the ledger
        # through this module and must not load them (SPEC §12: CLI latency)
        from .agents import build_agent
        from .agents.base import StageContext
        from .agents.repo_context import repo_files

        rt, config = self.rt, self.rt.config
        section = ideator_section(config)
        agent = self._agent or build_agent(
            section, Stage.PLANNER, environ=rt.environ, retries=config.pipeline.retries
        )
        ws = rt.workspaces[repo]
        run_id = f"ideation-{started:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
        folder = config.state_dir / "ideation" / run_id
        tree = await anyio.to_thread.run_sync(ws.detached, run_id)
        try:
            base = await anyio.to_thread.run_sync(ws.head, tree)
            context = await anyio.to_thread.run_sync(repo_files, tree, category, CONTEXT_BYTES)
            prompt = rt.redactor(ideation_prompt(category, repo, context, titles))
            request = folder / "request.md"

            def write_request() -> None:  # state files 0600 in folders 0700 (SPEC §8)
                folder.parent.mkdir(mode=0o700, exist_ok=True)
                folder.mkdir(mode=0o700)
                atomic_write(request, prompt.encode(), sync=False)

            await anyio.to_thread.run_sync(write_request)
            ctx = StageContext(
                stage=Stage.PLANNER,  # read-only, as the planner is
                iteration=1,
                job_id=run_id,
                fr=FeatureRequest(
                    id="ideation", title=f"Ideation: {category}", path=request, body=prompt
                ),
                worktree=tree,
                artifacts=folder,
                prompt=prompt,
                prompt_file=request,
                output_file=folder / "output",
                log_file=folder / "ideator.log",
                base_commit=base,
                timeout=section.timeout or config.pipeline.stage_timeout,
                stall_timeout=config.pipeline.stall_timeout,
                redactor=rt.redactor,
                sandbox=rt.sandbox,  # read-only worktree, as the planner's (SPEC §17)
            )
            result = await agent.run(ctx)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(ws.remove, tree)
                if rt.sandbox is not None:  # the run's private HOME and temp folders
                    await anyio.to_thread.run_sync(rt.sandbox.discard, run_id)
        return rt.redactor(result.output), result.usage

    def _write(self, idea_id: str, title: str, body: str, category: str, at: datetime) -> Path:
        config = self.rt.config
        folder = config.root / config.ideation.folder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / note_name(idea_id, title)
        text = idea_note(idea_id, title, self.rt.redactor(body), category, at)
        atomic_write(path, text.encode("utf-8"), mode=0o644)
        return path

    def _remember(self, run: IdeaRun) -> None:
        ledger = self.ledger
        ledger.categories[run.category] = run.at
        ledger.repos[run.repo] = run.at
        ledger.runs.append(run)
        save_ledger(self.rt.config.state_dir, ledger)
        self.rt.other_spend = ledger.spending()


def idea_metrics(
    config: Config, jobs: Iterable[Job], *, since: datetime | None = None
) -> dict[str, Any]:
    """Ideas proposed (since ``since``) and how many a person took up: the idea's id is an
    FR a job ran, or a note in the planned folder or one beside it (where done FRs go)."""
    ledger = load_ledger(config.state_dir)
    runs = [r for r in ledger.runs if since is None or r.at >= since]
    proposed = [r for r in runs if r.outcome == "proposed"]
    taken = {j.fr_id for j in jobs}
    for folder in _fr_folders(config):
        if folder != config.root / config.ideation.folder:
            taken |= {str(meta["id"]) for _, meta, _ in _notes(folder) if "id" in meta}
    return {
        "runs": len(runs),
        "proposed": len(proposed),
        "taken_up": sum(1 for r in proposed if r.idea_id in taken),
        "dropped_as_duplicates": sum(1 for r in runs if r.outcome == "duplicate"),
        "cost_usd": round(sum(r.usage.cost_usd for r in runs if r.usage), 4),
    }


def dashboard_lines(config: Config) -> list[str]:
    """The dashboard's "Ideas waiting" section: one wiki-link per waiting opus idea."""
    ideas = waiting_ideas(config)
    lines = ["## Ideas waiting", ""]
    lines += [f"- [[{path.stem}|{title}]] — {category}" for path, title, category in ideas] or [
        "(none)"
    ]
    return lines

"""The vault: which files are feature requests, reading them, and opus's writes into them.

``Vault.scan()`` lists the planned folder and reparses only the notes whose
(inode, mtime_ns, size) changed since the last scan. A broken note is a
``NoteProblem`` (logged once per change) and never stops the others being served.
``Vault.update()`` rewrites opus's own keys right before writing and remembers the
hash of what it wrote, so ``is_own_write()`` tells the watcher to ignore the echo.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from .config import Config
from .errors import NoteError, NoteValueError
from .frontmatter import (
    TEMP_PREFIX,
    ParsedNote,
    edit_note,
    effective_changes,
    parse_note,
    read_meta,
    read_note,
    read_raw,
)
from .lifecycle import Stage, Status
from .models import FeatureRequest, Priority

__all__ = (
    "OPUS_KEYS",
    "NoteProblem",
    "Scan",
    "Vault",
    "is_candidate_name",
    "read_status",
    "to_feature_request",
)

log = logging.getLogger(__name__)

OPUS_KEYS = frozenset(
    {
        "status",
        "stage",
        "iteration",
        "round",
        "plan",
        "job_id",
        "branch",
        "pr_url",
        "error",
        "updated_at",
    }
)
"""The only frontmatter keys opus ever writes."""
PERSON_COMMAND_KEYS = frozenset({"feedback"})
"""A person's keys that a person's command (``opus rework``) writes on their behalf."""

_IGNORED_SUFFIXES = (".tmp", ".swp", ".part", "~")
_IGNORED_DIRS = frozenset({".obsidian", ".opus"})
_HEADING = re.compile(r"^# +(.+?)[ \t]*$", re.MULTILINE)
_WIKILINK = re.compile(r"^\[\[([^\]|#]+)(?:[#|][^\]]*)?\]\]$")
_STAGES = frozenset(s.value for s in Stage)
StatKey = tuple[int, int, int]


def _abs(path: str | os.PathLike[str]) -> Path:
    """Absolute and normalized, without following symlinks."""
    return Path(os.path.abspath(path))  # noqa: PTH100


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_resume = False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a scan builds an FR for each note.

    A cold scan of 10,000 notes keeps ~90,000 new container objects (no cycles among
    them): with the previous scan still alive, the collections they trigger took a fifth
    of the scan. Reference counting still frees everything else at once; the collector
    comes back on after the last of concurrent scans, and only if it was on before.
    """
    global _gc_pauses, _gc_resume
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_resume = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_resume:
                gc.enable()


def is_candidate_name(name: str) -> bool:
    """True for a file name that may be an FR note (``*.md``, not a temp or hidden file).

    A ``*.md`` name never ends with one of ``_IGNORED_SUFFIXES``, and Syncthing's and opus's
    temp files start with a dot: checking ``.md``, the first character and the conflict
    marker is the whole rule.
    """
    return (
        name.endswith(".md")
        and len(name) > 3
        and name[0] not in ".~"
        and ".sync-conflict-" not in name
    )


assert TEMP_PREFIX.startswith(".") and not any(".md".endswith(s) for s in _IGNORED_SUFFIXES)


@dataclass(frozen=True, slots=True)
class NoteProblem:
    """A note opus cannot serve, and why (one line)."""

    path: Path
    message: str


@dataclass(frozen=True, slots=True)
class Scan:
    """One look at the planned folder: the FRs by id, and the notes that are broken."""

    frs: dict[str, FeatureRequest] = field(default_factory=dict)
    problems: list[NoteProblem] = field(default_factory=list)


class _Entry(NamedTuple):
    key: StatKey
    fr: FeatureRequest | None
    problem: NoteProblem | None


class Vault:
    """Discovery, reading and opus's writes for the notes of one vault.

    Thread-safe: ``scan``, ``update`` and ``is_own_write`` may run in different threads.
    ``parses`` counts the notes read and parsed from disk (the scan cache's misses).
    """

    def __init__(self, config: Config, *, clock: Callable[[], datetime] = datetime.now) -> None:
        self.config = config
        self.root = _abs(config.root)
        self.planned_dir = _abs(config.planned_dir)
        self._planned = str(self.planned_dir)
        self.parses = 0
        self._clock = clock
        self._repos = frozenset(config.repos)
        self._lock = threading.Lock()
        self._cache: dict[str, _Entry] = {}
        """By file name in the planned folder."""
        self._logged: dict[Path, str] = {}
        self._winners: Mapping[str, FeatureRequest] = {}
        """The previous scan's FRs by id (a clash keeps its winner)."""
        self._own: dict[Path, str] = {}
        """sha256 of the bytes opus last wrote, by path."""

    # --- discovery ---------------------------------------------------------------------------

    def is_candidate(self, path: str | os.PathLike[str]) -> bool:
        """True if ``path`` names a possible FR: ``*.md`` directly in the planned folder."""
        p = _abs(path)
        if p.parent != self.planned_dir or not is_candidate_name(p.name):
            return False
        try:
            inside = p.relative_to(self.root).parts
        except ValueError:
            inside = p.parts
        return not any(part in _IGNORED_DIRS for part in inside)

    def scan(self, changed: Collection[Path] | None = None) -> Scan:
        """Every FR in the planned folder by id, and every note that cannot be served.

        With ``changed`` (paths the watcher reported), only those notes are looked at
        again and the rest come from the cache: no listing of the folder.
        """
        problems: list[NoteProblem] = []
        frs: list[FeatureRequest] = []
        seen: set[str] = set()
        listing = self._listing(problems) if changed is None else self._changed(changed)
        with _gc_paused():
            for name, key in listing:
                entry = self._cache.get(name)
                if entry is None or key is None or entry.key != key:
                    found = self._load(name, key)
                    if found is None:
                        continue
                    entry = found
                seen.add(name)
                if entry.fr is not None:
                    frs.append(entry.fr)
                elif entry.problem is not None:
                    problems.append(entry.problem)
        with self._lock:
            for gone in self._cache.keys() - seen:
                del self._cache[gone]
        by_id = _linked(_dedupe(frs, problems, self._winners))
        self._winners = by_id
        problems.sort(key=lambda p: p.path)
        self._log_problems(problems)
        return Scan(by_id, problems)

    def _listing(self, problems: list[NoteProblem]) -> Iterator[tuple[str, StatKey | None]]:
        """Each candidate's name, and its stat key when the cache holds the name (else None:
        the read that follows stats the open file)."""
        try:
            with os.scandir(self.planned_dir) as listing:
                entries = list(listing)
        except FileNotFoundError:
            problems.append(NoteProblem(self.planned_dir, "the planned folder does not exist"))
            return
        except OSError as e:
            problems.append(NoteProblem(self.planned_dir, f"cannot list the folder: {e.strerror}"))
            return
        cache = self._cache
        for entry in entries:
            name = entry.name
            if not is_candidate_name(name):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    continue
                if name not in cache:
                    yield name, None
                    continue
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield name, (st.st_ino, st.st_mtime_ns, st.st_size)

    def _changed(self, paths: Collection[Path]) -> Iterator[tuple[str, StatKey]]:
        """The cached listing, with the given paths stat-ed afresh."""
        names = {Path(p).name for p in paths if Path(p).parent == self.planned_dir}
        with self._lock:
            cached = [(name, e.key) for name, e in self._cache.items() if name not in names]
        yield from cached
        for name in names:
            if not is_candidate_name(name):
                continue
            try:
                st = (self.planned_dir / name).lstat()
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            yield name, (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load(self, name: str, key: StatKey | None) -> _Entry | None:
        """Read and map one note of the planned folder, and cache the result under its name.
        ``key``: the listing's stat key, if it has one. None when the note is gone."""
        self.parses += 1
        path = self.planned_dir / name
        try:
            meta, body, read_key = read_meta(f"{self._planned}{os.sep}{name}")
            entry = _Entry(read_key, _feature_request(path, meta, body, self._repos), None)
        except Exception as e:
            problem = e.problem if isinstance(e, NoteError) else f"cannot read: {_named(e)}"
            if not isinstance(e, NoteError):  # whatever else a parser raises: one bad note
                log.exception("%s: unexpected error reading the note", path)
            if key is None:  # the listing did not stat it: the key of the path as it is
                try:
                    st = os.lstat(path)
                except (FileNotFoundError, NotADirectoryError):
                    return None
                key = (st.st_ino, st.st_mtime_ns, st.st_size)
            entry = _Entry(key, None, NoteProblem(path, problem))
        with self._lock:
            self._cache[name] = entry
        return entry

    def _remember(self, path: Path, entry: _Entry) -> None:
        if path.parent == self.planned_dir:
            with self._lock:
                self._cache[path.name] = entry

    def _log_problems(self, problems: list[NoteProblem]) -> None:
        """One warning per problem, when it first appears or its message changes."""
        now = {p.path: p.message for p in problems}
        with self._lock:
            for path, message in now.items():
                if self._logged.get(path) != message:
                    log.warning("%s: %s", path, message)
            self._logged = now

    # --- reading -----------------------------------------------------------------------------

    def read(self, path: str | os.PathLike[str]) -> FeatureRequest:
        """Read one note from disk as an FR. Raises NoteError (NoteValueError for a bad id)."""
        p = _abs(path)
        self.parses += 1
        note = read_note(p)
        fr = self._to_fr(note)
        if note.stat_key is not None:
            self._remember(p, _Entry(note.stat_key, fr, None))
        return fr

    def find(self, ref: str) -> Path:
        """The note an FR names: its id, a path (absolute, or relative to cwd or the vault),
        its file name's stem, its ``title`` or one of its ``aliases`` (case-insensitive)."""
        if ref.endswith(".md") or "/" in ref or os.sep in ref:
            found: list[Path] = []
            for base in (Path.cwd(), self.root, self.planned_dir):
                p = _abs(base / Path(ref).expanduser())
                if p.is_file() or p.is_symlink():
                    if self.is_candidate(p):
                        return p
                    found.append(p)
            if found:
                raise NoteError(found[0], f"not a feature request: FRs live in {self.planned_dir}")
            raise NoteError(Path(ref), "no such note")
        frs = self.scan().frs
        if ref in frs:
            return frs[ref].path
        folded = ref.casefold()
        for names in (
            lambda fr: (fr.id,),
            lambda fr: (fr.path.stem,),
            lambda fr: (fr.title,),
            lambda fr: fr.aliases,
        ):
            hits = [fr for fr in frs.values() if folded in (n.casefold() for n in names(fr))]
            if len(hits) == 1:
                return hits[0].path
            if len(hits) > 1:
                ids = ", ".join(sorted(fr.id for fr in hits))
                raise NoteError(Path(ref), f"{ref!r} names several feature requests: {ids}")
        raise NoteError(
            Path(ref),
            f"no feature request with id, file name, title or alias {ref!r} in {self.planned_dir}",
        )

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config: the planned folder and the repository names may change;
        every note is read and judged again (what opus wrote stays known as its own)."""
        with self._lock:
            self.config = config
            self.planned_dir = _abs(config.planned_dir)
            self._planned = str(self.planned_dir)
            self._repos = frozenset(config.repos)
            self._cache.clear()

    def _to_fr(self, note: ParsedNote) -> FeatureRequest:
        return to_feature_request(note, repos=self._repos)

    # --- writing -----------------------------------------------------------------------------

    def update(
        self,
        path: str | os.PathLike[str],
        changes: Mapping[str, object | None],
        *,
        respect: frozenset[Status] = frozenset(),
        person: bool = False,
    ) -> Status | None:
        """Write opus's keys into the note now (re-read first); returns the status as read.

        ``None`` deletes a key. A ``status`` change is dropped when the status on disk is
        in ``respect``. When any other key changes, ``updated_at`` is stamped with the
        clock unless ``changes`` sets it; ``updated_at`` alone never causes a write.
        Raises ValueError for a key opus does not own, NoteError for a broken note.
        ``person``: a person's command writes (may also set ``PERSON_COMMAND_KEYS``).
        """
        foreign = sorted(set(changes) - OPUS_KEYS - (PERSON_COMMAND_KEYS if person else set()))
        if foreign:
            raise ValueError(f"opus never writes these keys: {', '.join(foreign)}")
        p = _abs(path)
        on_disk: list[Status | None] = []

        def decide(note: ParsedNote) -> Mapping[str, object | None]:
            status = read_status(note.meta.get("status"))
            on_disk.append(status)
            wanted = {k: _one_line(v) if k == "error" else v for k, v in changes.items()}
            if status in respect:
                wanted.pop("status", None)
            stamp = wanted.pop("updated_at", self._clock())
            todo = effective_changes(note.meta, wanted)
            return {**todo, "updated_at": stamp} if todo else {}

        def own(new: bytes) -> None:
            with self._lock:
                self._own[p] = hashlib.sha256(new).hexdigest()

        edit = edit_note(p, decide, before_write=own)
        if edit.written is not None and edit.stat is not None:
            key = (edit.stat.st_ino, edit.stat.st_mtime_ns, edit.stat.st_size)
            with contextlib.suppress(NoteError):  # a bad id: the next scan reports it
                self._remember(p, _Entry(key, self._to_fr(parse_note(p, edit.written, key)), None))
        return on_disk[-1] if on_disk else None

    def is_own_write(self, path: str | os.PathLike[str]) -> bool:
        """True while the file holds exactly the bytes opus last wrote to it."""
        p = _abs(path)
        with self._lock:
            own = self._own.get(p)
        if own is None:
            return False
        try:
            raw, _ = read_raw(p)
        except NoteError:
            return False
        return hashlib.sha256(raw).hexdigest() == own


def _dedupe(
    frs: list[FeatureRequest], problems: list[NoteProblem], before: Mapping[str, FeatureRequest]
) -> dict[str, FeatureRequest]:
    """FRs by id; of notes sharing an id, the one with a ``job_id`` wins, then the one that
    won before, else the first path."""
    by_id = {fr.id: fr for fr in frs}
    if len(by_id) == len(frs):
        return by_id  # no clash (almost always)
    by_id = {}
    clashes: dict[str, list[FeatureRequest]] = {}
    for fr in frs:
        first = by_id.setdefault(fr.id, fr)
        if first is not fr:
            clashes.setdefault(fr.id, [first]).append(fr)
    for fr_id, group in clashes.items():
        won = before.get(fr_id)
        group.sort(key=lambda fr: (fr.job_id is None, won is None or fr.path != won.path, fr.path))
        by_id[fr_id] = winner = group[0]
        for loser in group[1:]:
            message = f"duplicate id {fr_id}, also in {winner.path.name}"
            problems.append(NoteProblem(loser.path, message))
    return by_id


def _linked(by_id: dict[str, FeatureRequest]) -> dict[str, FeatureRequest]:
    """``depends_on`` entries that name a note rather than an id — Obsidian's
    ``[[login]]``, its title or an alias — replaced by that FR's id (any case)."""
    if all(dep in by_id for fr in by_id.values() for dep in fr.depends_on):
        return by_id  # (almost always: a pass over the FRs, no more)
    names: dict[str, str] = {}
    for fr in by_id.values():
        for name in (fr.path.stem, fr.title, *fr.aliases):
            names.setdefault(name.casefold(), fr.id)
    linked = {}
    for fr_id, fr in by_id.items():
        deps = tuple(d if d in by_id else names.get(d.casefold(), d) for d in fr.depends_on)
        linked[fr_id] = fr if deps == fr.depends_on else fr.model_copy(update={"depends_on": deps})
    return linked


# --- mapping a note to a FeatureRequest --------------------------------------------------------


def dependency_cycle(fr_id: str, frs: Mapping[str, FeatureRequest]) -> list[str] | None:
    """The ``depends_on`` cycle through ``fr_id`` as ids (first id last again), if any: such
    FRs would wait for each other for ever. (An FR depending on itself is its own problem.)"""
    path: list[str] = []
    seen: set[str] = set()

    def walk(at: str) -> list[str] | None:
        fr = frs.get(at)
        if fr is None or at in seen:
            return None
        seen.add(at)
        path.append(at)
        for dep in fr.depends_on:
            if dep == fr_id and at != fr_id:
                return [*path, dep]
            if dep != at and (found := walk(dep)) is not None:
                return found
        path.pop()
        return None

    return walk(fr_id)


def read_status(value: object) -> Status | None:
    """A note's status: missing → None; a person's unknown value (``draft``) → planned."""
    if isinstance(value, str):
        return _status_of(value)
    if value is None:
        return None
    return Status.parse(value) or Status.PLANNED


@functools.lru_cache(maxsize=256)
def _status_of(text: str) -> Status | None:
    return Status.parse(text) or Status.PLANNED if text.strip() else None


@functools.lru_cache(maxsize=256)
def _priority_of(value: str | int) -> Priority | str:
    """The priority a value spells, or the problem with it."""
    try:
        return Priority.parse(value)
    except ValueError as e:
        return str(e)


def to_feature_request(note: ParsedNote, *, repos: Collection[str]) -> FeatureRequest:
    """Map a parsed note to an FR. A bad ``id`` raises NoteValueError; other bad values
    of a person's keys set ``invalid`` (the first one found)."""
    path = note.path if note.path.is_absolute() else _abs(note.path)
    return _feature_request(path, note.meta, note.body, repos)


def _feature_request(
    path: Path, meta: dict[str, Any], body: str, repos: Collection[str]
) -> FeatureRequest:
    """``to_feature_request`` of a note's parts (a scan maps thousands: only the keys the
    note has are looked at further, and fields left at their defaults are not passed)."""
    get = meta.get
    invalid: list[tuple[str, str]] = []
    fields: dict[str, Any] = {
        "id": _fr_id(path, get("id")),
        "title": _text(get("title")) or _heading(body) or path.stem,
        "path": path,
        "body": body,
    }
    value = get("priority")
    if value is not None:
        kind = type(value)
        priority = _priority_of(value) if kind is str or kind is int else _priority_of_any(value)
        if isinstance(priority, Priority):
            fields["priority"] = priority
        else:
            invalid.append(("priority", priority))
    if "repo" in meta:
        fields["repo"] = _repo(meta["repo"], repos, invalid)
    if "depends_on" in meta:
        fields["depends_on"] = _depends_on(meta["depends_on"], invalid)
    spelled = _text(get("approval"))
    if spelled is not None:
        if spelled.lower() == "manual":
            fields["approval"] = "manual"
        elif spelled.lower() == "auto":
            fields["approval"] = "auto"
        else:
            invalid.append(("approval", f"approval must be manual or auto, not {spelled!r}"))
    plan_approval = get("plan_approval")
    if plan_approval is not None:
        if isinstance(plan_approval, bool):
            fields["plan_approval"] = plan_approval
        else:
            message = f"plan_approval must be true or false, not {plan_approval!r}"
            invalid.append(("plan_approval", message))
    if "status" in meta:
        fields["status"] = read_status(meta["status"])
    if "job_id" in meta:
        fields["job_id"] = _text(meta["job_id"])
    stage = get("stage")
    if stage is not None:
        stage = _text(stage)
        fields["stage"] = Stage(stage) if stage in _STAGES else None
    iteration = get("iteration")
    if isinstance(iteration, int) and not isinstance(iteration, bool):
        fields["iteration"] = iteration
    if "error" in meta:
        fields["error"] = _text(meta["error"])
    feedback = get("feedback")
    if feedback is not None:
        fields["feedback"] = (
            feedback.strip() or None if isinstance(feedback, str) else _text(feedback)
        )
    if invalid:
        fields["invalid"] = invalid[0]
        fields["problems"] = tuple(invalid)
    if "aliases" in meta:
        fields["aliases"] = _aliases(meta["aliases"])
    return FeatureRequest(**fields)


def _priority_of_any(value: object) -> Priority | str:
    try:
        return Priority.parse(value)
    except ValueError as e:
        return str(e)


def _aliases(value: object) -> tuple[str, ...]:
    """Obsidian's ``aliases``: a list of names, or one name."""
    items = value if isinstance(value, list) else [value]
    return tuple(t for t in (_text(v) for v in items) if t)


def _text(value: object) -> str | None:
    """A scalar as text: strings stripped, numbers spelled out; None for anything else."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _fr_id(path: Path, value: object) -> str:
    if value is None:
        return path.stem
    text = _text(value)
    if text is None:
        if isinstance(value, str):
            return path.stem
        raise NoteValueError(path, "id", f"id must be a string or a number, not {value!r}")
    if text in (".", "..") or any(c in text for c in "/\\") or not text.isprintable():
        # it names files (the plan note, branches, artifacts): never a path
        raise NoteValueError(
            path, "id", f"id {text!r} cannot be . or .., nor hold a slash or a control character"
        )
    return text


def _heading(body: str) -> str | None:
    match = _HEADING.search(body)
    return match.group(1).strip() if match else None


def _repo(value: object, repos: Collection[str], invalid: list[tuple[str, str]]) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    name = _text(value)
    if name is None:
        invalid.append(("repo", f"repo must be a repository name, not {value!r}"))
        return None
    if "/" in name or "\\" in name or name.startswith((".", "~")):
        invalid.append(("repo", f"repo must name a [repos.NAME] entry, not a path: {name!r}"))
        return None
    if name not in repos:
        known = ", ".join(sorted(repos))
        invalid.append(("repo", f"unknown repo {name!r} (known: {known})"))
        return None
    return name


def _depends_on(value: object, invalid: list[tuple[str, str]]) -> tuple[str, ...]:
    items = [] if value is None else value if isinstance(value, list) else [value]
    ids: list[str] = []
    for item in items:
        if item is None or (isinstance(item, str) and not item.strip()):
            continue
        if isinstance(item, list) and len(item) == 1 and isinstance(item[0], str):
            item = f"[[{item[0]}]]"  # `depends_on: [[link]]`: the value itself is the link
        if isinstance(item, list) and len(item) == 1 and isinstance(item[0], list):
            item = f"[[{item[0][0]}]]" if len(item[0]) == 1 else item  # an unquoted [[link]]
        text = _text(item)
        if text is None:
            invalid.append(("depends_on", f"depends_on must list FR ids, not {item!r}"))
            return ()
        link = _WIKILINK.match(text)
        ids.append(link.group(1).strip() if link else text)
    return tuple(ids)


def _named(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def _one_line(value: object) -> object:
    return " ".join(value.split()) if isinstance(value, str) else value

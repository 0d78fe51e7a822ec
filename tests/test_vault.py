"""The vault: discovery, mapping notes to FRs, broken notes, the scan cache, opus's writes."""

from __future__ import annotations

import logging
import os
import textwrap
from datetime import datetime
from pathlib import Path

import pytest

from opus.orchestrator.config import Config, parse_config
from opus.orchestrator.errors import NoteError, NoteValueError
from opus.orchestrator.frontmatter import MAX_NOTE_BYTES, TEMP_PREFIX
from opus.orchestrator.lifecycle import Stage, Status
from opus.orchestrator.models import Priority
from opus.orchestrator.vault import OPUS_KEYS, NoteProblem, Scan, Vault

NOW = datetime(2026, 11, 21, 10, 30)
RESPECT = frozenset({Status.PAUSED, Status.CANCELLED, Status.APPROVED})


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def config(tmp_path: Path) -> Config:
    root = tmp_path / "vault"
    (root / "10_features" / "03_planned").mkdir(parents=True)
    data = {"repos": {"app": {"path": "../app"}, "web": {"path": "../web"}}}
    return parse_config(data, root / "opus.toml")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def v(config: Config, clock: Clock) -> Vault:
    return Vault(config, clock=clock)


def note(v: Vault, name: str, text: str | bytes) -> Path:
    path = v.planned_dir / name
    data = text if isinstance(text, bytes) else textwrap.dedent(text).lstrip().encode()
    path.write_bytes(data)
    return path


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.name: (p.read_bytes() if not p.is_symlink() else b"->", p.lstat().st_mtime_ns)
        for p in folder.iterdir()
    }


# --- mapping notes to FRs --------------------------------------------------------------------


def test_a_full_note_maps_to_a_feature_request(v: Vault) -> None:
    path = note(
        v,
        "export.md",
        """
        ---
        id: FR-101
        title: Export as CSV
        priority: high
        repo: web
        depends_on: ["[[FR-100]]", FR-99, "[[FR-98|the parser]]"]
        approval: Auto
        status: In-Progress
        stage: tester
        iteration: 2
        job_id: j-1
        error: something
        ---
        # Heading
        Body.
        """,
    )
    fr = v.read(path)
    assert fr.id == "FR-101"
    assert fr.title == "Export as CSV"
    assert fr.path == path and fr.path.is_absolute()
    assert fr.body == "# Heading\nBody.\n"
    assert fr.priority is Priority.HIGH
    assert fr.repo == "web"
    assert fr.depends_on == ("FR-100", "FR-99", "FR-98")
    assert fr.approval == "auto"
    assert fr.status is Status.IN_PROGRESS
    assert fr.stage is Stage.TESTER
    assert fr.iteration == 2
    assert fr.job_id == "j-1"
    assert fr.error == "something"
    assert fr.invalid is None


def test_defaults_come_from_the_file_and_the_body(v: Vault) -> None:
    fr = v.read(note(v, "FR-7 Dark mode.md", "Intro\n\n# Dark mode  \n\ntext\n"))
    assert fr.id == "FR-7 Dark mode"
    assert fr.title == "Dark mode"
    assert fr.priority is Priority.MEDIUM
    assert (fr.repo, fr.depends_on, fr.approval, fr.status) == (None, (), None, None)
    bare = v.read(note(v, "bare.md", "---\n---\nno heading\n"))
    assert (bare.id, bare.title) == ("bare", "bare")


def test_numeric_id_and_single_dependency(v: Vault) -> None:
    fr = v.read(note(v, "n.md", "---\nid: 101\ndepends_on: FR-9\n---\n"))
    assert fr.id == "101"
    assert fr.depends_on == ("FR-9",)


def test_dependency_spellings(v: Vault) -> None:
    text = "---\ndepends_on:\n  - [[FR-1]]\n  - '[[FR-2#Scope]]'\n  -\n  - 3\nrepo: ' '\n---\n"
    fr = v.read(note(v, "n.md", text))
    assert fr.depends_on == ("FR-1", "FR-2", "3")  # an unquoted link is a nested list
    assert (fr.repo, fr.invalid) == (None, None)
    assert v.read(note(v, "m.md", "---\ndepends_on: ''\n---\n")).depends_on == ()


def test_id_that_is_not_a_string_or_number_is_a_note_error(v: Vault) -> None:
    path = note(v, "n.md", "---\nid: [a, b]\n---\n")
    with pytest.raises(NoteValueError) as info:
        v.read(path)
    assert info.value.key == "id"
    assert [p.path for p in v.scan().problems] == [path]


@pytest.mark.parametrize(
    ("spelled", "expected"),
    [
        ("critical", Priority.CRITICAL),
        ("HIGH", Priority.HIGH),
        ("Medium", Priority.MEDIUM),
        ("low", Priority.LOW),
        ("P0", Priority.CRITICAL),
        ("p1", Priority.HIGH),
        ("P3", Priority.LOW),
        ("0", Priority.CRITICAL),
        ("2", Priority.MEDIUM),
        ("3", Priority.LOW),
        ("'1'", Priority.HIGH),
    ],
)
def test_priority_spellings(v: Vault, spelled: str, expected: Priority) -> None:
    fr = v.read(note(v, "n.md", f"---\npriority: {spelled}\n---\n"))
    assert fr.priority is expected
    assert fr.invalid is None


@pytest.mark.parametrize(
    ("line", "key", "words"),
    [
        ("priority: urgent", "priority", "unknown priority"),
        ("priority: 7", "priority", "unknown priority"),
        ("priority: yes", "priority", "unknown priority"),
        ("repo: ../app", "repo", "not a path"),
        ("repo: /srv/app", "repo", "not a path"),
        ("repo: ~/code/app", "repo", "not a path"),
        ("repo: .hidden", "repo", "not a path"),
        ("repo: 'C:\\code'", "repo", "not a path"),
        ("repo: mobile", "repo", "unknown repo 'mobile' (known: app, web)"),
        ("repo: [app]", "repo", "repository name"),
        ("approval: sometimes", "approval", "manual or auto"),
        ("depends_on: [{a: 1}]", "depends_on", "FR ids"),
    ],
)
def test_bad_values_make_an_invalid_fr(v: Vault, line: str, key: str, words: str) -> None:
    path = note(v, "FR-5.md", f"---\n{line}\n---\nbody\n")
    fr = v.read(path)
    assert fr.invalid is not None
    assert fr.invalid[0] == key
    assert words in fr.invalid[1]
    scan = v.scan()
    assert scan.frs["FR-5"].invalid == fr.invalid
    assert scan.problems == []


@pytest.mark.parametrize(
    ("written", "status"),
    [
        ("planned", Status.PLANNED),
        ("In-Progress", Status.IN_PROGRESS),
        ("PAUSED", Status.PAUSED),
        ("draft", Status.PLANNED),
        ("specced", Status.PLANNED),
        ("''", None),
        ("", None),
    ],
)
def test_status_as_opus_reads_it(v: Vault, written: str, status: Status | None) -> None:
    assert v.read(note(v, "n.md", f"---\nstatus: {written}\n---\n")).status == status


# --- discovery -------------------------------------------------------------------------------


def test_ignore_rules(v: Vault) -> None:
    planned = v.planned_dir
    assert v.is_candidate(planned / "FR-1.md")
    assert v.is_candidate(str(planned / "Dark mode.md"))
    assert v.is_candidate(planned / "notes.syncthing.md")
    for name in (
        ".hidden.md",
        "~lock.md",
        "note.md.tmp",
        "note.md.swp",
        "note.md.part",
        "note.md~",
        ".syncthing.note.md.tmp",
        "note.sync-conflict-20261121-103000-ABCDEF.md",
        f"{TEMP_PREFIX}abc.tmp",
        f"{TEMP_PREFIX}abc.md",
        "note.txt",
        ".md",
    ):
        assert not v.is_candidate(planned / name), name
    assert not v.is_candidate(planned / "sub" / "FR-1.md")
    assert not v.is_candidate(v.root / "FR-1.md")
    assert not v.is_candidate(v.root / ".obsidian" / "FR-1.md")
    assert not v.is_candidate(planned / ".opus" / "FR-1.md")


def test_planned_folder_inside_a_dot_folder_holds_no_frs(tmp_path: Path) -> None:
    config = parse_config(
        {"vault": {"planned": ".obsidian/plans"}, "repos": {"app": {"path": "x"}}},
        tmp_path / "opus.toml",
    )
    assert not Vault(config).is_candidate(tmp_path / ".obsidian" / "plans" / "FR-1.md")


def test_scan_skips_ignored_files_and_folders(v: Vault) -> None:
    note(v, "FR-1.md", "---\nid: FR-1\n---\n")
    for name in (".hidden.md", "x.md.swp", "x.sync-conflict-1-2-AB.md", f"{TEMP_PREFIX}q.tmp"):
        note(v, name, b"\x00 not even text")
    (v.planned_dir / "folder.md").mkdir()
    (v.planned_dir / "sub").mkdir()
    (v.planned_dir / "sub" / "FR-2.md").write_text("---\nid: FR-2\n---\n")
    scan = v.scan()
    assert isinstance(scan, Scan)
    assert list(scan.frs) == ["FR-1"]
    assert scan.problems == []


def test_missing_planned_folder_is_a_problem(config: Config) -> None:
    config.planned_dir.rmdir()
    scan = Vault(config).scan()
    assert scan.frs == {}
    assert scan.problems == [NoteProblem(config.planned_dir, "the planned folder does not exist")]


# --- broken notes ----------------------------------------------------------------------------

BROKEN: dict[str, tuple[bytes, str]] = {
    "bad-yaml.md": (b"---\nid: [oops\n---\nbody\n", "invalid YAML"),
    "binary.md": (b"---\nid: B\n---\n\x00\xff\x00", "binary"),
    "huge.md": (b"---\nid: H\n---\n" + b"y" * MAX_NOTE_BYTES, "larger than 1 MiB"),
    "unclosed.md": (b"---\nid: U\nbody without a closing fence\n", "no closing"),
    "list.md": (b"---\n- one\n- two\n---\n", "is a list"),
    "latin1.md": (b"---\ntitle: Gr\xfc\xdfe\n---\n", "not UTF-8"),
    "dupkey.md": (b"---\nid: D\nid: E\n---\n", "duplicate key"),
}


def test_broken_notes_are_problems_and_stay_byte_identical(
    v: Vault, caplog: pytest.LogCaptureFixture
) -> None:
    good = note(v, "good.md", "---\nid: FR-1\n---\nserve me\n")
    for name, (raw, _) in BROKEN.items():
        note(v, name, raw)
    target = v.root / "elsewhere.md"
    target.write_text("---\nid: FR-9\n---\n")
    (v.planned_dir / "link.md").symlink_to(target)
    note(v, "a-first.md", "---\nid: FR-2\n---\n")
    note(v, "b-dup.md", "---\nid: FR-2\n---\n")
    before = snapshot(v.planned_dir)

    with caplog.at_level(logging.WARNING, logger="opus.orchestrator.vault"):
        scan = v.scan()
    assert set(scan.frs) == {"FR-1", "FR-2"}
    assert scan.frs["FR-1"].path == good
    assert scan.frs["FR-2"].path.name == "a-first.md"
    problems = {p.path.name: p.message for p in scan.problems}
    assert set(problems) == {*BROKEN, "link.md", "b-dup.md"}
    for name, (_, words) in BROKEN.items():
        assert words in problems[name], (name, problems[name])
    assert "symlink" in problems["link.md"]
    assert problems["b-dup.md"] == "duplicate id FR-2, also in a-first.md"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(problems)
    assert all("\n" not in w for w in warnings)
    assert any("huge.md" in w and "larger than 1 MiB" in w for w in warnings)

    for name in [*BROKEN, "link.md"]:
        with pytest.raises(NoteError):
            v.update(v.planned_dir / name, {"status": "failed", "error": "bad note"})
    assert snapshot(v.planned_dir) == before
    assert target.read_text() == "---\nid: FR-9\n---\n"

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="opus.orchestrator.vault"):
        again = v.scan()
    assert again.problems == scan.problems
    assert caplog.records == []  # logged once per change, not once per scan


def test_a_changed_problem_is_logged_again(v: Vault, caplog: pytest.LogCaptureFixture) -> None:
    path = note(v, "n.md", b"---\nid: [x\n---\n")
    with caplog.at_level(logging.WARNING, logger="opus.orchestrator.vault"):
        v.scan()
        v.scan()
        path.write_bytes(b"---\n- a list now\n---\n")
        v.scan()
        path.write_bytes(b"---\nid: fixed\n---\n")
        fixed = v.scan()
        path.write_bytes(b"---\nid: [x\n---\n")
        v.scan()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "invalid YAML" in messages[0] and "is a list" in messages[1]
    assert "invalid YAML" in messages[2]
    assert list(fixed.frs) == ["fixed"]


def test_duplicate_id_prefers_the_note_with_a_job(v: Vault) -> None:
    first = note(v, "a.md", "---\nid: FR-1\n---\n")
    running = note(v, "z.md", "---\nid: FR-1\njob_id: j-7\nstatus: in-progress\n---\n")
    before = first.read_bytes()
    scan = v.scan()
    assert scan.frs["FR-1"].path == running
    assert scan.problems == [NoteProblem(first, "duplicate id FR-1, also in z.md")]
    assert first.read_bytes() == before


# --- the scan cache --------------------------------------------------------------------------


def test_second_scan_reparses_nothing(v: Vault) -> None:
    paths = [note(v, f"FR-{i}.md", f"---\nid: FR-{i}\n---\nbody {i}\n") for i in range(40)]
    note(v, "broken.md", b"---\nid: [\n---\n")
    first = v.scan()
    assert v.parses == 41
    second = v.scan()
    assert v.parses == 41
    assert second.frs == first.frs
    assert second.problems == first.problems

    paths[3].write_text("---\nid: FR-3\npriority: high\n---\nchanged\n")
    paths[4].unlink()
    third = v.scan()
    assert v.parses == 42
    assert third.frs["FR-3"].priority is Priority.HIGH
    assert "FR-4" not in third.frs

    v.update(paths[5], {"status": Status.QUEUED})
    fourth = v.scan()
    assert v.parses == 42  # opus's own write refreshed the cache
    assert fourth.frs["FR-5"].status is Status.QUEUED


def test_a_note_replaced_by_rename_is_reparsed(v: Vault) -> None:
    path = note(v, "n.md", "---\nid: A\n---\n")
    assert list(v.scan().frs) == ["A"]
    tmp = v.planned_dir / ".n.md.swp"
    tmp.write_text("---\nid: B\n---\n")
    os.replace(tmp, path)
    assert list(v.scan().frs) == ["B"]


# --- find ------------------------------------------------------------------------------------


def test_find_by_id_and_by_path(v: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = note(v, "export.md", "---\nid: FR-101\n---\n")
    assert v.find("FR-101") == path
    assert v.find("fr-101") == path
    assert v.find(str(path)) == path
    assert v.find("10_features/03_planned/export.md") == path  # relative to the vault
    assert v.find("export.md") == path  # relative to the planned folder
    monkeypatch.chdir(tmp_path)
    assert v.find("vault/10_features/03_planned/export.md") == path  # relative to cwd
    with pytest.raises(
        NoteError, match="no feature request with id, file name, title or alias 'FR-404'"
    ):
        v.find("FR-404")
    with pytest.raises(NoteError, match="no such note"):
        v.find("missing.md")
    (v.root / "outside.md").write_text("---\nid: X\n---\n")
    with pytest.raises(NoteError, match="not a feature request"):
        v.find(str(v.root / "outside.md"))


# --- writing ---------------------------------------------------------------------------------


def test_update_writes_opus_keys_and_stamps_updated_at(v: Vault, clock: Clock) -> None:
    path = note(v, "n.md", "---\nid: FR-1  # mine\nowner: ana\n---\nbody\n")
    was = v.update(path, {"status": Status.QUEUED, "job_id": "j-1"})
    assert was is None
    assert path.read_text() == (
        "---\nid: FR-1  # mine\nowner: ana\nstatus: queued\njob_id: j-1\n"
        "updated_at: 2026-11-21T10:30:00\n---\nbody\n"
    )
    clock.now = datetime(2026, 11, 21, 11, 0)
    before = path.read_bytes()
    assert v.update(path, {"status": "queued", "job_id": "j-1"}) is Status.QUEUED
    assert path.read_bytes() == before  # nothing changed, so no new timestamp either
    v.update(path, {"updated_at": datetime(2030, 1, 1)})
    assert path.read_bytes() == before  # updated_at alone never writes
    v.update(path, {"status": Status.IN_PROGRESS, "stage": Stage.CODER, "iteration": 1})
    fr = v.read(path)
    assert (fr.status, fr.stage, fr.iteration) == (Status.IN_PROGRESS, Stage.CODER, 1)
    assert "updated_at: 2026-11-21T11:00:00\n" in path.read_text()
    v.update(path, {"status": Status.REVIEW, "stage": None, "iteration": None})
    assert "stage" not in path.read_text()
    assert "iteration" not in path.read_text()


def test_update_rejects_keys_opus_does_not_own(v: Vault) -> None:
    path = note(v, "n.md", "---\nid: FR-1\n---\n")
    for key in ("title", "priority", "id", "repo", "depends_on"):
        with pytest.raises(ValueError, match=key):
            v.update(path, {"status": "queued", key: "x"})
    assert path.read_text() == "---\nid: FR-1\n---\n"
    assert {"status", "stage", "iteration", "job_id", "branch", "pr_url", "error"} < OPUS_KEYS


@pytest.mark.parametrize("person", ["paused", "cancelled", "approved"])
def test_respected_status_is_never_overwritten(v: Vault, person: str) -> None:
    path = note(v, "n.md", f"---\nid: FR-1\nstatus: {person}\n---\n")
    was = v.update(
        path, {"status": Status.IN_PROGRESS, "stage": Stage.CODER, "job_id": "j"}, respect=RESPECT
    )
    assert was == Status(person)
    fr = v.read(path)
    assert fr.status == Status(person)
    assert (fr.stage, fr.job_id) == (Stage.CODER, "j")


def test_without_respect_the_status_is_written(v: Vault) -> None:
    path = note(v, "n.md", "---\nstatus: paused\n---\n")
    assert v.update(path, {"status": Status.QUEUED}) is Status.PAUSED
    assert v.read(path).status is Status.QUEUED


def test_update_reads_the_file_again_before_writing(v: Vault) -> None:
    path = note(v, "n.md", "---\nid: FR-1\n---\nbody\n")
    v.scan()
    path.write_text("---\nid: FR-1\npriority: high\nstatus: paused\n---\nedited body\n")
    assert v.update(path, {"status": "in-progress"}, respect=RESPECT) is Status.PAUSED
    v.update(path, {"error": "line one\n  line two\n"})
    assert path.read_text() == (
        "---\nid: FR-1\npriority: high\nstatus: paused\nerror: line one line two\n"
        "updated_at: 2026-11-21T10:30:00\n---\nedited body\n"
    )


def test_own_write_detection(v: Vault) -> None:
    path = note(v, "n.md", "---\nid: FR-1\n---\nbody\n")
    assert not v.is_own_write(path)
    v.update(path, {"status": Status.QUEUED})
    assert v.is_own_write(path)
    assert v.is_own_write(str(path))
    same = path.read_bytes()
    path.write_bytes(same)  # rewritten with the same content: still opus's bytes
    assert v.is_own_write(path)
    path.write_bytes(same.replace(b"body", b"a person's edit"))
    assert not v.is_own_write(path)
    path.unlink()
    assert not v.is_own_write(path)
    assert not v.is_own_write(v.planned_dir / "never-written.md")


def test_no_temp_files_are_left_behind(v: Vault) -> None:
    path = note(v, "n.md", "---\nid: FR-1\n---\n")
    for i in range(5):
        v.update(path, {"iteration": i + 1})
    assert sorted(p.name for p in v.planned_dir.iterdir()) == ["n.md"]

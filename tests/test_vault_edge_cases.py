"""Edge cases of the vault layer found by a review (SPEC §2, NOTES "Notes and frontmatter",
"Watching files"): tabs, impossible dates, fences with trailing spaces, one-link
`depends_on`, copies of a served note, and opus's own writes. Each states what is required.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pytest

from opus.orchestrator.config import Config, parse_config
from opus.orchestrator.errors import NoteError
from opus.orchestrator.lifecycle import Status
from opus.orchestrator.vault import NoteProblem, Vault

NOW = datetime(2026, 11, 21, 10, 30)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    root = tmp_path / "vault"
    (root / "10_features" / "03_planned").mkdir(parents=True)
    data = {"repos": {"app": {"path": "../app"}}}
    return parse_config(data, root / "opus.toml")


@pytest.fixture
def v(config: Config) -> Vault:
    return Vault(config, clock=lambda: NOW)


def note(v: Vault, name: str, text: str) -> Path:
    path = v.planned_dir / name
    path.write_bytes(text.encode())
    return path


# --- tabs: valid YAML the scan accepts, but opus cannot (or only destructively) write ---------


@pytest.mark.parametrize(
    "person",
    [
        "title:\tExport\n",  # a tab after the colon
        "owner: ana\t# a comment after a tab\n",
        "tags: [a,\n\tb]\n",  # a flow list continued on a tab-indented line
    ],
)
def test_a_tab_in_a_persons_key_does_not_stop_or_reshape_opus_writes(v: Vault, person: str) -> None:
    path = note(v, "FR-1.md", f"---\n{person}status: planned\n---\nbody\n")
    scan = v.scan()
    assert "FR-1" in scan.frs and scan.problems == []  # the scan serves it as an FR ...
    v.update(path, {"status": Status.QUEUED})  # ... so opus must be able to write it
    assert path.read_text() == (
        f"---\n{person}status: queued\nupdated_at: 2026-11-21T10:30:00\n---\nbody\n"
    )


# --- values PyYAML's constructors reject with errors other than YAMLError ---------------------


def test_an_impossible_date_in_one_note_does_not_break_the_scan(v: Vault) -> None:
    note(v, "good.md", "---\nid: FR-1\n---\n")
    bad = note(v, "bad.md", "---\nid: 2024-02-30\n---\n")
    before = bad.read_bytes()
    scan = v.scan()
    assert list(scan.frs) == ["FR-1"]
    assert [p.path for p in scan.problems] == [bad]
    assert bad.read_bytes() == before


@pytest.mark.parametrize(
    "person", ["created: 2024-13-45\n", "due: 2024-01-01 25:00:00\n", "x: !!int abc\n"]
)
def test_a_bad_typed_value_in_a_persons_key_is_a_note_error(v: Vault, person: str) -> None:
    path = note(v, "FR-1.md", f"---\n{person}---\nbody\n")
    before = path.read_bytes()
    try:
        v.update(path, {"status": Status.QUEUED})
    except NoteError:
        pass
    assert path.read_bytes() == before or b"status: queued" in path.read_bytes()


@pytest.mark.parametrize("person", ["created: 2024-13-45\n", "x: !custom tag\n"])
def test_a_note_the_scan_serves_can_be_written_or_is_a_problem(v: Vault, person: str) -> None:
    path = note(v, "FR-1.md", f"---\n{person}---\nbody\n")
    scan = v.scan()
    if "FR-1" in scan.frs:
        v.update(path, {"status": Status.QUEUED})
        assert b"status: queued" in path.read_bytes()
    else:
        assert [p.path for p in scan.problems] == [path]


# --- fences with trailing spaces --------------------------------------------------------------


def test_an_opening_fence_with_trailing_spaces_still_opens_frontmatter(v: Vault) -> None:
    path = note(v, "export.md", "---  \nid: FR-7\nstatus: paused\n---\nbody\n")
    fr = v.read(path)
    assert (fr.id, fr.status) == ("FR-7", Status.PAUSED)
    v.update(path, {"job_id": "j-1"})
    assert path.read_text().count("---") == 2  # no second block on top


def test_a_closing_fence_with_trailing_spaces_still_closes_frontmatter(v: Vault) -> None:
    path = note(v, "export.md", "---\nid: FR-7\n---  \nbody\n")
    assert v.read(path).id == "FR-7"
    v.update(path, {"status": Status.QUEUED})
    assert path.read_text() == (
        "---\nid: FR-7\nstatus: queued\nupdated_at: 2026-11-21T10:30:00\n---  \nbody\n"
    )


# --- depends_on written as one unquoted wiki-link ---------------------------------------------


def test_depends_on_as_one_unquoted_wikilink(v: Vault) -> None:
    fr = v.read(note(v, "FR-9.md", "---\ndepends_on: [[FR-100]]\n---\n"))
    assert fr.invalid is None
    assert fr.depends_on == ("FR-100",)


def test_depends_on_a_notes_name_title_or_alias_is_its_id(v: Vault) -> None:
    """Obsidian links a note by its file name: ``[[login]]`` for ``login.md``, whose ``id``
    is FR-1 (it read as an FR "login" that is not in the vault, and waited for ever)."""
    note(v, "login.md", "---\nid: FR-1\ntitle: Login page\naliases: [sign-in]\n---\n")
    note(v, "a.md", "---\nid: FR-2\ndepends_on: [[login]]\n---\n")
    note(v, "b.md", '---\nid: FR-3\ndepends_on: ["[[login|the login]]", "login page"]\n---\n')
    note(v, "c.md", "---\nid: FR-4\ndepends_on: [Sign-In, FR-99]\n---\n")
    frs = v.scan().frs
    assert frs["FR-2"].depends_on == ("FR-1",)
    assert frs["FR-3"].depends_on == ("FR-1", "FR-1")
    assert frs["FR-4"].depends_on == ("FR-1", "FR-99")  # an unknown id stays as written


# --- an id names files: never a path ------------------------------------------------------


@pytest.mark.parametrize("value", ["Weird/Id:*?", "..", "back\\\\slash", '"tab\\there"'])
def test_an_id_that_would_be_a_path_is_an_input_error_naming_it(v: Vault, value: str) -> None:
    text = f"---\nid: {value}\n---\nbody\n"
    path = note(v, "FR-1.md", text)
    scan = v.scan()
    assert scan.frs == {}
    (problem,) = scan.problems
    assert problem.path == path and "id" in problem.message and "slash" in problem.message
    assert path.read_text() == text  # left as the person wrote it


# --- duplicate ids: a person's copy must not take the FR over ---------------------------------


def test_a_copy_of_a_served_note_does_not_take_its_id_over(v: Vault) -> None:
    text = "---\nid: FR-101\nstatus: in-progress\njob_id: j-1\n---\nbody\n"
    original = note(v, "FR-101.md", text)
    assert v.scan().frs["FR-101"].path == original
    copy = note(v, "FR-101 1.md", text)  # Obsidian's "Make a copy"
    scan = v.scan()
    assert scan.frs["FR-101"].path == original
    assert scan.problems == [NoteProblem(copy, "duplicate id FR-101, also in FR-101.md")]


# --- own writes: the hash is known only after the file already holds the new bytes ------------


def test_own_write_is_recognised_as_soon_as_the_note_holds_it(
    v: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = note(v, "FR-1.md", "---\nid: FR-1\n---\nbody\n")
    seen: list[tuple[bytes, bool]] = []
    real_replace = os.replace

    def replace(src: str, dst: str | Path) -> None:
        real_replace(src, dst)
        if Path(dst) == path:  # right after the rename: what the watcher would see
            seen.append((path.read_bytes(), v.is_own_write(path)))

    monkeypatch.setattr(os, "replace", replace)
    v.update(path, {"status": Status.QUEUED})
    assert seen
    data, own = seen[0]
    assert b"status: queued" in data
    assert own

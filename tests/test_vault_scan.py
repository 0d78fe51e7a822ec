"""The cold scan's shortcuts (SPEC §12 figure 3) keep every validity rule of SPEC §2: the scan
serves exactly what reading each note alone serves, names the same broken notes, and its
cache and the garbage collector are left as a scan without shortcuts would leave them."""

from __future__ import annotations

import gc
import os
import shutil
import threading
from pathlib import Path

import pytest

from opus.orchestrator import vault as vault_module
from opus.orchestrator.config import Config, parse_config
from opus.orchestrator.errors import NoteError
from opus.orchestrator.frontmatter import read_meta, read_note
from opus.orchestrator.vault import Vault, to_feature_request

GOLDEN = Path(__file__).parent / "golden" / "notes"
REPOS = ("app", "web")


@pytest.fixture
def config(tmp_path: Path) -> Config:
    root = tmp_path / "vault"
    (root / "10_features" / "03_planned").mkdir(parents=True)
    data = {"repos": {name: {"path": f"../{name}"} for name in REPOS}}
    return parse_config(data, root / "opus.toml")


@pytest.fixture
def v(config: Config) -> Vault:
    return Vault(config)


def put(v: Vault, name: str, data: bytes) -> Path:
    path = v.planned_dir / name
    path.write_bytes(data)
    return path


ODD_NOTES: dict[str, bytes] = {
    # notes whose frontmatter looks unusual to the shortcuts and still is an FR
    "crlf.md": b"---\r\nid: FR-1\r\nstatus: Queued\r\npriority: P1\r\n---\r\n# T\r\n",
    "bom.md": b"\xef\xbb\xbf---\nid: FR-2\nrepo: web\n---\nbody\n",
    "quoted-keys.md": b"---\n\"id\": FR-3\n'status': done\n---\n",
    "flow-map.md": b"---\n{id: FR-4, priority: high, depends_on: [FR-1]}\n---\n",
    "tabs.md": b"---\nid:\tFR-5\ntitle:\tTabbed\n---\n",
    "dots-close.md": b"---\nid: FR-6\n...\nbody\n",
    "fence-spaces.md": b"---  \nid: FR-7\n---\t\nbody\n",
    "block-scalar.md": b"---\nid: FR-8\nfeedback: |\n  two\n  lines\n---\n",
    "anchors.md": b"---\nid: &i FR-9\naliases: [*i, nine]\n---\n",
    "numbers.md": b"---\nid: 10\npriority: 0\niteration: 2\nplan_approval: yes\n---\n",
    "escapes.md": b'---\nid: "FR-\\u0031\\u0031"\ntitle: "a\\tb"\n---\n',
    "unicode.md": "---\nid: FR-12\ntitle: Café ☕\nstatus: in-progress\n---\n".encode(),
    "comment-close.md": b"---\nid: FR-13 # the id\n# ---\nstage: coder\n---\n",
    "no-frontmatter.md": b"# Only a heading\n\nbody\n",
    "rule.md": b"---\njust prose between rules\n---\nbody\n",
    "empty.md": b"",
    "bad-values.md": b"---\nid: FR-14\npriority: urgent\nrepo: ../etc\napproval: maybe\n---\n",
}
BROKEN_NOTES: dict[str, bytes] = {
    "bad-date.md": b"---\nid: FR-20\ncreated: 2026-02-30\n---\n",
    "bad-date-in-list.md": b"---\nid: FR-21\ndepends_on: [FR-1, 2026-02-30]\n---\n",
    "duplicate.md": b"---\nid: FR-22\nid: FR-23\n---\n",
    "duplicate-quoted.md": b'---\nid: FR-24\n"id": FR-25\n---\n',
    "unclosed.md": b"---\nid: FR-26\n",
    "binary.md": b"---\nid: FR-27\n---\n\x00",
    "latin1.md": b"---\ntitle: caf\xe9\n---\n",
    "list.md": b"---\n- id\n---\n",
    "bad-id.md": b"---\nid: [a, b]\n---\n",
    "unclosed-quote.md": b'---\nid: "FR-28\n---\n',
}


def test_the_scan_serves_what_reading_each_note_alone_serves(v: Vault) -> None:
    for source in sorted(GOLDEN.glob("*.md")):
        shutil.copy(source, v.planned_dir / source.name)
    for name, data in {**ODD_NOTES, **BROKEN_NOTES}.items():
        put(v, name, data)
    scan = v.scan()
    served = {fr.path.name: fr for fr in scan.frs.values()}
    problems = {p.path.name: p.message for p in scan.problems}
    for path in sorted(v.planned_dir.iterdir()):
        try:
            alone = to_feature_request(read_note(path), repos=REPOS)
        except NoteError as e:
            assert problems.get(path.name) == e.problem, path.name
            assert path.name not in served
            continue
        assert served.get(path.name) == alone, path.name
    assert set(problems) == set(BROKEN_NOTES)
    assert {n for n in ODD_NOTES if n in served} == set(ODD_NOTES)
    assert served["quoted-keys.md"].id == "FR-3"
    assert served["flow-map.md"].depends_on == ("FR-1",)
    assert served["bad-values.md"].invalid is not None


def test_read_meta_reads_what_read_note_reads(tmp_path: Path) -> None:
    notes = {p.name: p.read_bytes() for p in GOLDEN.glob("*.md")} | ODD_NOTES | BROKEN_NOTES
    for name, data in notes.items():
        path = tmp_path / name
        path.write_bytes(data)
        try:
            note = read_note(path)
        except NoteError as e:
            with pytest.raises(NoteError) as raised:
                read_meta(str(path))
            assert (raised.value.path, raised.value.problem) == (path, e.problem)
            continue
        assert read_meta(str(path)) == (note.meta, note.body, note.stat_key)


def test_a_new_note_opus_cannot_read_is_named_once_and_not_reparsed(v: Vault) -> None:
    target = put(v, "target.txt", b"---\nid: T\n---\n")
    (v.planned_dir / "link.md").symlink_to(target)
    os.mkfifo(v.planned_dir / "pipe.md")
    broken = put(v, "broken.md", b"---\nid: [\n---\n")
    before = broken.read_bytes()
    first = v.scan()
    assert [(p.path.name, p.message) for p in first.problems] == [
        ("broken.md", first.problems[0].message),
        ("link.md", "is a symlink (opus does not follow links)"),
        ("pipe.md", "not a regular file"),
    ]
    assert v.parses == 3
    second = v.scan()
    assert v.parses == 3  # the keys of unreadable notes are their listing's keys
    assert second.problems == first.problems
    assert broken.read_bytes() == before


def test_a_note_gone_between_listing_and_reading_is_neither_fr_nor_problem(
    v: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(v, "stays.md", b"---\nid: S\n---\n")
    gone = put(v, "gone.md", b"---\nid: G\n---\n")
    real = vault_module.read_meta

    def delete_first(path: str) -> object:
        if path.endswith("gone.md"):
            gone.unlink()  # a person deletes the note while the scan runs
        return real(path)

    monkeypatch.setattr(vault_module, "read_meta", delete_first)
    scan = v.scan()
    assert list(scan.frs) == ["S"]
    assert scan.problems == []


def test_a_scan_leaves_the_collector_as_it_found_it(v: Vault) -> None:
    put(v, "a.md", b"---\nid: A\n---\n")
    assert gc.isenabled()
    v.scan()
    assert gc.isenabled()
    gc.disable()
    try:
        v.scan()
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


def test_concurrent_scans_turn_the_collector_back_on_after_the_last(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    vaults = [Vault(config) for _ in range(2)]
    put(vaults[0], "a.md", b"---\nid: A\n---\n")
    inside = threading.Barrier(2)
    real = vault_module.read_meta
    states: list[bool] = []

    def meet(path: str) -> object:
        inside.wait(timeout=10)  # both scans are inside their pause here
        states.append(gc.isenabled())
        inside.wait(timeout=10)
        return real(path)

    monkeypatch.setattr(vault_module, "read_meta", meet)
    threads = [threading.Thread(target=vault.scan) for vault in vaults]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert states == [False, False]
    assert gc.isenabled()


def test_an_interrupted_scan_still_turns_the_collector_back_on(
    v: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(v, "a.md", b"---\nid: A\n---\n")

    def interrupt(path: str) -> object:
        raise KeyboardInterrupt  # Ctrl-C while a note is read: not one bad note

    monkeypatch.setattr(vault_module, "read_meta", interrupt)
    with pytest.raises(KeyboardInterrupt):
        v.scan()
    assert gc.isenabled()

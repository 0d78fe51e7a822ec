"""The plain-frontmatter fast path reads exactly what PyYAML reads, or declines."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml

from opus.orchestrator.frontmatter import _FastLoader, read_note
from opus.orchestrator.plain_yaml import parse_plain

GOLDEN = Path(__file__).parent / "golden" / "notes"

VALUES = [
    "done", "FR-101", "high", "P0", "0", "3", "-1", "1_000", "0x1F", "0o17", "017", "1.5",
    "1e3", ".inf", "-.inf", ".nan", "yes", "No", "on", "OFF", "true", "False", "null", "~",
    "Null", "2026-11-21", "2026-11-21T10:30:00", "2026-11-21 10:30:00", "2026-02-30",
    "10:30", "1:20:30", "a b  c", "a: b", "a:b", "a #b", "a#b", "trailing:", "it's",
    'say "hi"', '"quoted"', "'single'", '"a #b"', "'a''b'", '"a\\tb"', '""', "''", '"x" y',
    "[a, b]", "{a: 1}", "a, b", "&anchor x", "*alias", "!tag x", "|", ">", "%x", "@x", "`x",
    "- a", "-a", "?x", "? x", ":x", "[[Note]]", '"[[Note]]"', "#c", "<<", "=", "x\ty",
    "[FR-1]", "[FR-1, FR-2]", "[]", "[ ]", "[a,]", "[a, [b]]", "[a: 1]", "['x', \"y\"]",
    "[1, yes, ~]", "[a b, c]", "[a] b", "[a #b]", "[?x]", "[a,,b]",
    "ünïcode", "a\u2028b", "a\x85b", "a\x07b", "...", "---x",
]  # fmt: skip
KEYS = ["id", "status", "due_date", "my-key", "yes", "null", "On", "2x", "_x", "key x", "ké"]
COMMENTS = ["", " # note", "  #x", "#x"]


def pyyaml(text: str) -> Any:
    try:
        data = yaml.load(text, Loader=_FastLoader)
    except (yaml.YAMLError, ValueError, TypeError):
        return "error"
    return {} if data is None else data


def agrees(text: str) -> bool:
    fast = parse_plain(text)
    if fast is None:
        return True
    full = pyyaml(text)
    assert full != "error", f"fast path accepted what PyYAML rejects: {text!r}"
    if isinstance(full, dict):
        full = {str(k): v for k, v in full.items()}
    same = fast == full or (repr(fast) == repr(full))  # nan != nan
    assert same, f"{text!r}: fast {fast!r} != PyYAML {full!r}"
    return True


@pytest.mark.parametrize("value", VALUES)
def test_scalar_values_agree_with_pyyaml(value: str) -> None:
    for comment in COMMENTS:
        agrees(f"k: {value}{comment}\n")
        agrees(f"a: 1\nk: {value}{comment}\nz: 2\n")


def test_keys_agree_with_pyyaml() -> None:
    for key in KEYS:
        agrees(f"{key}: v\n")
        agrees(f"{key}:\n")


def test_lists_agree_with_pyyaml() -> None:
    for indent, value, comment in itertools.product(["", "  ", "    "], VALUES, COMMENTS):
        agrees(f"tags:\n{indent}- {value}{comment}\n{indent}- b\nnext: 1\n")
    for text in [
        "tags:\n  - a\n - b\n",  # uneven indent
        "tags:\n  - a\n  # a comment\n  - b\n",
        "tags:\n  -\n  - b\n",
        "tags:\n  - # c\n",
        "tags:\n  - a\n    b\n",  # continuation
        "tags:\n  - - a\n",
        "tags:\n  - a: 1\n",
        "k: v\n  - a\n",
        "- a\n- b\n",
        "tags: # c\n  - a\n",
        "k:\n  nested: 1\n",
        "k: a\n  b\n",
        "k: v\nk: w\n",
        "k: v\r\nl: w\r\n",
        "k: v\rl: w\n",
        "   \n# only a comment\n",
        "k: 'a\n  b'\n",
    ]:
        agrees(text)


def test_fast_path_takes_common_frontmatter() -> None:
    text = (
        "id: FR-00000\n"
        'title: "Refund cache for the upload webhook"\n'
        "priority: high   # agreed in planning\n"
        "tags:\n  - invoice\n  - filter\n"
        "estimate: 5\n# estimate in ideal days\n"
        'owner: "[[Dev Patel]]"\n'
        "status: done\n"
        "updated_at: 2026-06-29T10:30:00\n"
    )
    fast = parse_plain(text)
    assert fast is not None
    assert fast == pyyaml(text)
    assert parse_plain(text.replace("\n", "\r\n")) == fast


def test_duplicates_and_broken_lines_go_to_pyyaml() -> None:
    assert parse_plain("id: a\nid: b\n") is None
    assert parse_plain("k: [a\n") is None
    assert parse_plain("k: a: b\n") is None


@pytest.mark.parametrize("note", sorted(GOLDEN.glob("*.md")), ids=lambda p: p.name)
def test_golden_notes_read_the_same(note: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        fast = read_note(note).meta
    except Exception as e:  # the golden corpus has broken notes too: same error both ways
        fast = type(e).__name__ + str(e)
    import opus.orchestrator.frontmatter as fm

    monkeypatch.setattr(fm, "parse_plain", lambda text: None)
    try:
        slow = read_note(note).meta
    except Exception as e:
        slow = type(e).__name__ + str(e)
    assert repr(fast) == repr(slow)


# --- the scan's shortcuts: each reads what PyYAML reads, or leaves the line to the general path


WORDS = [
    "FR-101", "fr_2", "a/b.c", "v1.2", "x-", "_x", "Ana Silva", "a b c", "a  b", "a - b",
    "5", "05", "0o7", "0x1F", "1_000", "1.5", "1e3", "1:20", "2026-11-21", "2026-02-30",
    "2026-11-21T10:30:00", "20260101-000000-fr-00001-0001", "12abc", "3 apples",
    "yes", "Yes", "YES", "yEs", "no", "No", "n", "N", "y", "Y", "on", "On", "oN", "off",
    "Off", "true", "True", "tRUE", "false", "FALSE", "null", "Null", "nULL", "NULL", "none",
    "nan", "inf", "yess", "nul", "o", "O", "t", "T", "f", "F", "ON", "OFF", "OFFx", "Nope",
]  # fmt: skip
SHAPES = [
    "k: {w}", "k:  {w}", "k: {w}  ", "k: {w}\r", "k: {w} # c", 'k: "{w}"', 'k: "{w}" ',
    "k: '{w}'", "k: [{w}]", "k: [{w}, b]", "k: [a,{w}]", "k: [a,  {w}]", "k: [ {w}]",
    "k: [{w} ]", "k: [{w},]", "{w}: v", "{w}: [{w}]",
]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
def test_simple_lines_agree_with_pyyaml(shape: str) -> None:
    for word in WORDS:
        line = shape.format(w=word)
        nl = "\n" if line.endswith("\r") else "\r\n" if "\r" in line else "\n"
        agrees(f"{line}{nl}")
        agrees(f"a: 1{nl}{line}{nl}tags:{nl}  - {word}{nl}")


def test_quoted_shortcut_keeps_everything_inside_the_quotes() -> None:
    for inner in ["", " ", "a: b", "a, b", "[x]", "{x}", "it's", "- x", "@x", "  two  ", "ü"]:
        agrees(f'k: "{inner}"\n')
        assert parse_plain(f'title: "{inner}"\n') in ({"title": inner}, None)
    assert parse_plain('title: "a: b"\n') == {"title": "a: b"}


def test_word_tables_agree_with_the_resolvers() -> None:
    from opus.orchestrator.plain_yaml import _RESOLVERS, _WORD_TAGS, _scalar_kind

    assert set(_WORD_TAGS) == set("yYnNtTfFoO")  # PyYAML's bool and null words
    spellings = {w for word in WORDS for w in (word, word.lower(), word.upper(), word.title())}
    spellings |= {w + s for w in list(spellings) for s in ("", "x", " ", ".")}
    for word in sorted(spellings):
        regexp_tag = next((tag for tag, rx in _RESOLVERS.get(word[:1], ()) if rx.match(word)), None)
        try:
            kind = _scalar_kind(word)
        except Exception:
            kind = "declined"
        expected = None if regexp_tag in (None, "tag:yaml.org,2002:str") else regexp_tag
        assert kind == expected or kind == "declined", word


def test_unsafe_text_check_agrees_with_its_regexp() -> None:
    from opus.orchestrator.plain_yaml import _UNSAFE, _unsafe

    chars = [chr(c) for c in range(0x100)] + ["\u2028", "\u2029", "\ufeff", "\ud7ff", "é"]
    for c in chars:
        for text in (f"k: a{c}b\n", c, f"{c}é"):
            assert _unsafe(text) == bool(_UNSAFE.search(text)), repr(text)


def test_shortcut_lines_are_read_without_pyyaml() -> None:
    text = (
        "id: FR-00001\r\n"
        'title: "Export: the CSV, [fast]"\r\n'
        "job_id: 20260101-000000-fr-00001-0001\r\n"
        "depends_on: [FR-00000, FR-7]\r\n"
        "estimate: 5\r\n"
        "created: 2026-01-02\r\n"
        "flag: yes\r\n"
    )
    fast = parse_plain(text)
    assert fast == pyyaml(text)
    assert fast is not None and fast["depends_on"] == ["FR-00000", "FR-7"]
    assert fast["estimate"] == 5 and fast["flag"] is True
    assert parse_plain("created: 2026-02-30\n") is None  # PyYAML's error, not the shortcut's
    assert parse_plain("depends_on: [FR-1, 2026-02-30]\n") is None

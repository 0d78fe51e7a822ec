"""A fast path for the plain frontmatter most notes have, before PyYAML (SPEC §12 scan).

Most notes' frontmatter is a flat block of ``key: value`` lines, block lists (and one-line
``[a, b]`` lists) of plain or simply quoted items, and comments. :func:`parse_plain` reads
exactly that subset, line by line, and returns what PyYAML's safe loader would build from
it — the same keys, the same values with the same implicit types (int, float, bool, null,
timestamp), resolved by PyYAML's own resolvers and constructors. Anything outside the
subset (nested mappings, flow mappings, nested flow lists, block scalars, multi-line plain
scalars, anchors, aliases, tags, escapes, tabs, duplicate keys, non-string keys, ``key:value``
without a space, …) returns None and the caller parses the block with PyYAML, so every
validity rule and error message stays PyYAML's.

The subset is chosen so that each accepted line has one reading in YAML 1.1; a test compares
this parser with PyYAML on the golden corpus and on generated lines. Lines are memoized by
their text; the lines a memo cannot answer (an id, a title, a list of ids) mostly take one
regexp (``_SIMPLE``), each word still typed by PyYAML's resolvers.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

try:
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

__all__ = ("forget", "parse_plain")

_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*):(?: +(.*))?")
_WORD = r"[A-Za-z0-9_][A-Za-z0-9_./-]*"
_SIMPLE = re.compile(
    rf'([A-Za-z_][A-Za-z0-9_-]*): +(?:"([^"#]*)"|({_WORD}(?: [A-Za-z0-9_./-]+)*)'
    rf"|\[({_WORD}(?:, *{_WORD})*)\]) *\r?"
)
"""The lines most notes have that the memo cannot answer (an id, a title, a list of ids):
``key: "text"``, ``key: words`` and ``key: [word, word]``, read at once when every word is
a string to PyYAML (else the general path reads the line)."""
_ITEM = re.compile(r"( *)-(?: +(.*))?")
_INDICATORS = frozenset("-?:,[]{}#&*!|>'\"%@`")
_TAG = "tag:yaml.org,2002:"
_STR = _TAG + "str"
_CONSTRUCTED = frozenset(_TAG + t for t in ("int", "float", "bool", "null", "timestamp"))
_RESOLVERS = _Loader.yaml_implicit_resolvers
_constructor = _Loader("")
_MEMO: dict[str, Any] = {}
_MEMO_MAX = 20_000
_UNSAFE = re.compile(
    r"[^\n\r\x20-\x5b\x5d-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd"
    r"\U00010000-\U0010ffff]"
)
"""Tabs, backslashes (escapes), control characters, NEL, BOM and the Unicode line breaks."""
_SAFE_ASCII = bytes(range(0x20, 0x7F)).replace(b"\\", b"") + b"\n\r"
"""The ASCII characters ``_UNSAFE`` does not match."""


class _Decline(Exception):
    """Not in the subset: PyYAML decides."""


def parse_plain(text: str) -> dict[str, Any] | None:
    """The mapping PyYAML would build from ``text``, or None when it is not plain."""
    if _unsafe(text) or ("\r" in text and text.count("\r") != text.count("\r\n")):
        return None
    out: dict[str, Any] = {}
    key: str | None = None  # the key whose value is still open (empty so far)
    items: list[Any] | None = None
    indent = -1
    memo = _LINES
    for line in text.split("\n"):
        parsed = memo.get(line)
        if parsed is None:
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            parsed = memo[line] = _line(line)
        kind, first, value = parsed  # first: the key, or an item's indent
        if kind <= _KEY_LIST:  # _KEY_VALUE or _KEY_LIST
            if first in out:
                return None  # a duplicate key: PyYAML's error
            out[first] = value if kind == _KEY_VALUE else list(value)
            key = None
        elif kind == _SKIP:
            continue
        elif kind == _KEY_OPEN:
            if first in out:
                return None
            out[first], key, items = None, first, None
        elif kind >= _ITEM_VALUE and key is not None:
            if items is None:
                items = out[key] = []
                indent = first
            elif first != indent:
                return None
            items.append(value if kind == _ITEM_VALUE else list(value))
        else:
            return None
    return out


def _unsafe(text: str) -> bool:
    """Whether ``_UNSAFE`` matches in ``text``; for ASCII text (most notes) by deleting the
    safe bytes, ten times faster than the regexp's search."""
    if text.isascii():
        return bool(text.encode("ascii").translate(None, _SAFE_ASCII))
    return _UNSAFE.search(text) is not None


_KEY_VALUE, _KEY_LIST, _SKIP, _KEY_OPEN, _DECLINE, _ITEM_VALUE, _ITEM_LIST = range(7)
"""What a line is: ``key: value``, ``key: [a, b]``, blank or a comment, ``key:`` (null,
unless list items follow), outside the subset, ``- value`` (``-`` alone: None), ``- [a, b]``."""
_SKIPPED, _DECLINED = (_SKIP, None, None), (_DECLINE, None, None)
_OPEN = object()
"""A key or item with nothing after it."""
_LINES: dict[str, tuple[Any, ...]] = {}
"""Parsed lines by their text: most lines (statuses, priorities, tags) repeat across notes.
Values in it are immutable (a flow list is kept as a tuple and copied out)."""
_KEYS: dict[str, bool] = {}
"""Whether PyYAML reads a key as a string (``yes`` and ``null`` it does not), by key."""


def forget() -> None:
    """Empty the memos (what a new process starts with; benchmarks measure cold scans so)."""
    _LINES.clear()
    _KEYS.clear()
    _MEMO.clear()


def _line(line: str) -> tuple[Any, ...]:
    """One line as (kind, key or indent, value); (kind, None, None) for a skipped or
    declined line."""
    simple = _SIMPLE.fullmatch(line)
    if simple is not None:
        name, quoted, word, listed = simple.groups()
        if _plain_key(name):
            if quoted is not None:
                return (_KEY_VALUE, name, quoted)
            try:
                if word is not None:
                    return (_KEY_VALUE, name, _word(word))
                return (_KEY_LIST, name, tuple(_word(w.strip(" ")) for w in listed.split(",")))
            except _Decline:
                pass  # an impossible date: the general path declines it too
    line = line.removesuffix("\r").rstrip(" ")
    stripped = line.lstrip(" ")
    if not stripped or stripped[0] == "#":
        return _SKIPPED
    try:
        if line[0] != " " and not line.startswith("- ") and line != "-":
            m = _KEY.fullmatch(line)
            if m is None:
                return _DECLINED
            name = m.group(1)
            if not _plain_key(name):
                return _DECLINED  # a key PyYAML reads as bool or null
            value = _value(m.group(2))
            if value is _OPEN:
                return (_KEY_OPEN, name, None)
            if type(value) is list:
                return (_KEY_LIST, name, tuple(value))
            return (_KEY_VALUE, name, value)
        m = _ITEM.fullmatch(line)
        if m is None:
            return _DECLINED
        value = _value(m.group(2))
        if value is _OPEN:
            return (_ITEM_VALUE, len(m.group(1)), None)
        if type(value) is list:
            return (_ITEM_LIST, len(m.group(1)), tuple(value))
        return (_ITEM_VALUE, len(m.group(1)), value)
    except _Decline:
        return _DECLINED


def _plain_key(name: str) -> bool:
    """Whether PyYAML reads the key as a string; memoized (keys repeat across notes)."""
    plain = _KEYS.get(name)
    if plain is None:
        if len(_KEYS) >= _MEMO_MAX:
            _KEYS.clear()
        plain = _KEYS[name] = _scalar_kind(name) is None
    return plain


def _word(word: str) -> Any:
    """What PyYAML reads from a plain word (``_SIMPLE``'s: no indicator can start it)."""
    kind = _scalar_kind(word)
    return word if kind is None else _construct(word, kind)


def _value(raw: str | None) -> Any:
    if raw is None or raw.startswith("#"):
        return _OPEN
    comment = raw.find(" #")  # no tabs here: parse_plain declines them
    if comment >= 0:
        raw = raw[:comment]
    raw = raw.rstrip(" ")
    if not raw:
        return _OPEN
    first = raw[0]
    if first == "[" and raw[-1] == "]":
        return _flow_list(raw[1:-1])
    return _scalar(raw)


def _flow_list(inner: str) -> list[Any]:
    """``[a, b]``: plain or simply quoted items, nothing nested."""
    if not inner.strip(" "):
        return []
    items = []
    for part in inner.split(","):
        item = part.strip(" ")
        if not item or any(c in item for c in "[]{}"):
            raise _Decline
        items.append(_scalar(item))
    return items


def _scalar(raw: str) -> Any:
    first = raw[0]
    if first == '"' or first == "'":
        if len(raw) < 2 or raw[-1] != first or first in raw[1:-1]:
            raise _Decline
        return raw[1:-1]
    if first in _INDICATORS or ": " in raw or raw.endswith(":"):
        raise _Decline
    if raw.startswith(("---", "...")):
        raise _Decline
    kind = _scalar_kind(raw)
    if kind is None:
        return raw
    return _construct(raw, kind)


def _scalar_kind(value: str) -> str | None:
    """The implicit tag PyYAML resolves a plain scalar to, None for a string."""
    words = _WORD_TAGS.get(value[:1])
    if words is not None:
        tag = words.get(value)
        if tag is None:
            return None
    else:
        tag = None
        for resolved, regexp in _RESOLVERS.get(value[:1], ()):
            if regexp.match(value):
                tag = resolved
                break
        if tag is None:
            return None
    if tag == _STR:
        return None
    if tag not in _CONSTRUCTED:
        raise _Decline  # merge keys, `=` values: PyYAML's own path
    return str(tag)


def _literal_words(regexp: re.Pattern[str]) -> frozenset[str] | None:
    """The words ``regexp`` matches when it is ``^(?:word|word|…)$``, else None."""
    pattern = re.sub(r"\s+", "", regexp.pattern) if regexp.flags & re.VERBOSE else regexp.pattern
    if not (pattern.startswith("^(?:") and pattern.endswith(")$")):
        return None
    words = pattern[4:-2].split("|")
    if not all(re.fullmatch(r"[A-Za-z~]*", word) for word in words):
        return None
    return frozenset(words)


def _word_tables() -> dict[str, dict[str, str]]:
    """For each first letter whose resolvers are all word lists (bool and null): the tag of
    each word, the first resolver's as in PyYAML (a dict lookup instead of regexps)."""
    tables: dict[str, dict[str, str]] = {}
    for first, resolvers in _RESOLVERS.items():
        if first is None or not first.isalpha():
            continue
        table: dict[str, str] = {}
        for tag, regexp in resolvers:
            words = _literal_words(regexp)
            if words is None:
                break
            for word in sorted(words):
                if word.startswith(first):
                    table.setdefault(word, tag)
        else:
            tables[first] = table
    return tables


_WORD_TAGS = _word_tables()


def _construct(raw: str, tag: str) -> Any:
    """PyYAML's constructor for the tag; memoized (ints, floats, bools, None, dates and
    datetimes are immutable, and values like dates and priorities repeat across notes)."""
    if raw in _MEMO:
        return _MEMO[raw]
    try:
        value = _constructor.yaml_constructors[tag](_constructor, yaml.ScalarNode(tag, raw))
    except (ValueError, yaml.YAMLError):
        raise _Decline from None  # an impossible date: PyYAML's error message
    if len(_MEMO) >= _MEMO_MAX:
        _MEMO.clear()
    _MEMO[raw] = value
    return value

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
this parser with PyYAML on the golden corpus and on generated lines.
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
_ITEM = re.compile(r"( *)-(?: +(.*))?")
_COMMENT = re.compile(r"[ \t]+#")
_INDICATORS = frozenset("-?:,[]{}#&*!|>'\"%@`")
_TAG = "tag:yaml.org,2002:"
_STR = _TAG + "str"
_CONSTRUCTED = frozenset(_TAG + t for t in ("int", "float", "bool", "null", "timestamp"))
_RESOLVERS = _Loader.yaml_implicit_resolvers
_constructor = _Loader("")
_MEMO: dict[str, Any] = {}
_MEMO_MAX = 20_000
_UNSAFE = re.compile(
    r"[^\n\r\x20-\x5b\x5d-\x7e\xa0-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]"
    r"|[\u2028\u2029]"
)
"""Tabs, backslashes (escapes), control characters, NEL, BOM and the Unicode line breaks."""


class _Decline(Exception):
    """Not in the subset: PyYAML decides."""


def parse_plain(text: str) -> dict[str, Any] | None:
    """The mapping PyYAML would build from ``text``, or None when it is not plain."""
    if _UNSAFE.search(text) or text.count("\r") != text.count("\r\n"):
        return None
    out: dict[str, Any] = {}
    key: str | None = None  # the key whose value is still open (empty so far)
    items: list[Any] | None = None
    indent = -1
    memo = _LINES
    for line in text.split("\n"):
        parsed = memo.get(line)
        if parsed is None:
            parsed = _line(line)
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            memo[line] = parsed
        kind = parsed[0]
        if kind is _SKIP:
            continue
        if kind is _KEY_LINE:
            name, value = parsed[1], parsed[2]
            if name in out:
                return None  # a duplicate key: PyYAML's error
            if value is _OPEN:
                out[name], key, items = None, name, None
            else:
                out[name], key = (list(value) if type(value) is tuple else value), None
            continue
        if kind is _ITEM_LINE and key is not None:
            if items is None:
                items, indent = [], parsed[1]
                out[key] = items
            elif parsed[1] != indent:
                return None
            value = parsed[2]
            items.append(None if value is _OPEN else list(value) if type(value) is tuple else value)
            continue
        return None
    return out


_OPEN = object()
"""A key with nothing after it (null, unless list items follow)."""
_SKIP, _KEY_LINE, _ITEM_LINE, _DECLINE = object(), object(), object(), object()
_LINES: dict[str, tuple[Any, ...]] = {}
"""Parsed lines by their text: most lines (statuses, priorities, tags) repeat across notes.
Values in it are immutable (a flow list is kept as a tuple and copied out)."""


def forget() -> None:
    """Empty the memos (what a new process starts with; benchmarks measure cold scans so)."""
    _LINES.clear()
    _MEMO.clear()


def _line(line: str) -> tuple[Any, ...]:
    """One line: (_SKIP,), (_KEY_LINE, key, value), (_ITEM_LINE, indent, value), (_DECLINE,)."""
    line = line.removesuffix("\r").rstrip(" ")
    stripped = line.lstrip(" ")
    if not stripped or stripped.startswith("#"):
        return (_SKIP,)
    try:
        if line[0] != " " and not line.startswith("- ") and line != "-":
            m = _KEY.fullmatch(line)
            if m is None or _scalar_kind(m.group(1)) is not None:
                return (_DECLINE,)  # not a key line, or a key PyYAML reads as bool or null
            return (_KEY_LINE, m.group(1), _frozen(_value(m.group(2))))
        m = _ITEM.fullmatch(line)
        if m is None:
            return (_DECLINE,)
        return (_ITEM_LINE, len(m.group(1)), _frozen(_value(m.group(2))))
    except _Decline:
        return (_DECLINE,)


def _frozen(value: Any) -> Any:
    return tuple(value) if type(value) is list else value


def _value(raw: str | None) -> Any:
    if raw is None or raw.startswith("#"):
        return _OPEN
    comment = _COMMENT.search(raw)
    if comment is not None:
        raw = raw[: comment.start()]
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
    for tag, regexp in _RESOLVERS.get(value[:1], ()):
        if regexp.match(value):
            if tag == _STR:
                return None
            if tag not in _CONSTRUCTED:
                raise _Decline  # merge keys, `=` values: PyYAML's own path
            return str(tag)
    return None


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

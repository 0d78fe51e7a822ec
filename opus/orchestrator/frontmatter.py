"""Split a note, read its frontmatter fast, and rewrite only the keys asked for.

Reading uses PyYAML's C loader and refuses duplicate keys. Writing never re-emits a
person's YAML: each changed top-level key's lines are replaced, removed or appended
in the raw text, the new ``key: value`` rendered by ``ruamel.yaml``; a layout that
cannot be edited line by line (a flow-style or indented mapping, an alias) goes
through a ``ruamel.yaml`` round trip instead. Either way the new note must parse to
the old mapping with the changes applied, and the same body, or nothing is written.
The BOM, the line-ending style and the body are kept byte for byte.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import math
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml

if TYPE_CHECKING:
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

from .atomic import TEMP_PREFIX
from .errors import NoteError
from .plain_yaml import parse_plain

try:
    from yaml import CSafeLoader as _BaseLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _BaseLoader  # type: ignore[assignment]

__all__ = (
    "MAX_NOTE_BYTES",
    "TEMP_PREFIX",
    "Edit",
    "ParsedNote",
    "edit_note",
    "effective_changes",
    "parse_note",
    "read_meta",
    "read_note",
    "read_raw",
    "rewrite",
    "update_note",
    "write_atomic",
)

MAX_NOTE_BYTES = 1 << 20

_BOM = "\ufeff"
_CLOSE = re.compile(r"\n((?:---|\.\.\.)[ \t]*(?:\r?\n|\Z))")
"""The closing fence line, found from the newline before it (a search that skips to the
next newline, not one that tries every position as ``^`` with MULTILINE does)."""
_OPEN = re.compile(r"---[ \t]*(\r?\n)")
_STR_TAG = "tag:yaml.org,2002:str"
StatKey = tuple[int, int, int]
Changes = Mapping[str, object | None]


_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp"))


_RESOLVED: dict[tuple[str, Any], str] = {}


class _Slow(Exception):
    """The document needs PyYAML's full constructor (merge keys, custom tags, recursion)."""


#: First characters for which PyYAML's safe loader has implicit resolvers (None: any).
_RESOLVER_STARTS = frozenset(k for k in _BaseLoader.yaml_implicit_resolvers if k is not None)
assert None not in _BaseLoader.yaml_implicit_resolvers, "wildcard resolvers need the slow path"


class _FastLoader(_BaseLoader):
    """PyYAML's safe loader (C when available) that refuses duplicate mapping keys.

    Plain documents (maps, lists and the core scalar types) are built by a lean
    recursive constructor, about twice as fast as PyYAML's generic one; anything
    else falls back to it.
    """

    def resolve(self, kind: type[yaml.Node], value: Any, implicit: Any) -> str:
        """PyYAML's tag resolution: a string at once when no implicit resolver can match
        (quoted, or a first character none of them starts with), else memoized for short
        scalars (keys repeat across notes)."""
        if kind is yaml.ScalarNode and (
            not implicit[0] or (value and value[0] not in _RESOLVER_STARTS)
        ):
            return _STR_TAG
        if kind is not yaml.ScalarNode or len(value) > 64:
            return super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call,no-any-return]
        memo = (value, implicit)
        tag = _RESOLVED.get(memo)
        if tag is None:
            tag = _RESOLVED[memo] = super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]
            if len(_RESOLVED) > 50_000:
                _RESOLVED.clear()
        return tag

    def construct_document(self, node: yaml.Node) -> Any:
        try:
            return self._lean(node, set())
        except _Slow:
            return super().construct_document(node)

    def _lean(self, node: yaml.Node, active: set[int]) -> Any:
        tag = node.tag
        if isinstance(node, yaml.ScalarNode):
            if tag == _STR_TAG:
                return node.value
            if tag in _SCALAR_TAGS:
                return self.yaml_constructors[tag](self, node)
            raise _Slow
        if id(node) in active:
            raise _Slow  # a recursive alias
        active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode) and tag == _TAG + "seq":
                return [self._lean(item, active) for item in node.value]
            if not isinstance(node, yaml.MappingNode) or tag != _TAG + "map":
                raise _Slow
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _TAG + "merge":
                    raise _Slow
                key = self._lean(key_node, active)
                try:
                    if key in out:
                        self._duplicate(key_node)
                except TypeError:  # an unhashable key
                    raise _Slow from None
                out[key] = self._lean(value_node, active)
            return out
        finally:
            active.discard(id(node))

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[tuple[str, str]] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _TAG + "merge":
                if (key.tag, key.value) in seen:
                    self._duplicate(key)
                seen.add((key.tag, key.value))
        return super().construct_mapping(node, deep)

    @staticmethod
    def _duplicate(key: yaml.Node) -> None:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate key {key.value!r}", key.start_mark
        )


@dataclass(frozen=True, slots=True)
class ParsedNote:
    """A note as read: its frontmatter mapping, raw body and the hash of its bytes."""

    path: Path
    meta: dict[str, Any]
    body: str
    has_frontmatter: bool
    digest: str
    """sha256 of the file's bytes."""
    stat_key: StatKey | None = None
    """(inode, mtime_ns, size) of the file the bytes were read from."""


class Edit(NamedTuple):
    """What ``edit_note`` did: the note as read, the bytes written and the new stat."""

    note: ParsedNote
    written: bytes | None
    stat: os.stat_result | None


class _Split(NamedTuple):
    bom: str
    newline: str
    fence_open: str
    """``---`` and its line ending; empty when the note has no frontmatter."""
    yaml_text: str
    fence_close: str
    body: str
    meta: dict[str, Any]


def read_raw(path: Path | str) -> tuple[bytes, os.stat_result]:
    """A note's bytes and stat; NoteError for a symlink, a non-file or over 1 MiB."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise NoteError(path, "no such file") from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NoteError(path, "is a symlink (opus does not follow links)") from e
        raise NoteError(path, f"cannot open: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NoteError(path, "not a regular file")
        if st.st_size > MAX_NOTE_BYTES:
            raise NoteError(path, f"larger than 1 MiB ({st.st_size} bytes)")
        chunks: list[bytes] = []
        total, want = 0, st.st_size + 1
        while total <= MAX_NOTE_BYTES:
            ask = min(want, MAX_NOTE_BYTES + 1 - total)
            chunk = os.read(fd, ask)
            chunks.append(chunk)
            total += len(chunk)
            if len(chunk) < ask:  # end of a regular file
                break
            want = 1 << 16
        if total > MAX_NOTE_BYTES:
            raise NoteError(path, "larger than 1 MiB")
    finally:
        os.close(fd)
    return b"".join(chunks), st


def stat_key(st: os.stat_result) -> StatKey:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def read_note(path: Path) -> ParsedNote:
    """Read and parse a note. Raises NoteError; never changes the file."""
    raw, st = read_raw(path)
    return parse_note(path, raw, stat_key(st))


def read_meta(path: Path | str) -> tuple[dict[str, Any], str, StatKey]:
    """What a scan needs of a note: its frontmatter mapping, its body and the stat key of
    the bytes read. The same reading and the same NoteErrors as ``read_note``, without the
    digest (``path`` may be a string: a scan opens thousands of notes)."""
    raw, st = read_raw(path)
    split = _split(path, _decode(path, raw))
    return split.meta, split.body, (st.st_ino, st.st_mtime_ns, st.st_size)


def parse_note(path: Path, raw: bytes, key: StatKey | None = None) -> ParsedNote:
    """Parse a note's bytes (``path`` names it in errors). Raises NoteError."""
    split = _split(path, _decode(path, raw))
    digest = hashlib.sha256(raw).hexdigest()
    return ParsedNote(path, split.meta, split.body, bool(split.fence_open), digest, key)


def _decode(path: Path | str, raw: bytes) -> str:
    if len(raw) > MAX_NOTE_BYTES:
        raise NoteError(path, f"larger than 1 MiB ({len(raw)} bytes)")
    if b"\x00" in raw:
        raise NoteError(path, "binary file (contains NUL bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NoteError(path, f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from e


def _split(path: Path | str, text: str) -> _Split:
    bom = _BOM if text.startswith(_BOM) else ""
    rest = text[len(bom) :]
    opened = _OPEN.match(rest)
    if opened is None:
        if rest == "---":
            raise NoteError(path, "frontmatter has no closing '---' line")
        return _Split(bom, _newline_of(rest), "", "", "", rest, {})
    nl, start = opened.group(1), opened.end()
    close = _CLOSE.search(rest, start - 1)  # the opening fence's line ends at start - 1
    if close is None:
        raise NoteError(path, "frontmatter has no closing '---' line")
    yaml_text = rest[start : close.start(1)]
    meta = _load_yaml(path, yaml_text)
    if meta is None:  # prose between two rules: the note opens with a horizontal rule
        return _Split(bom, nl, "", "", "", rest, {})
    return _Split(bom, nl, rest[:start], yaml_text, close.group(1), rest[close.end() :], meta)


def _newline_of(text: str) -> str:
    i = text.find("\n")
    return "\r\n" if i > 0 and text[i - 1] == "\r" else "\n"


def _load_yaml(path: Path | str, yaml_text: str) -> dict[str, Any] | None:
    """The frontmatter mapping; None when the block is prose (a plain string)."""
    if not yaml_text.strip():
        return {}
    plain = parse_plain(yaml_text)
    if plain is not None:
        return plain
    loader = _FastLoader(yaml_text)
    try:
        data = loader.get_single_data()
    except (yaml.YAMLError, ValueError, TypeError, AttributeError) as e:
        raise NoteError(path, f"invalid YAML in frontmatter: {_yaml_problem(e)}") from e
    finally:
        loader.dispose()
    if data is None:
        return {}
    if isinstance(data, str):
        return None
    if not isinstance(data, dict):
        kind = "list" if isinstance(data, list) else type(data).__name__
        raise NoteError(path, f"frontmatter is a {kind}, not a mapping of keys")
    return {k if isinstance(k, str) else str(k): v for k, v in data.items()}


def _yaml_problem(e: Exception) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        where = f" (line {mark.line + 2} of the note)" if mark is not None else ""
        return " ".join(f"{e.problem}{where}".split())
    return " ".join(str(e).split())


# --- deciding what changes ------------------------------------------------------------------------


def _normalize(key: str, value: object) -> object:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return str(value)  # a StrEnum becomes its plain value
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone().replace(tzinfo=None)
        return value.replace(microsecond=0)
    if isinstance(value, date):
        return value
    raise TypeError(f"cannot write {type(value).__name__} to frontmatter key {key!r}")


def _same(old: object, new: object) -> bool:
    if isinstance(old, str) and isinstance(new, str):
        return old == new
    if isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new):
        return True
    return type(old) is type(new) and old == new


def effective_changes(meta: Mapping[str, Any], changes: Changes) -> dict[str, object | None]:
    """The changes (normalized) that would alter ``meta``; ``None`` deletes a key."""
    out: dict[str, object | None] = {}
    for key, value in changes.items():
        new = _normalize(key, value)
        if new is None:
            if key in meta:
                out[key] = None
        elif key not in meta or not _same(meta[key], new):
            out[key] = new
    return out


# --- rewriting ------------------------------------------------------------------------------------


def rewrite(path: Path, raw: bytes, changes: Changes) -> bytes | None:
    """The note's new bytes with ``changes`` applied; None when nothing would change."""
    split = _split(path, _decode(path, raw))
    todo = effective_changes(split.meta, changes)
    if not todo:
        return None
    expected = {k: v for k, v in split.meta.items() if k not in todo or todo[k] is not None}
    expected.update({k: v for k, v in todo.items() if v is not None})
    nl = split.newline
    heads: Iterator[str] = (
        (
            split.fence_open + new_yaml + split.fence_close
            for attempt in (_splice, _roundtrip)
            if (new_yaml := attempt(split.yaml_text, todo, nl)) is not None
        )
        if split.fence_open
        else iter([f"---{nl}{_render_lines(expected, {}, nl)}---{nl}"])
    )
    for head in heads:  # line edits first, a ruamel round trip if they cannot be verified
        new = (split.bom + head + split.body).encode("utf-8")
        if _round_trips(path, new, expected, split.body):
            return new
    raise NoteError(path, "cannot rewrite this frontmatter without changing other keys")


def _round_trips(path: Path, new: bytes, expected: Mapping[str, Any], body: str) -> bool:
    """Whether ``new`` reads back (as every reader reads it) to ``expected`` and ``body``."""
    try:
        again = _split(path, new.decode("utf-8"))
    except NoteError:
        return False
    got = again.meta
    if again.body != body or not again.fence_open or list(got) != list(expected):
        return False
    return all(_same(got[k], v) or got[k] == v for k, v in expected.items())


def _rt_yaml() -> YAML:
    """ruamel's round trip (imported on the first write: readers never need it), writing a
    datetime as ``2026-11-21T10:30:00``."""
    from ruamel.yaml import YAML

    y = YAML(typ="rt")
    y.Representer = _representer()
    y.preserve_quotes = True
    y.width = 1 << 20
    return y


@functools.cache
def _representer() -> type[RoundTripRepresenter]:
    from ruamel.yaml.representer import RoundTripRepresenter

    class Representer(RoundTripRepresenter):
        pass

    def datetime_(rep: RoundTripRepresenter, value: datetime) -> Any:
        return rep.represent_scalar("tag:yaml.org,2002:timestamp", value.isoformat())

    Representer.add_representer(datetime, datetime_)
    return Representer


def _render_lines(values: Mapping[str, object], styles: Mapping[str, str], nl: str) -> str:
    """``key: value`` lines, quoting strings PyYAML would read as something else.

    Each line is what ``ruamel.yaml`` writes for that one key. Numbers, dates, plain words
    (ids, branches, URLs) and wiki-links are written directly; any other value goes through
    ruamel, once per distinct (key, value, quoting) (cached).
    """
    lines = []
    for key, value in values.items():
        kind = type(value)
        if kind is str:
            lines.append(_string_line(key, value, styles.get(key)))
        elif (kind is int or kind is datetime or kind is date) and _SIMPLE_KEY.fullmatch(key):
            text = str(value) if kind is int else value.isoformat()  # type: ignore[attr-defined]
            lines.append(f"{key}: {text}\n")
        else:
            lines.append(_ruamel_lines({key: value}))
    return "".join(lines).replace("\n", nl)


_SIMPLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@functools.lru_cache(maxsize=4096)
def _string_line(key: str, value: str, style: str | None) -> str:
    """ruamel's line for one string value: double quotes where the person's value had them,
    single quotes where they had those or a plain scalar would read as another type."""
    plain_tag = _RESOLVER.resolve(yaml.ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
    quote = '"' if style == '"' else "'" if style == "'" or plain_tag != _STR_TAG else ""
    if value.startswith("[[") and value.endswith("]]"):
        quote = quote or '"'  # unquoted it would read as a list; Obsidian writes "[[…]]"
    if _SIMPLE_KEY.fullmatch(key) and _WIKI_LINK.fullmatch(value):
        return f"{key}: {quote}{value}{quote}\n"
    if _SIMPLE_KEY.fullmatch(key) and _PLAIN_SAFE.fullmatch(value):
        from ruamel.yaml.nodes import ScalarNode

        with _LINES_LOCK:  # ruamel reads it as YAML 1.2: `0o17` is a number there
            ruamel_tag = _lines_yaml().resolver.resolve(ScalarNode, value, (True, False))
        if ruamel_tag == _STR_TAG or quote:
            return f"{key}: {quote}{value}{quote}\n"  # what ruamel writes for these
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString

    scalar = {'"': DoubleQuotedScalarString, "'": SingleQuotedScalarString}.get(quote, str)
    return _ruamel_lines({key: scalar(value)})


_PLAIN_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")
"""Strings ruamel writes as they are (plain, or inside quotes with no escapes)."""
_WIKI_LINK = re.compile(r"\[\[[A-Za-z0-9_./-][A-Za-z0-9 _./-]*[A-Za-z0-9_./-]\]\]")
"""``[[FR-101 plan]]``: written in double quotes, as Obsidian does and SPEC §2.2 shows
(single quotes where the person's value had them)."""
_RESOLVER = yaml.resolver.Resolver()


def _ruamel_lines(data: Mapping[str, object]) -> str:
    out = io.StringIO()
    with _LINES_LOCK:  # one ruamel instance, reused: making one costs more than a dump
        _lines_yaml().dump(dict(data), out)
    return out.getvalue()


_LINES_LOCK = threading.Lock()


@functools.cache
def _lines_yaml() -> YAML:
    """The ruamel instance ``_ruamel_lines`` reuses (under ``_LINES_LOCK``)."""
    return _rt_yaml()


def _splice(text: str, todo: Mapping[str, object | None], nl: str) -> str | None:
    """Edit only the lines of the changed keys; None when the layout does not allow it."""
    spans = _plain_spans(text, todo)
    if spans is None:
        spans = _composed_spans(text, todo)
    if spans is None:
        return None
    edits: list[tuple[int, int, str]] = []
    for name, (start, end, comment, style) in spans.items():
        value = todo[name]
        if value is None:
            edits.append((start, end, ""))
            continue
        line = _render_lines({name: value}, {name: style} if style else {}, nl)
        if comment and line.count(nl) == 1:
            line = line[: -len(nl)] + comment + nl
        edits.append((start, end, line))
    added = {k: v for k, v in todo.items() if k not in spans and v is not None}
    if added:
        content_end = len(text.rstrip(" \t\r\n"))
        newline = text.find("\n", content_end)
        at, lead = (
            (0, "") if not content_end else (len(text), nl) if newline < 0 else (newline + 1, "")
        )
        edits.append((at, at, lead + _render_lines(added, {}, nl)))
    parts, pos = [], 0
    for start, end, replacement in sorted(edits, key=lambda e: (e[0], e[1])):
        parts += [text[pos:start], replacement]
        pos = end
    return "".join([*parts, text[pos:]])


_Span = tuple[int, int, str, str | None]
"""Where a key's lines are: (start of its line, end of its last line, the trailing comment,
the quote its scalar value had)."""


def _plain_spans(text: str, todo: Mapping[str, object]) -> dict[str, _Span] | None:
    """The spans of the keys in ``todo`` read line by line, for a block in the plain subset
    (``plain_yaml``) whose keys to change each hold one line; None otherwise (then PyYAML's
    composer finds them: the same spans, found slower)."""
    if parse_plain(text) is None:
        return None
    spans: dict[str, _Span] = {}
    open_key: str | None = None
    pos = 0
    for line in text.splitlines(keepends=True):
        start, pos = pos, pos + len(line)
        body = line.rstrip("\r\n")
        if body[:1] in ("", " ", "#") or body.startswith("- ") or body == "-":
            if open_key is not None and body.lstrip(" ")[:1] == "-":
                return None  # list items under a key being changed
            continue
        m = _PLAIN_KEY.match(body)
        if m is None:
            return None
        open_key = None
        name, raw = m.group(1), m.group(2)
        if name not in todo:
            continue
        if not raw.strip(" ") or raw.lstrip(" ").startswith("#"):
            return None  # an empty value: its span is the composer's to say
        comment = _PLAIN_COMMENT.search(raw)
        value_end = m.start(2) + len((raw[: comment.start()] if comment else raw).rstrip(" "))
        tail = body[value_end:]
        first = raw.lstrip(" ")[0]
        spans[name] = (start, pos, tail if tail.strip() else "", first if first in "\"'" else None)
        open_key = name
    return spans


_PLAIN_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*):(.*)")
_PLAIN_COMMENT = re.compile(r"[ \t]+#")


def _composed_spans(text: str, todo: Mapping[str, object]) -> dict[str, _Span] | None:
    """The spans of the keys in ``todo``, from PyYAML's node marks."""
    try:
        root = yaml.compose(text, Loader=_BaseLoader)
    except yaml.YAMLError:
        return None
    pairs: list[tuple[yaml.Node, yaml.Node]] = []
    if root is not None:
        if not isinstance(root, yaml.MappingNode) or root.flow_style:
            return None
        pairs = root.value
        if pairs and pairs[0][0].start_mark.column != 0:
            return None
    spans: dict[str, _Span] = {}
    for key_node, value_node in pairs:
        name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(name, str) or name not in todo:
            continue
        span = _line_span(text, key_node, value_node)
        if span is None:
            return None
        style = value_node.style if isinstance(value_node, yaml.ScalarNode) else None
        spans[name] = (*span, style or None)
    return spans


def _line_span(text: str, key: yaml.Node, value: yaml.Node) -> tuple[int, int, str] | None:
    """(start of the key's line, end of its value's last line, trailing comment)."""
    line_start = text.rfind("\n", 0, key.start_mark.index) + 1
    if text[line_start : key.start_mark.index].strip(" "):
        return None  # an explicit ``? key``
    if value.start_mark.index < key.end_mark.index:
        return None  # an alias: its marks point back at the anchor
    leaf = value
    while isinstance(leaf, yaml.CollectionNode) and not leaf.flow_style and leaf.value:
        last = leaf.value[-1]
        leaf = last[1] if isinstance(last, tuple) else last
    content_end = max(len(text[: leaf.end_mark.index].rstrip(" \t\r\n")), key.end_mark.index)
    newline = text.find("\n", content_end)
    line_end = len(text) if newline < 0 else newline + 1
    tail = text[content_end:line_end].rstrip("\r\n")
    if tail.strip() and not tail.lstrip().startswith("#"):
        return None
    return line_start, line_end, tail if tail.strip() else ""


def _roundtrip(text: str, todo: Mapping[str, object | None], nl: str) -> str | None:
    """Rewrite the whole block with ruamel's round trip (order, quotes, comments kept)."""
    from ruamel.yaml.util import load_yaml_guess_indent

    y = _rt_yaml()
    try:
        data, indent, block_seq_indent = load_yaml_guess_indent(text.replace("\r\n", "\n"), yaml=y)
    except Exception:  # ruamel raises many unrelated error types; the caller reports
        return None
    data = {} if data is None else data
    if not isinstance(data, dict):  # CommentedMap is a dict
        return None
    if indent is not None:
        offset = block_seq_indent or 0
        y.indent(mapping=max(indent, 2) if offset else indent, sequence=indent, offset=offset)
    for key, value in todo.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    out = io.StringIO()
    y.dump(data, out)
    return out.getvalue().replace("\n", nl)


# --- writing --------------------------------------------------------------------------------------


class _Changed(Exception):
    """The file changed between our read and our replace."""


def write_atomic(
    path: Path, data: bytes, *, mode: int | None = None, expect: StatKey | None = None
) -> os.stat_result:
    """Replace ``path`` with ``data`` atomically; returns the new file's stat.

    With ``expect``, the file must still have that (inode, mtime_ns, size) right
    before the replace, else nothing is replaced.
    """
    folder = path.parent
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
            st = os.fstat(f.fileno())
        if expect is not None and stat_key(os.lstat(path)) != expect:
            raise _Changed
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise
    # No fsync of the folder: the new bytes are on disk before the rename (the person's
    # words never depend on it), and a rename lost to a power cut shows the previous
    # version, whose opus keys the next start mirrors again from the registry.
    return st


def edit_note(
    path: Path,
    decide: Callable[[ParsedNote], Changes],
    *,
    attempts: int = 3,
    before_write: Callable[[bytes], None] | None = None,
) -> Edit:
    """Read the note now, ask ``decide`` for the changes, write them atomically.

    If the file changes between the read and the replace, starts over (at most
    ``attempts`` times). Raises NoteError with the file untouched.
    """
    for _ in range(attempts):
        raw, st = read_raw(path)
        note = parse_note(path, raw, stat_key(st))
        new = rewrite(path, raw, decide(note))
        if new is None:
            return Edit(note, None, None)
        if len(new) > MAX_NOTE_BYTES:
            raise NoteError(path, "the rewritten note would be larger than 1 MiB")
        if before_write is not None:
            before_write(new)
        try:
            written = write_atomic(path, new, mode=stat.S_IMODE(st.st_mode), expect=note.stat_key)
        except _Changed:
            continue
        except FileNotFoundError as e:
            raise NoteError(path, "the note disappeared while opus wrote it") from e
        return Edit(note, new, written)
    raise NoteError(path, "the note kept changing while opus tried to write it")


def update_note(path: Path, changes: Changes) -> bytes | None:
    """Apply ``changes`` (``None`` deletes a key); the bytes written, None if no change."""
    return edit_note(path, lambda _note: changes).written

"""How the ``opus`` command writes log lines to stderr (SPEC §10, §20).

- ``journal``: ``<3>``/``<4>``/``<6>``… syslog priority prefixes, no timestamp (journald
  stamps each line) — chosen by itself when ``$JOURNAL_STREAM`` is set;
- ``text``: ``level: message``, with a ``HH:MM:SS`` time in front on a terminal;
- ``json``: one JSON object per line, with an ISO time.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Literal, TextIO

__all__ = ("LogFormat", "choose_format", "setup_logging")

LogFormat = Literal["text", "json", "journal"]

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def _priority(levelno: int) -> int:
    for level, prio in _PRIORITY.items():
        if levelno >= level:
            return prio
    return 7


class LineFormatter(logging.Formatter):
    def __init__(self, *, timestamps: bool = False, journal: bool = False) -> None:
        super().__init__()
        self.timestamps = timestamps
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journal:  # every line of a multi-line record carries the priority
            prefix = f"<{_priority(record.levelno)}>"
            return "\n".join(prefix + line for line in text.split("\n"))
        if self.timestamps:
            return f"{datetime.fromtimestamp(record.created):%H:%M:%S} {text}"
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.fromtimestamp(record.created).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


def _is_journal(environ: Mapping[str, str]) -> bool:
    """systemd sets ``$JOURNAL_STREAM`` for a unit whose output goes to journald (SPEC §20:
    set means journal lines; its ``device:inode`` is not compared with stderr, so a
    wrapper or a pipe between the unit and opus keeps the priorities)."""
    return bool(environ.get("JOURNAL_STREAM"))


def choose_format(requested: LogFormat | None, environ: Mapping[str, str]) -> LogFormat:
    if requested is not None:
        return requested
    return "journal" if _is_journal(environ) else "text"


def setup_logging(
    *,
    log_format: LogFormat | None = None,
    level: int = logging.INFO,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> LogFormat:
    """Send the ``opus`` loggers to ``stream`` (stderr) in the chosen format; return it."""
    stream = stream or sys.stderr
    chosen = choose_format(log_format, os.environ if environ is None else environ)
    handler = logging.StreamHandler(stream)
    if chosen == "json":
        handler.setFormatter(JsonFormatter())
    else:
        tty = chosen == "text" and stream.isatty()
        handler.setFormatter(LineFormatter(timestamps=tty, journal=chosen == "journal"))
    root = logging.getLogger("opus")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return chosen
